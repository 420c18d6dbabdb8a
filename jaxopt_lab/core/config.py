"""Experiment configs: the shared schema, loading with command-line overrides, and validation.

A config is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`; configs build
on `default_config()` and override only what differs. Validation runs before anything compiles, so a
typo costs one line on the terminal rather than a traceback after a minute of JIT.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxopt_lab.core.precision import check_precision
from jaxopt_lab.data.sources import check_dataset_name
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, model_hparams

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lamb")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "one_cycle", "reduce_on_plateau")
# The techniques with a block under `techniques` (core/builder.py composes them).
TECHNIQUES: tuple[str, ...] = ("quantize", "prune", "distill", "compress")


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (the MNIST-1D CNN of the paper)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # mnist1d | mnist1d_shuffled | digits | diabetes | python_text | synthetic | tfds:<name>
    # | an import path "package.module:function" returning a Dataset
    c.data.name = "mnist1d"
    c.data.batch_size = 100  # global batch, split over all devices of all processes
    c.data.validation_fraction = 0.1  # carved from train, fixed across seeds; 0 = none
    c.data.seed = -1  # seeds the order of the training data; -1 = the run's seed
    c.data.dir = ""  # "" = $JAXOPT_LAB_DATA_DIR or ~/.cache/jaxopt_lab/data
    c.data.on_device = True  # small data sets live on the device; False streams through grain
    c.data.shuffle = True  # reshuffle every epoch; False walks the data in stored order
    c.data.workers = 0  # grain worker processes (0 = in the main process)
    c.data.prefetch = 2  # streamed: calls' worth of batches put on the devices ahead (0 = none)
    c.data.synthetic_shape = (40,)
    c.data.synthetic_size = 4096
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.shift = 0  # 1-D signals: random shift by up to this many positions
    c.data.augment.noise = 0.0  # std of additive Gaussian noise
    c.data.augment.crop = 0  # images: pad by this much, then random-crop back
    c.data.augment.flip = False  # images: random horizontal flip

    c.model = model_config("cnn1d")  # name: a registry name or "package.module:Class"

    c.loss = ml_collections.ConfigDict()  # the data set's task picks the loss (see core/tasks.py)
    c.loss.label_smoothing = 0.0  # classification / language model: mass spread over all classes

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 1e-2
    c.optim.weight_decay = 0.0
    c.optim.momentum = 0.9  # sgd-family momentum; Adam's b1
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 0.0  # global-norm clip; 0 = off
    c.optim.plateau_patience = 5  # reduce_on_plateau: steps (of loss) without improvement
    c.optim.plateau_factor = 0.5

    c.train = ml_collections.ConfigDict()
    c.train.steps = 6000
    c.train.eval_every = 500
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.steps_per_call = 0  # K steps scanned per compiled call; 0 = measure and pick
    c.train.eval_batch_size = 1000
    c.train.progress = True
    c.train.measure = True  # summary.json: model_bytes, FLOPs, latency at batch 1 and 256
    c.train.grad_accum_steps = 1  # microbatches per device and step, one update (core/accumulate.py)
    c.train.shard_params = False  # params and optimizer state sharded over devices (core/fsdp.py)
    c.train.compute_dtype = "float32"  # float32 | bfloat16 | float16 (loss-scaled); params: float32
    c.train.remat = "none"  # none | full | a jax.checkpoint_policies name (models/remat.py)

    # A population: config keys and one value per member, trained as one vmapped program in one
    # run directory, e.g. (("optim.lr", (1e-3, 3e-3, 1e-2)), ("seed", (0, 1, 2))). Keys: seed,
    # data.seed, optim.lr, optim.weight_decay, optim.momentum, optim.warmup_steps,
    # loss.label_smoothing, techniques.prune.sparsity, techniques.distill.temperature,
    # techniques.distill.alpha. () = one run.
    c.population = ()

    c.techniques = ml_collections.ConfigDict()
    q = c.techniques.quantize = ml_collections.ConfigDict()  # AQT at the model seam
    q.method = "none"  # none | qat (quantization-aware training); PTQ: `jaxopt-lab quantize`
    q.bits = 8  # 8 | 4 (integer numerics)
    q.numerics = "int"  # int | fp8_e4m3 | fp8_e5m2
    q.backward = "float"  # float (forward-only QAT) | quantized (both backward matmuls too)
    q.per_channel = True  # one weight scale per output channel; False: one per tensor
    q.activations = True  # quantize layer inputs too (w8a8); False: weights only (w8)
    q.attention = True  # with activations: also attention's QK^T and weights x V
    # regexes over parameter paths left in float; None: the first and last layers; () = none
    q.skip = ml_collections.config_dict.placeholder(tuple)

    r = c.techniques.prune = ml_collections.ConfigDict()  # masks at the update seam
    r.method = "none"  # none | magnitude | random | snip | set | rigl | ste
    r.pattern = "unstructured"  # unstructured | N:M such as 2:4, 1:4, 4:8 | channels
    r.scope = "layer"  # layer | global (one ranking across layers; unstructured only)
    r.distribution = "uniform"  # uniform | erk (per-layer sparsities; layer scope)
    r.sparsity = 0.9  # target fraction of zeros among prunable kernels (channels: per group)
    r.schedule = "gradual"  # gradual (cubic, Zhu & Gupta 2017) | one_shot (at begin_step)
    r.initial_sparsity = 0.0  # gradual: the sparsity at begin_step
    r.begin_step = 0  # the first update that prunes
    r.end_step = -1  # gradual: the target is reached here; SET/RigL: topology frozen; -1: 3/4 of train.steps
    r.frequency = 100  # updates between mask recomputations
    r.drop_fraction = 0.3  # SET / RigL: fraction of kept weights replaced (cosine-decayed)
    r.norm = "l1"  # channels: l1 | l2 norm of a channel's weights scores it
    # regexes over parameter paths left dense; None: the first and last layers; () = none
    r.skip = ml_collections.config_dict.placeholder(tuple)

    d = c.techniques.distill = ml_collections.ConfigDict()  # soft targets at the loss seam
    d.teacher = ""  # a run directory whose model teaches (its newest checkpoint); "" = off
    d.teacher_member = -1  # a population teacher: the member that teaches
    # a config file: the teacher is trained from it first, into `teacher` (or WORKDIR/teacher
    # where that is ""), unless a finished run is there
    d.teacher_config = ""
    d.teacher_overrides = ()  # "--config.KEY=VALUE" strings applied to teacher_config
    d.temperature = 4.0  # softmax temperature of both; a per-trial value
    d.alpha = 0.9  # weight of the soft loss; 1 - alpha weighs the hard one; a per-trial value
    d.form = "kl"  # kl | cross_entropy (same gradients; the logged value differs by a constant)
    d.features = ()  # (student layer, teacher layer) pairs of module paths: FitNets hints
    d.feature_weight = 1.0  # weight of the hints' mean squared error
    d.transfer_size = 0  # unlabeled inputs from the data set's generator, labelled by the teacher
    # auto: computed once before training when nothing changes them (no augmentation, no
    # features, a classification task), else in the step | in_step | precomputed
    d.teacher_logits = "auto"

    k = c.techniques.compress = ml_collections.ConfigDict()  # at the communication seam
    k.method = "none"  # none (exact all-reduce) | topk | randomk | powersgd | signsgd | qsgd | int8
    k.ratio = 0.01  # topk / randomk: kept fraction of each tensor
    k.rank = 2  # powersgd: rank of the approximation
    k.start_step = 10  # powersgd: exact all-reduce for this many steps first
    k.levels = 16  # qsgd: quantization levels (16: 4 bits)
    # None: the method's own default (on; off for the unbiased qsgd and the near-exact int8)
    k.error_feedback = ml_collections.config_dict.placeholder(bool)
    k.min_size = 1024  # tensors with fewer elements are all-reduced as they are

    w = c.sweep = ml_collections.ConfigDict()  # `jaxopt-lab sweep` (tune/): an Optuna study
    w.space = ()  # dimensions built with jaxopt_lab.tune.space: log_uniform("optim.lr", ...), ...
    w.objectives = (("validation_accuracy", "maximize"),)  # (metric, direction) pairs
    w.trials = 20
    w.sampler = "tpe"  # random | grid | tpe | gp | skopt_gp | skopt_forest | nsga2
    w.pruner = "none"  # none | asha | hyperband | median (on the first objective, at evals)
    w.population = 1  # trials asked as a batch and vmapped as one program (1: one a program)
    w.workers = 1  # worker processes on this machine against the one study
    w.storage = ""  # "" = the journal file WORKDIR/study.journal; or sqlite:///..., postgresql://...
    w.seed = 0  # the sampler's
    w.startup_trials = 10  # random trials before a model-based sampler (TPE, GP, skopt) fits

    o = c.optimize = ml_collections.ConfigDict()  # `jaxopt-lab optimize` (optimize/)
    # structured | unstructured | int8 | distill | structured_int8 | distill_structured_int8
    o.candidates = ("structured", "unstructured", "int8", "distill", "structured_int8",
                    "distill_structured_int8")
    o.structured_sparsities = (0.5, 0.75)  # fractions of channels removed; one population
    o.unstructured_sparsities = (0.8, 0.9, 0.95)  # fractions of weights zeroed; one population
    o.student = ()  # "--config.KEY=VALUE" strings making the student; () = half the widths
    o.max_accuracy_drop = 1.0  # points of validation accuracy the best may lose to the baseline
    o.objective = "size_latency"  # size_latency (bytes x batch-256 latency) | latency | size
    return c


def model_config(name: str, **hparams) -> ml_collections.ConfigDict:
    """A `model` block: the name plus every hyperparameter of that model with its default.

    Listing them all is what lets `--config.model.KEY=V` override any of them from the command line.
    """
    defaults = model_hparams(name)
    for key in hparams:
        if key not in defaults:
            raise UserError(f"unknown config key 'model.{key}' for model {name!r}; "
                            f"allowed: {', '.join(sorted(defaults)) or 'none'}")
    block = {"name": name, **defaults, **hparams}
    return ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v
                                      for k, v in block.items()})


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    # ml_collections registers the `--config.a.b=v` override flags by scanning sys.argv.
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _parse(path: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Runs the config file and applies the overrides; whatever goes wrong in the file (the user's
    own code: a syntax error, a failing import, an exception in get_config) is one line naming it."""
    argv = ["jaxopt-lab", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    with _argv(argv):
        config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True)
        # ml_collections executes every config file into the one module sys.modules["config_config"]:
        # without a fresh one, a file lacking get_config() would run the previous file's.
        sys.modules.pop("config_config", None)
        try:
            flag_values(argv)
            config = flag_values.config
            # ml_collections defers an OSError inside the file until the config is touched.
            getattr(config, "lock", None)
        except UserError as e:  # get_config() called model_config('nope'), say
            raise UserError(f"config {path}: {e}") from None
        except SyntaxError as e:
            where = "" if os.path.abspath(e.filename or "") == os.path.abspath(path) \
                else f"{e.filename}, "
            raise UserError(f"config {path}: syntax error at {where}line {e.lineno}: "
                            f"{e.msg}") from None
        except AttributeError as e:
            if e.name == "get_config":
                raise UserError(f"config {path} defines no get_config() function") from None
            raise _failed(path, e) from None
        except OSError as e:  # raised inside the file (the deferred error is its cause)
            raise _failed(path, e.__cause__ or e) from None
        except (flags.Error, KeyError, TypeError, ValueError) as e:
            text = str(e).replace("\\n", "\n").strip("'\"")
            # An exception inside get_config() arrives as a whole traceback: keep its last line.
            message = " ".join(text.strip().splitlines()[-1].split()) if "Traceback" in text \
                else " ".join(text.split())
            raise UserError(f"config {path}: {message}") from None
        except Exception as e:  # noqa: BLE001 - the config file's own code failed: bad input
            raise _failed(path, e) from None
    if not isinstance(config, ml_collections.ConfigDict):
        got = "None (no return statement?)" if config is None else type(config).__name__
        raise UserError(f"config {path}: get_config() returned {got}, expected an "
                        "ml_collections.ConfigDict (build on default_config())")
    return config


