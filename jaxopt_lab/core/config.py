"""The core's config: its own blocks (data, model, loss, optim, train, population), reading a
config file with command-line overrides, and checking a config against a schema.

A config is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`; configs build
on `jaxopt_lab.default_config()` (this schema plus every technique's block, assembled by the
composer, `compose/config.py`) and override only what differs. Validation runs before anything
compiles, so a typo costs one line on the terminal rather than a traceback after a minute of JIT.
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

from jaxopt_lab.core.keys import is_block, longest_prefix
from jaxopt_lab.core.precision import check_precision
from jaxopt_lab.data.sources import check_dataset_name
from jaxopt_lab.errors import UserError
from jaxopt_lab.models import MODELS, model_hparams

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lamb")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "one_cycle", "reduce_on_plateau")


def core_config() -> ml_collections.ConfigDict:
    """Every key of the core's blocks, with its default (the MNIST-1D CNN of the paper)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # mnist1d | mnist1d_shuffled | digits | diabetes | python_text | synthetic | tfds:<name>
    # | an import path "package.module:function" returning a Dataset
    c.data.name = "mnist1d"
    c.data.batch_size = 100  # global batch, split over all devices of all processes
    c.data.validation_fraction = 0.1  # carved from train, fixed across seeds; 0 = none
    # fresh examples from the data set's generator as the validation split instead (mnist1d),
    # leaving a paper's train and test splits as they are; 0 = none
    c.data.generated_validation = 0
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
    # Layers kept in float32 under a lower compute_dtype: regular expressions over parameter
    # paths, as `skip` reads them; None = the input-reading and the logits layer; () = none.
    c.train.float32_layers = ml_collections.config_dict.placeholder(tuple)
    # A run directory whose newest checkpoint's model weights (params and e.g. BatchNorm
    # statistics) this run starts from, at step 0 with a fresh optimizer: a fine-tune is a new run.
    c.train.init_from = ml_collections.config_dict.placeholder(str)
    c.train.remat = "none"  # none | full | a jax.checkpoint_policies name (models/remat.py)

    # A population: config keys and one value per member, trained as one vmapped program in one
    # run directory, e.g. (("optim.lr", (1e-3, 3e-3, 1e-2)), ("seed", (0, 1, 2))). Keys: seed,
    # data.seed, optim.lr, optim.weight_decay, optim.momentum, optim.warmup_steps,
    # loss.label_smoothing, techniques.prune.sparsity, techniques.distill.temperature,
    # techniques.distill.alpha, techniques.compress.ratio (topk, randomk),
    # techniques.compress.rank (powersgd). () = one run.
    c.population = ()

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
    parts = path.split(".")
    found, node = longest_prefix(config, path)
    if len(found) < len(parts):
        allowed = ", ".join(sorted(node.keys())) if is_block(node) else "none (not a block)"
        raise UserError(f"unknown config key {'.'.join(parts[:len(found) + 1])!r} in {override}; "
                        f"allowed here: {allowed}")


def parse_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path`'s get_config() and applies `--config.x.y=v` overrides (not yet validated:
    `jaxopt_lab.load_config` does both).

    Raises:
      UserError: on a missing file, a failing config file or an unknown override key.
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


def schema_errors(config, schema, prefix: str = "") -> Iterator[str]:
    """One line per key of `config` that `schema` does not have or whose value has the wrong
    type (model hyperparameters are left to the model registry)."""
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
                yield from schema_errors(value, default, f"{name}.")
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


def fill_defaults(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    """Adds the keys a config left out, with the schema's defaults."""
    with config.unlocked():
        for key, default in schema.items():
            if key == "model":
                continue  # a model block is complete by construction (model_config)
            if key not in config:
                config[key] = default
            elif isinstance(default, ml_collections.ConfigDict) and isinstance(
                config[key], ml_collections.ConfigDict
            ):
                fill_defaults(config[key], default)


def check_names(config: ml_collections.ConfigDict, check_model: bool = True) -> None:
    """The data set, model and optimizer a config names exist.

    `check_model=False` leaves the model block unchecked, for a run rebuilt around a module the
    caller passes (its recorded import path may not import here, e.g. a notebook's class).
    """
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


def check_values(config: ml_collections.ConfigDict) -> None:
    """The core's values are in range (precision, sizes, fractions, the population's shape)."""
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
    _check_warmup(config)
    for name in ("data.validation_fraction", "loss.label_smoothing"):
        section, key = name.split(".")
        if not 0 <= config[section][key] < 1:
            raise UserError(f"{name} must be in [0, 1), got {config[section][key]}")
    _check_validation(config.data)
    check_population(config.population)  # its keys are checked when the run is built


def has_validation(config: ml_collections.ConfigDict) -> bool:
    """Whether the run holds out a validation split (carved from train or generated)."""
    return config.data.validation_fraction > 0 or config.data.generated_validation > 0


def _check_validation(data: ml_collections.ConfigDict) -> None:
    generated = data.generated_validation
    if isinstance(generated, bool) or not isinstance(generated, int) or generated < 0:
        raise UserError(f"data.generated_validation must be an int >= 0, got {generated!r}")
    if generated and data.validation_fraction > 0:
        raise UserError(f"data.generated_validation={generated} and data.validation_fraction="
                        f"{data.validation_fraction} both make a validation split: set one to 0")


def _check_warmup(config: ml_collections.ConfigDict) -> None:
    """A negative warm-up is refused; one longer than the run gets a warning line, not a
    refusal: a short smoke run of a long config (`--config.train.steps=100` on a 200-step
    warm-up) does this on purpose. Nor is it clipped: the value is injected into the optimizer
    state, so a clipped one would differ from the config's again once `train.steps` is extended
    on resume, and config.json would no longer say what trained. (A sweep refuses such a sampled
    value instead: `tune/space.py`, `tune/trials.py`.)"""
    optim, steps = config.optim, config.train.steps
    if optim.warmup_steps < 0:
        raise UserError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if optim.schedule == "warmup_cosine" and optim.warmup_steps > steps:
        print(f"warning: optim.warmup_steps={optim.warmup_steps} exceeds train.steps={steps}: "
              "the learning rate never reaches optim.lr in this run", file=sys.stderr)


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
