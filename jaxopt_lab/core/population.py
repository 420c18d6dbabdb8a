"""A population of trials as one XLA program: stacked TrainStates, one vmapped step.

Members differ only in values, not shapes: a seed (initialisation and data order), the data seed,
injected optimizer values (`core/optim.py::INJECTED`), a technique's values in the optimizer state
(the `injected` mapping an experiment carries: a pruning target) and `TrainState.hparams`. Every
such value
is addressed by its config key ("optim.lr", "data.seed", "loss.label_smoothing") and lives in
the state, so one compiled step trains every member with its own values, and the checkpoint holds
them. A member is stopped by masking: its state stops changing while the others go on (a member
whose loss or gradients turn non-finite stops itself at its last good state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core.config import check_population
from jaxopt_lab.core.optim import INJECTED
from jaxopt_lab.core.precision import diverged
from jaxopt_lab.core.state import TrainState, create_train_state, state_shardings
from jaxopt_lab.core.tasks import LABEL_SMOOTHING
from jaxopt_lab.errors import UserError

STATE_KEYS = ("seed", "data.seed")  # set when a member's state is made, not afterwards
MEMBER_AXIS = "members"  # the vmapped axis of a population's step


def when_any_member(due: jax.Array, update: Callable[[], Any], keep: Callable[[], Any]) -> Any:
    """`update()` where `due`, else `keep()`: a `lax.cond` that stays one under a population's
    vmap.

    vmap turns a cond on a per-member predicate into computing both branches every step; a
    technique's periodic heavy work (recomputing pruning masks) would then run at every step.
    Here the branch runs when any member is due (members of one population step in lockstep)
    and each member keeps its own result.
    """
    try:
        jax.lax.axis_size(MEMBER_AXIS)
    except NameError:  # one trial, not a population
        return jax.lax.cond(due, update, keep)
    any_due = jax.lax.pmax(due, MEMBER_AXIS)

    def update_where_due():
        return jax.tree.map(lambda a, b: jnp.where(due, a, b), update(), keep())

    return jax.lax.cond(any_due, update_where_due, keep)


@struct.dataclass
class Population:
    step: jax.Array  # int32 scalar: steps the population has run (a stopped member's stop)
    members: TrainState  # every leaf stacked on a leading member axis
    active: jax.Array  # bool [members]: False once a member is stopped


def stack_trials(states: Sequence[TrainState]) -> TrainState:
    """Stacks per-trial states along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_trials(population: TrainState) -> list[TrainState]:
    """The inverse of `stack_trials`."""
    size = jax.tree.leaves(population)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], population) for i in range(size)]


def allowed_keys(hparams: Iterable[str], injected: Mapping[str, str] = INJECTED) -> list[str]:
    """The keys a population may vary, given the state's hparams and the values injected into
    its optimizer state (config key -> name under a `hyperparams` dict, as
    optax.inject_hyperparams keeps them: the optimizer's own and a technique's).

    `loss.label_smoothing` is always among them: the task's loss keeps it in the state only
    where it is non-zero or swept, so a population that misspelled another key was told it
    could not vary it either (one whose own loss reads no smoothing is told so by `set_values`).
    """
    return [*STATE_KEYS, *injected, *sorted({*hparams, LABEL_SMOOTHING})]


def member_values(spec: Sequence[Sequence[Any]], hparams: Iterable[str],
                  injected: Mapping[str, str] = INJECTED) -> list[dict[str, Any]]:
    """One {key: value} per member from a config's `population`.

    Raises:
      UserError: on a malformed population or a key that is not a per-trial value.
    """
    check_population(spec)
    allowed = allowed_keys(hparams, injected)
    for key, _ in spec:
        if key not in allowed:
            raise UserError(f"population key {key!r} is not a per-trial value; allowed: "
                            f"{', '.join(allowed)}")
    columns = {key: list(values) for key, values in spec}
    size = len(next(iter(columns.values()), ()))
    return [{key: values[i] for key, values in columns.items()} for i in range(size)]