def _failed(path: str, error: Exception) -> UserError:
    """'config PATH failed: TYPE: MESSAGE (line N)', N the innermost line of the file it passed."""
    line, frame = None, error.__traceback__
    while frame is not None:
        if os.path.abspath(frame.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = frame.tb_lineno
        frame = frame.tb_next
    return UserError(f"config {path} failed: {type(error).__name__}: {' '.join(str(error).split())}"
                     + (f" (line {line})" if line else ""))


def _check_override_key(config: ml_collections.ConfigDict, override: str) -> None:
    if not override.startswith("--config.") or "=" not in override:
        raise UserError(f"unexpected argument {override!r}: overrides look like "
                        "--config.optim.lr=3e-3")
    path = override[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            allowed = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) \
                else "none (not a block)"
            raise UserError(f"unknown config key {'.'.join([*walked, key])!r} in {override}; "
                            f"allowed here: {allowed}")
        node, walked = node[key], [*walked, key]


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path`'s get_config(), applies `--config.x.y=v` overrides, validates.

    Raises:
      UserError: on a missing file, an unknown key, a wrong type or a disallowed value.
    """
    if not os.path.exists(path):
        raise UserError(f"config file {path!r} not found (expected a .py file with get_config())")
    if not path.endswith(".py") or not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a .py file"
        raise UserError(f"config file {path!r} is {kind} (expected a .py file with get_config())")
    model_name, model_overrides = _new_model(overrides)
    if model_name is not None:  # the model block is rebuilt for the new model below
        overrides = [o for o in overrides if o not in model_overrides]
    if overrides:
        base = _parse(path, [])
        for override in overrides:
            _check_override_key(base, override)
    config = _parse(path, overrides)
    if model_name is not None:
        hparams = {}
        for override in model_overrides:
            key, _, value = override[len("--config.model."):].partition("=")
            if key != "name":
                hparams[key] = _literal(value)
        with config.unlocked():
            config.model = model_config(model_name, **hparams)
    validate(config)
    return config


def _new_model(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config.model.name=X` swaps the model: (X, every --config.model.* override), so the
    other model keys are X's hyperparameters, not the config file's model's."""
    model_overrides = [o for o in overrides if o.startswith("--config.model.") and "=" in o]
    names = [o.partition("=")[2] for o in model_overrides
             if o.partition("=")[0] == "--config.model.name"]
    return (names[-1], model_overrides) if names else (None, [])


def _literal(text: str):
    """A command-line value as Python reads it (3, 0.5, (64, 64), True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _schema_errors(config, schema, prefix: str) -> Iterator[str]:
    for key in config:
        name = f"{prefix}{key}"
        if prefix == "model." and key != "name":
            continue  # model hyperparameters are checked against the model registry
        if key not in schema:
            allowed = ", ".join(sorted(schema.keys()))
            yield f"unknown config key {name!r}; allowed here: {allowed}"
            continue
        value, default = config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                yield f"config key {name!r} must be a block of keys, got {value!r}"
            else:
                yield from _schema_errors(value, default, f"{name}.")
        elif default is None:  # a placeholder: None or a value of its declared type
            kind = schema.get_ref(key).get_type()
            if value is not None and not _type_ok(value, kind()):
                yield f"config key {name!r} must be a {kind.__name__} or None, got {value!r}"
        elif not _type_ok(value, default):
            yield f"config key {name!r} must be {type(default).__name__}, got {value!r}"


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _fill_defaults(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    with config.unlocked():
        for key, default in schema.items():
            if key == "model":
                continue  # a model block is complete by construction (model_config)
            if key not in config:
                config[key] = default
            elif isinstance(default, ml_collections.ConfigDict) and isinstance(
                config[key], ml_collections.ConfigDict
            ):
                _fill_defaults(config[key], default)


def validate(config: ml_collections.ConfigDict, check_model: bool = True) -> None:
    """Checks every key, type and name against the schema; fills keys a config left out.

    `check_model=False` leaves the model block unchecked, for a run rebuilt around a module the
    caller passes (its recorded import path may not import here, e.g. a notebook's class).
    """
    schema = default_config()
    for error in _schema_errors(config, schema, ""):
        raise UserError(error)
    _fill_defaults(config, schema)
    try:
        check_dataset_name(config.data.name)
    except UserError as e:
        raise UserError(f"data.name: {e}") from None
    if "name" not in config.model or not isinstance(config.model.name, str):
        raise UserError(f"model block needs a name; allowed: {', '.join(sorted(MODELS))} "
                        "or an import path package.module:Class")
    allowed_hparams = model_hparams(config.model.name) if check_model else {}
    for key in config.model if check_model else ():
        if key != "name" and key not in allowed_hparams:
            allowed = ", ".join(sorted(allowed_hparams)) or "none"
            raise UserError(
                f"unknown config key 'model.{key}' for model {config.model.name!r}; allowed: {allowed}"
            )
    _check_choice("optim.name", config.optim.name, OPTIMIZERS)
    _check_choice("optim.schedule", config.optim.schedule, SCHEDULES)
    from jaxopt_lab.core.builder import check_techniques  # the one importer of techniques

    check_techniques(config)
    check_precision(config.train)
    _check_positive(config, "data.batch_size", "train.steps", "train.eval_every", "train.log_every",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batch_size",
                    "train.grad_accum_steps")
    if config.train.steps_per_call < 0:
        raise UserError("train.steps_per_call must be >= 0 (0 picks it by measurement)")
    for name in ("data.workers", "data.prefetch"):
        section, key = name.split(".")
        if config[section][key] < 0:
            raise UserError(f"{name} must be >= 0, got {config[section][key]}")
    if config.optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0, got {config.optim.lr}")
    for name in ("data.validation_fraction", "loss.label_smoothing"):
        section, key = name.split(".")
        if not 0 <= config[section][key] < 1:
            raise UserError(f"{name} must be in [0, 1), got {config[section][key]}")
    check_population(config.population)  # its keys are checked when the run is built


def check_population(spec: Sequence) -> None:
    """The shape of a config's `population`, ((key, (v0, v1, ...)), ...), checked before anything
    is built; its keys are checked against the run's per-trial values by `member_values` (a
    caller's own loss may bring hparams of its own)."""
    sizes = set()
    for entry in spec:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2
                or not isinstance(entry[0], str) or not isinstance(entry[1], (tuple, list))
                or not entry[1]):
            raise UserError(f"population entry {entry!r} must be (config key, (value, ...))")
        sizes.add(len(entry[1]))
    if len(sizes) > 1:
        raise UserError(f"population value lists differ in length: {sorted(sizes)}")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_positive(config: ml_collections.ConfigDict, *names: str) -> None:
    for name in names:
        section, key = name.split(".")
        if config[section][key] <= 0:
            raise UserError(f"{name} must be > 0, got {config[section][key]}")
