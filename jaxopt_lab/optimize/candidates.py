"""The candidates `jaxopt-lab optimize` builds: each a set of config overrides and the conversions
that turn its trained run into what it deploys.

A recipe is written as `--config.KEY=VALUE` strings on top of the user's own config and overrides,
so every candidate is a run anyone can retrain with `jaxopt-lab train` (its config.json holds
them), and candidates that differ only in values (sparsities) are one population run. The
techniques themselves are untouched: pruning, AQT and distillation are switched on by config, and
`prune.shrink_run` / `quantize.quantize_run` turn the result into its deployable form.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from jaxopt_lab.errors import UserError
from jaxopt_lab.models import model_hparams, width_keys

NAMES = ("structured", "unstructured", "int8", "distill", "distill_structured", "structured_int8",
         "distill_structured_int8")
OBJECTIVES = ("size_latency", "latency", "size")
RUNTIMES = ("xla", "onnxruntime", "openvino")
CALIBRATION_BATCHES = 10  # training batches for the static activation scales ONNX runtimes serve


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training run of the pipeline and what is made from it.

    `sparsities` non-empty: the run is a population over `techniques.prune.sparsity`, one
    candidate per member. `shrink`: each member's removed channels are cut (`prune.shrink_run`).
    `quantize`: the (shrunk) run is converted to its int8 serving form (`quantize.quantize_run`).
    """

    name: str
    overrides: tuple[str, ...]
    techniques: tuple[str, ...]
    sparsities: tuple[float, ...] = ()
    shrink: bool = False
    quantize: bool = False


def check_block(block: ml_collections.ConfigDict) -> None:
    """The `optimize` block's values, each wrong one a UserError naming it."""
    unknown = [c for c in block.candidates if c not in NAMES]
    if unknown or not block.candidates:
        raise UserError(f"optimize.candidates={tuple(block.candidates)!r}: "
                        f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; "
                        f"allowed: {', '.join(NAMES)}")
    for key in ("structured_sparsities", "unstructured_sparsities"):
        values = tuple(block[key])
        if not values or not all(isinstance(v, int | float) and 0 < v < 1 for v in values):
            raise UserError(f"optimize.{key}={values!r}: give one or more fractions in (0, 1)")
    if block.max_accuracy_drop < 0:
        raise UserError(f"optimize.max_accuracy_drop={block.max_accuracy_drop}: must be >= 0 "
                        "(points of validation accuracy)")
    if block.objective not in OBJECTIVES:
        raise UserError(f"optimize.objective={block.objective!r} is unknown; allowed: "
                        f"{', '.join(OBJECTIVES)}")
    if block.runtime not in RUNTIMES:
        raise UserError(f"optimize.runtime={block.runtime!r} is unknown; allowed: "
                        f"{', '.join(RUNTIMES)}")
    bad = [s for s in block.student if not str(s).startswith("--config.")]
    if bad:
        raise UserError(f"optimize.student: {bad[0]!r} is not a --config.KEY=VALUE override")


def student_overrides(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`optimize.student` where given, else the model's width hyperparameters halved (the
    ones its class names, `models.width_keys`)."""
    if config.optimize.student:
        return tuple(config.optimize.student)
    name = config.model.name
    keys = width_keys(name)
    if not keys:
        raise UserError(f"optimize: model {name!r} has no known width to halve for the "
                        "distillation student; set optimize.student (e.g. "
                        "\"--config.model.KEY=VALUE\" strings) or drop 'distill' from "
                        "optimize.candidates")
    defaults = model_hparams(name)
    overrides = []
    for key in keys:
        value = config.model.get(key, defaults[key])
        half = (tuple(max(1, int(v) // 2) for v in value) if isinstance(value, tuple | list)
                else max(1, int(value) // 2))
        overrides.append(f"--config.model.{key}={half!r}")
    return tuple(overrides)


def recipes(config: ml_collections.ConfigDict, baseline_dir: str) -> list[Recipe]:
    """The recipes `config.optimize.candidates` lists, in that order; `baseline_dir` teaches
    the distilled students."""
    block = config.optimize
    check_block(block)
    int8 = ("--config.techniques.quantize.method=qat", "--config.techniques.quantize.skip=()",
            f"--config.techniques.quantize.activations={quantize_scheme(block.runtime) == 'w8a8'}")

    def pruning(pattern: str, sparsities, skip_none: bool) -> tuple[str, ...]:
        return ("--config.techniques.prune.method=magnitude",
                f"--config.techniques.prune.pattern={pattern}",
                *(("--config.techniques.prune.skip=()",) if skip_none else ()),
                ("--config.population=(('techniques.prune.sparsity', "
                 f"{tuple(float(s) for s in sparsities)!r}),)"))

    structured = tuple(block.structured_sparsities)
    unstructured = tuple(block.unstructured_sparsities)
    channels = pruning("channels", structured, skip_none=False)  # first and last layers whole
    distill = (*student_overrides(config),
               f"--config.techniques.distill.teacher={os.path.abspath(baseline_dir)}")
    table = {
        "structured": Recipe("structured", channels, ("prune channels", "shrink"), structured,
                             shrink=True),
        "unstructured": Recipe("unstructured", pruning("unstructured", unstructured, True),
                               ("prune unstructured", "compact encoding"), unstructured),
        "int8": Recipe("int8", int8, ("int8 QAT",), quantize=True),
        "distill": Recipe("distill", distill, ("distill (half width)",)),
        "distill_structured": Recipe(
            "distill_structured", distill + channels, ("distill (half width)", "prune channels",
                                                       "shrink"), structured, shrink=True),
        "structured_int8": Recipe("structured_int8", channels + int8,
                                  ("prune channels", "shrink", "int8 QAT"), structured,
                                  shrink=True, quantize=True),
        "distill_structured_int8": Recipe(
            "distill_structured_int8", distill + channels + int8,
            ("distill (half width)", "prune channels", "shrink", "int8 QAT"), structured,
            shrink=True, quantize=True),
    }
    return [table[name] for name in block.candidates]


def quantize_scheme(runtime: str) -> str:
    """The serving scheme matching how `recipes` trains int8. XLA on a CPU serves int8 weights
    with float arithmetic (int8 × int8 is slower there: results/quantize_*.md): w8; ONNX runtimes
    and accelerators with int8 units run int8 products: w8a8, with static activation scales."""
    return "w8" if runtime == "xla" and jax.default_backend() == "cpu" else "w8a8"


def calibration_batches(runtime: str) -> int:
    """Training batches calibrating static activation scales: ONNX runtimes need them (0: the
    QAT run's per-example scales, which XLA serves)."""
    return 0 if runtime == "xla" else CALIBRATION_BATCHES