def set_values(state: TrainState, values: Mapping[str, Any],
               injected: Mapping[str, str] = INJECTED) -> TrainState:
    """`state` with per-trial values set by config key, for one state or a stacked population
    (then each value is one per member, e.g. {"optim.lr": [1e-3, 3e-3]}).

    Raises:
      UserError: for "seed" (it shapes the initialisation: make each member with its own) and
        for keys that are not per-trial values.
    """
    to_inject, hparams = {}, dict(state.hparams)
    for key, value in values.items():
        if key in injected:
            to_inject[injected[key]] = value
        elif key in hparams:
            hparams[key] = jnp.asarray(value, jnp.float32).reshape(hparams[key].shape)
        elif key == LABEL_SMOOTHING:
            raise UserError(f"population varies {key!r}, but the loss reads no label smoothing "
                            f"(a loss of your own: pass hparams={{{key!r}: value}} and read it)")
        elif key == "data.seed":
            seeds = np.asarray(value, np.uint32).reshape(-1)
            keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
            state = state.replace(data_rng=keys.reshape(state.data_rng.shape))
        else:
            raise UserError(f"{key!r} cannot be set on a made state; per-trial values: "
                            f"{', '.join(k for k in allowed_keys(hparams, injected) if k != 'seed')}")

    found = set()

    def replace(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if len(names) >= 2 and names[-2] == "hyperparams" and names[-1] in to_inject:
            found.add(names[-1])
            return jnp.asarray(to_inject[names[-1]], leaf.dtype).reshape(leaf.shape)
        return leaf

    opt_state = jax.tree_util.tree_map_with_path(replace, state.opt_state)
    if set(to_inject) - found:  # an optimizer of the caller's own, or a technique that is off
        keys = sorted(k for k, name in injected.items() if name in set(to_inject) - found)
        needs = "; ".join(f"{key} needs {key.rpartition('.')[0]} on" for key in keys)
        raise UserError(f"the optimizer state has no injected hyperparameter(s) for {keys} "
                        f"(optax.inject_hyperparams; {needs})")
    return state.replace(opt_state=opt_state, hparams=hparams)


def make_population(states: Sequence[TrainState]) -> Population:
    """Every member active, at step 0 of the population (members start where their states are)."""
    return Population(step=jnp.zeros((), jnp.int32), members=stack_trials(states),
                      active=jnp.ones((len(states),), bool))


def stop_members(population: Population, indices: Iterable[int]) -> Population:
    """Masks the given members: their states stop changing from the next step on."""
    stopped = np.zeros(population.active.shape, bool)
    stopped[list(indices)] = True
    return population.replace(active=population.active & ~jnp.asarray(stopped))


def population_step(step_fn: Callable) -> Callable:
    """`(population, source) -> (population, metrics per member)` from a one-trial
    `step_fn(state, source)`; the source (data or a batch) is shared by all members.

    A member's update is kept only while it is active and has not diverged (its loss and gradient
    norm are finite, or they are not for a float16 overflow its loss scale skipped); metrics gain
    "active" (after the step) and "was_active" (before) for the logged train fn.
    """

    def member(state, active, source):
        new, metrics = step_fn(state, source)
        ok = active & ~diverged(metrics)
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return state, ok, {**metrics, "active": ok, "was_active": active}

    def step(population: Population, source):
        members, active, metrics = jax.vmap(member, in_axes=(0, 0, None), axis_name=MEMBER_AXIS)(
            population.members, population.active, source)
        return Population(population.step + 1, members, active), metrics

    return step


def vmap_over_trials(train_fn: Callable) -> Callable:
    """`train_fn(state, source)` for a stacked state, outside the loop and its masking: every
    trial trains, and the data source is shared by all of them."""
    return jax.jit(jax.vmap(train_fn, in_axes=(0, None), axis_name=MEMBER_AXIS))


def population_init(experiment, sample_x, mesh, members: Sequence[Mapping[str, Any]], *,
                    seed: int, data_seed: int | None
                    ) -> tuple[Callable[[], Population], Population]:
    """`(init, shardings)`: a jittable function making the population (each member with its own
    seed and data seed where given, then its other values) and where each part goes.

    A member's data order follows its data seed, else `data_seed`, else its own seed."""

    seeds = [values.get("seed", seed) for values in members]
    data_seeds = [values.get("data.seed", data_seed) for values in members]
    data_seeds = [own if d is None else d for own, d in zip(seeds, data_seeds, strict=True)]
    columns = {key: [values[key] for values in members]
               for key in members[0] if key not in STATE_KEYS}

    def one(member_seed, member_data_seed) -> TrainState:
        return create_train_state(
            experiment.model, sample_x, experiment.tx, experiment.reducer.init, mesh.size,
            member_seed, hparams=experiment.hparams, data_seed=member_data_seed,
            extra_params=experiment.extra_params)

    def init() -> Population:
        # One vmapped init, not one per member: a 256-member population traced member by
        # member took minutes to compile.
        states = jax.vmap(one, axis_name=MEMBER_AXIS)(jnp.asarray(seeds, jnp.uint32),
                                                      jnp.asarray(data_seeds, jnp.uint32))
        states = set_values(states, columns, experiment.injected)
        return Population(step=jnp.zeros((), jnp.int32), members=states,
                          active=jnp.ones((len(members),), bool))

    abstract = jax.eval_shape(init)
    replicated = NamedSharding(mesh, P())
    members = state_shardings(abstract.members, mesh, 1, shard_params=experiment.reducer.sharded)
    shardings = Population(step=replicated, members=members, active=replicated)
    return init, shardings
