"""The one TrainState pytree: whatever is in it is checkpointed, sharded and resumed; nothing else is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_lab.core import fsdp
from jaxopt_lab.core.precision import initial_loss_scale
from jaxopt_lab.core.tasks import train_kwargs

# A params subtree a technique trains beside the model's own (distillation's hint maps): in the
# TrainState, trained and checkpointed, but not the model's, so `model_params` drops it.
HINTS = "distill_hints"
TECHNIQUE_PARAMS = (HINTS,)


def model_params(params: Any) -> Any:
    """`params` without the techniques' own subtrees: what the model applies and exports."""
    if not any(k in TECHNIQUE_PARAMS for k in getattr(params, "keys", lambda: ())()):
        return params
    return {k: v for k, v in params.items() if k not in TECHNIQUE_PARAMS}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the model's trainable parameters
    opt_state: Any  # optax state (pruning masks, schedules and injected hyperparameters live here)
    model_state: Any  # non-trainable model collections, e.g. {"batch_stats": ...}; {} if none
    comm_state: Any  # gradient-communication state, leading axis = data-parallel devices
    rng: jax.Array  # uint32 key data (raw, so checkpoints need no typed-key support)
    data_rng: jax.Array  # uint32 key data: seeds each epoch's order of the on-device data
    hparams: dict[str, jax.Array]  # float32 scalars passed to the loss and the reducer
    # float16's dynamic loss scale (core/precision.py); None, no leaves, for other dtypes
    loss_scale: Any = None


def create_train_state(model, sample_x: jax.Array, tx: optax.GradientTransformation,
                       comm_init, num_data_devices: int, seed: int, *,
                       hparams: dict[str, float] | None = None,
                       data_seed: int | None = None,
                       extra_params: Callable[[jax.Array], dict] | None = None,
                       variables: dict | None = None) -> TrainState:
    """Initializes the model, optimizer and communication state from one seed.

    `comm_init(params)` gives one device's communication state; it is stacked over the
    data-parallel devices because each device keeps its own (e.g. error-feedback residuals).
    `data_seed` (default `seed`) orders the data; `hparams` are the loss's and reducer's values;
    `extra_params(key)` gives the techniques' own params subtrees (TECHNIQUE_PARAMS). A model
    computing in float16 gets a loss scale. `variables` (the model's, as `model.init` returns
    them) replace the model's initialization: the optimizer and every technique start from them.
    """
    init_key, state_key = jax.random.split(jax.random.key(seed))
    if variables is None:
        variables = model.init(init_key, sample_x, **train_kwargs(model, False))
    params = variables["params"]
    if extra_params is not None:
        params = {**params, **extra_params(jax.random.fold_in(init_key, 1))}
    model_state = {k: v for k, v in variables.items() if k != "params"}
    comm_state = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_data_devices, *jnp.shape(x))), comm_init(params)
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
        comm_state=comm_state,
        rng=jax.random.key_data(state_key),
        data_rng=jax.random.key_data(jax.random.key(seed if data_seed is None else data_seed)),
        hparams={k: jnp.float32(v) for k, v in (hparams or {}).items()},
        loss_scale=initial_loss_scale(model),
    )


def sample_input(dataset) -> np.ndarray:
    """A batch of one zero example shaped and typed like the data set's inputs: what init traces."""
    return np.zeros((1, *dataset.input_shape), dataset.train["x"].dtype)


def _init_and_shardings(experiment, sample_x, mesh: Mesh, seed: int, data_seed: int | None):
    """`init(variables=None)`, the state's shapes and its shardings."""
    def init(variables=None):
        return create_train_state(experiment.model, sample_x, experiment.tx,
                                  experiment.reducer.init, mesh.size, seed,
                                  hparams=experiment.hparams, data_seed=data_seed,
                                  extra_params=experiment.extra_params, variables=variables)

    abstract = jax.eval_shape(init)
    return init, abstract, state_shardings(abstract, mesh,
                                           shard_params=experiment.reducer.sharded)


def state_shardings(abstract: TrainState, mesh: Mesh, leading_axes: int = 0,
                    shard_params: bool = False) -> TrainState:
    """Everything replicated, comm_state split over the "data" axis after `leading_axes` (1 for a
    population's stacked state); with `shard_params`, params and opt_state split by
    `core.fsdp.leaf_spec` (for a sharded reducer's step)."""
    lead = [None] * leading_axes
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    shardings = shardings.replace(comm_state=jax.tree.map(
        lambda _: NamedSharding(mesh, P(*lead, mesh.axis_names[0])), abstract.comm_state))
    if not shard_params:
        return shardings

    def split(tree):
        return jax.tree.map(lambda x: NamedSharding(
            mesh, fsdp.leaf_spec(x.shape, mesh.size, leading_axes)), tree)

    return shardings.replace(params=split(abstract.params), opt_state=split(abstract.opt_state))


def init_sharded_state(experiment, sample_x, mesh: Mesh, seed: int,
                       data_seed: int | None = None, variables: dict | None = None) -> TrainState:
    """Builds the state directly with its shardings (shapes first, then a jitted init), from
    the model's own initialization or from `variables` (`create_train_state`).

    On a CPU the init program is compiled without LLVM's optimizations: it runs once, and its
    random draws (threefry rounds for every parameter) compiled optimized took about three times
    as long, the largest fixed cost of a small run (benchmarks/default_run.py). Its values differ
    from the optimized program's by float32 rounding at most, and are the same on every run."""
    init, _, shardings = _init_and_shardings(experiment, sample_x, mesh, seed, data_seed)
    lowered = jax.jit(init, out_shardings=shardings).lower(variables)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=options)(variables)


def abstract_sharded_state(experiment, sample_x, mesh: Mesh) -> TrainState:
    """The state's shapes, dtypes and shardings without computing it: a restore target."""
    _, abstract, shardings = _init_and_shardings(experiment, sample_x, mesh, 0, None)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
