"""Width search by masking: a population of architectures trained as one vmapped program.

Every member is the widest model with the channels beyond its widths masked to zero for the
whole run: the kernel slices, biases and BatchNorm scale and shift of a removed channel are
zero, and stay zero, so the member computes exactly what the narrower model computes
(`techniques.prune.groups` says which parameters share a channel). All members keep the widest
shapes, so one program trains them all; each one's latency is measured on its shrunk model
(`prune.shrink`), the narrower model itself.

The masks are the pruning transform's own (`PruneState.masks`, in the optimizer state): they are
applied to the parameters and to every update, and checkpoint and vmap with the state, so
members differ only in values. The transform is made inert (`width_config`: a one-shot prune at
`train.steps`, an update no run reaches), so nothing recomputes them.

A member starts as its narrow model starts: that model's own initialisation (same seed) placed
in the leading channels, zeros elsewhere. With the same seed and data order, a member and the
narrow model trained alone take the same steps up to float rounding (over a long run the
rounding differences grow, as between any two programs: results/nas_widths.md measures it).

    config = width_config(config, widths=[(8, 16, 64), (32, 32, 32)], seeds=[0, 1])
    summary = train_widths(config, widths, workdir)        # jaxopt_lab.train_and_evaluate
    summary["members"][0]["latency_ms_batch1"]             # its narrow model's (train.measure)
    model, variables = shrunk_member(load_run(workdir), 0)  # the (8, 16, 64) CNN, trained

From the command line, `jaxopt-lab sweep` with `sweep.widths` searches the widths this way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from jaxopt_lab.compose.experiment import configured_data_seed
from jaxopt_lab.core.checkpoint import Checkpointer
from jaxopt_lab.core.layers import param_paths
from jaxopt_lab.core.measure import measure_model
from jaxopt_lab.core.population import make_population
from jaxopt_lab.core.state import TrainState, create_train_state, model_params, sample_input
from jaxopt_lab.errors import UserError
from jaxopt_lab.run.build import Run, build_run, load_run
from jaxopt_lab.techniques.prune import find_state, shrink, with_masks
from jaxopt_lab.techniques.prune.groups import Wiring, wiring
from jaxopt_lab.workflows.train import train_and_evaluate

Widths = tuple[int, ...]  # one width per channel group of the widest model, in `wiring` order


def width_config(config: ml_collections.ConfigDict, widths: Sequence[Sequence[int]],
                 seeds: Sequence[int]) -> ml_collections.ConfigDict:
    """`config` (its model the widest) as a population of `len(widths)` members, member i from
    seed `seeds[i]`, with the pruning transform inert: channel groups, every layer, never due.

    Raises:
      UserError: pruning or a population already set, or `seeds` not one per member.
    """
    if config.techniques.prune.method != "none":
        raise UserError("nas: techniques.prune holds the width masks; set its method to none")
    if config.population:
        raise UserError("nas: config.population is set; the widths make the population")
    if len(seeds) != len(widths) or not widths:
        raise UserError(f"nas: {len(widths)} widths and {len(seeds)} seeds; give one seed per "
                        "member, at least one member")
    config = config.copy_and_resolve_references()
    block = config.techniques.prune
    block.method, block.pattern, block.schedule = "magnitude", "channels", "one_shot"
    block.begin_step, block.skip = config.train.steps, ()
    config.population = (("seed", tuple(int(s) for s in seeds)),)
    return config


def check_widths(wirings: Sequence[Wiring], widths: Sequence[int]) -> Widths:
    """`widths` as a tuple, one per group, each in [1, the widest model's channels]."""
    names = [w.group.name for w in wirings]
    if len(widths) != len(wirings):
        raise UserError(f"nas widths {tuple(widths)} need one width per channel group: "
                        f"{', '.join(names)}")
    for w, width in zip(wirings, widths, strict=True):
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not (
                1 <= width <= w.group.size):
            raise UserError(f"nas width {width!r} for {w.group.name} must be an int in "
                            f"[1, {w.group.size}] (the widest model's channels)")
    return tuple(int(x) for x in widths)


def width_masks(masks, wirings: Sequence[Wiring], widths: Widths):
    """`masks` (a PruneState's, like params: bool arrays where the transform masks) keeping
    only each group's leading channels."""
    leaves, treedef = jax.tree.flatten(masks)
    flat = dict(zip(param_paths(masks), map(np.asarray, leaves), strict=True))
    for w, width in zip(wirings, widths, strict=True):
        kept = np.arange(w.group.size) < width
        for path, axis in w.group.members:
            line = [1] * flat[path].ndim
            line[axis] = w.group.size
            flat[path] = flat[path] & np.broadcast_to(kept.reshape(line), flat[path].shape)
    return treedef.unflatten([flat[p] for p in param_paths(masks)])


def narrow_model(model: nn.Module, params, wirings: Sequence[Wiring],
                 widths: Widths) -> nn.Module:
    """The registry model at `widths`: what surgery makes of the widest one masked to them.
    `params` (arrays or ShapeDtypeStructs) give only the shapes."""
    ones = jax.tree.map(lambda p: np.ones(np.shape(p), bool), params)
    kept = jax.tree.map(lambda m: m.astype(np.float32), width_masks(ones, wirings, widths))
    return shrink(model, {"params": kept})[0]


def grow(wide: dict, narrow: dict, wirings: Sequence[Wiring], widths: Widths) -> dict:
    """Variables shaped like `wide` holding `narrow`'s: each group's channels at its leading
    indices (after a flatten, at every position), the rest zero (params) or `wide`'s (batch
    statistics). The inverse of the surgery's cut."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(wide)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    small = {jax.tree_util.keystr(p): np.asarray(x)
             for p, x in jax.tree_util.tree_flatten_with_path(narrow)[0]}
    index = {p: [np.arange(n) for n in small[p].shape] for p in paths}
    for w, width in zip(wirings, widths, strict=True):
        slices = [(f"['params']{p}", axis) for p, axis in (*w.group.members, *w.consumers)]
        norms = [(p.removesuffix("['scale']"), axis) for p, axis in w.group.members
                 if p.endswith("['scale']")]  # a BatchNorm: its statistics go with it
        slices += [(f"['batch_stats']{module}['{stat}']", axis) for module, axis in norms
                   for stat in ("mean", "var")]
        for path, axis in slices:
            if path in index:
                positions = np.shape(leaves[paths.index(path)][1])[axis] // w.group.size
                index[path][axis] = (np.arange(positions)[:, None] * w.group.size
                                     + np.arange(width)).reshape(-1)
    out = []
    for path, (_, leaf) in zip(paths, leaves, strict=True):
        base = np.zeros_like(leaf) if path.startswith("['params']") else np.array(leaf)
        base[np.ix_(*index[path])] = small[path]
        out.append(base)
    return treedef.unflatten(out)


def start_population(config: ml_collections.ConfigDict, widths: Sequence[Sequence[int]],
                     workdir: str, dataset=None) -> None:
    """Writes the population's start (step 0) in workdir/checkpoints, where the loop resumes
    from it. `config` is `width_config`'s; `dataset` as `train_and_evaluate` takes it.

    Raises:
      UserError: widths that do not fit the widest model (before anything compiles).
    """
    run = build_run(config, dataset=dataset, train=False)
    experiment, members, mesh = run.experiment, run.members, run.mesh
    if len(members) != len(widths):
        raise UserError(f"nas: {len(widths)} widths for a population of {len(members)}; build "
                        "the config with width_config(config, widths, seeds)")
    sample_x, data_seed = sample_input(run.dataset), configured_data_seed(config)
    shardings = jax.tree.map(lambda a: a.sharding, run.carry)

    # A member's state as population_init makes it, one compiled init for every seed (on a
    # CPU, compiling the initialisers' random numbers costs more than running them).
    def init(model: nn.Module, tx, comm_init, seed) -> TrainState:
        return create_train_state(model, sample_x, tx, comm_init, mesh.size, seed,
                                  hparams=experiment.hparams, data_seed=data_seed,
                                  extra_params=experiment.extra_params)

    wide_init = jax.jit(lambda seed: init(experiment.model, experiment.tx,
                                          experiment.reducer.init, seed))
    wirings = wiring(experiment.model, jax.eval_shape(wide_init, 0).params)
    checked = [check_widths(wirings, w) for w in widths]

    @jax.jit
    def place(state: TrainState, variables: dict, masks) -> TrainState:
        """`state` holding `variables`, a fresh optimizer state for them, masked by `masks`."""
        params = variables["params"]
        state = state.replace(params=params, opt_state=experiment.tx.init(params),
                              model_state={k: v for k, v in variables.items() if k != "params"})
        return with_masks(state, masks)

    narrow_inits, states = {}, []
    for member, w in zip(members, checked, strict=True):
        wide = wide_init(member["seed"])
        if w not in narrow_inits:  # the narrow model's own initialisation
            narrow = narrow_model(experiment.model, wide.params, wirings, w)
            narrow_inits[w] = jax.jit(lambda seed, narrow=narrow: init(
                narrow, optax.identity(), lambda _: {}, seed))
        small = narrow_inits[w](member["seed"])
        variables = grow({"params": wide.params, **wide.model_state},
                         {"params": small.params, **small.model_state}, wirings, w)
        masks = width_masks(find_state(wide.opt_state).masks, wirings, w)
        states.append(place(wide, variables, masks))
    population = jax.device_put(make_population(states), shardings)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    try:
        checkpointer.save(0, population)
    finally:
        checkpointer.close()


def train_widths(config: ml_collections.ConfigDict, widths: Sequence[Sequence[int]],
                 workdir: str, dataset=None, stop_members=None) -> dict:
    """Trains `width_config`'s population of `widths` in `workdir` with the core loop; its
    start is written first unless the workdir holds a checkpoint (then it resumes).
    `stop_members` as `train_and_evaluate` takes it.

    Returns the loop's summary (validation and test metrics per member), each member with its
    own size (`member_sizes`), as summary.json says too.
    """
    measure = config.train.measure
    config = config.copy_and_resolve_references()
    config.train.measure = False  # the widest model's costs are no member's
    if not _has_checkpoint(os.path.join(workdir, "checkpoints")):
        start_population(config, widths, workdir, dataset)
    summary = train_and_evaluate(config, workdir, dataset=dataset, stop_members=stop_members)
    return member_sizes(summary, workdir, measure, dataset)


def member_sizes(summary: dict, workdir: str, measure: bool, dataset=None) -> dict:
    """`summary` (the width population's in `workdir`) with each member's narrow model: its
    `layer_widths` (the model keys that build it) and `num_params`, and with `measure` the
    costs `core.measure.measure_model` gives, measured on it; written to summary.json."""
    run = load_run(workdir, **({} if dataset is None else {"dataset": dataset}))
    sample_x = sample_input(run.dataset)
    for i, member in enumerate(summary["members"]):
        model, variables = shrunk_member(run, i)
        member["layer_widths"] = {k: list(v) for k, v in model.layer_widths().items()}
        member["num_params"] = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
        if measure:
            member.update(measure_model(model, variables, sample_x))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _has_checkpoint(directory: str) -> bool:
    if not os.path.isdir(directory):
        return False
    checkpointer = Checkpointer(directory, 1)
    try:
        return checkpointer.latest_step() is not None
    finally:
        checkpointer.close()


def shrunk_member(run: Run, member: int) -> tuple[nn.Module, dict]:
    """Member `member` of a width population (`jaxopt_lab.load_run`) as its narrow model and
    variables (host arrays): what its latency is measured on. Surgery keeps the channels with
    a nonzero weight: the member's leading ones (a trained channel is never all zeros)."""
    state = jax.tree.map(lambda a: np.asarray(a[member]), run.state.replace(opt_state=None))
    return shrink(run.experiment.model, {"params": model_params(state.params),
                                         **state.model_state})
