"""What to quantize and how, and the AQT configurations that say it to AQT.

AQT (`aqtp`) is the one source of quantization numerics here: these options only choose among
its configurations (`aqt.jax.v2.config`) and quantizers; nothing in this package rounds a number
itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from aqt.jax.v2 import aqt_quantizer
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax_calibration

from jaxopt_lab.core.layers import check_patterns
from jaxopt_lab.errors import UserError

NUMERICS = ("int", "fp8_e4m3", "fp8_e5m2")
BACKWARDS = ("float", "quantized")
BITS = (8, 4)
# Gradients of fully quantized training: int8 with stochastic rounding (AQT's fully_quantized),
# or, with fp8 forward numerics, e5m2 — the wider range gradients need (Micikevicius et al. 2022).
_FP8_BACKWARD = "e5m2"
QUANT_COLLECTION = "aqt"  # where AQT's frozen weights and calibration statistics live


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """One quantization scheme.

    Attributes:
      bits: 8 or 4, for integer numerics (fp8 is 8 bits by definition).
      numerics: "int" (symmetric integers), "fp8_e4m3" or "fp8_e5m2".
      backward: "float" (forward-only QAT: gradients in float through AQT's straight-through
        estimator) or "quantized" (fully quantized training: both backward matmuls too, AQT's
        `dlhs` and `drhs`, gradients stochastically rounded). Convs always have float backward.
      per_channel: one scale per output channel of each weight; False: one per weight tensor.
      activations: quantize the inputs of every quantized layer too (the w8a8 scheme, int8 × int8
        arithmetic); False quantizes weights only (w8: int8 storage, float arithmetic).
      attention: with `activations`, also quantize attention's QKᵀ and weights×V (no weights).
      static_activations: activation scales calibrated once (post-training quantization, stored
        in the "aqt" collection) instead of measured on every batch.
      skip: regular expressions over parameter paths of the layers left in float (the shared
        convention of core/layers.py); None is the default, the first and last layers.
    """

    bits: int = 8
    numerics: str = "int"
    backward: str = "float"
    per_channel: bool = True
    activations: bool = True
    attention: bool = True
    static_activations: bool = False
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.numerics not in NUMERICS:
            raise UserError(f"quantize numerics={self.numerics!r} is unknown; allowed: "
                            f"{', '.join(NUMERICS)}")
        if self.bits not in BITS:
            raise UserError(f"quantize bits={self.bits!r} is not supported; allowed: 8, 4")
        if self.numerics != "int" and self.bits != 8:
            raise UserError(f"quantize bits={self.bits} with numerics={self.numerics!r}: fp8 "
                            "is 8 bits; allowed: bits=8")
        if self.backward not in BACKWARDS:
            raise UserError(f"quantize backward={self.backward!r} is unknown; allowed: "
                            f"{', '.join(BACKWARDS)}")
        if self.static_activations and not self.activations:
            raise UserError("quantize static_activations=True needs activations=True")
        object.__setattr__(self, "skip", check_patterns("quantize skip", self.skip,
                                                        "the first and last layers"))

    @property
    def forward_bits(self) -> int | str:
        """The argument AQT takes for these numerics: an integer bit count or an fp8 name."""
        return self.bits if self.numerics == "int" else self.numerics.removeprefix("fp8_")

    @property
    def scheme(self) -> str:
        """The serving scheme these options train for: "w8a8", "w8", "w4a4", "fp8_e4m3"…"""
        if self.numerics != "int":
            return self.numerics if self.activations else f"w{self.numerics}"
        return f"w{self.bits}a{self.bits}" if self.activations else f"w{self.bits}"

    def describe(self) -> dict:
        """What a run's summary.json records."""
        return {"scheme": self.scheme, "numerics": self.numerics,
                "bits": 8 if self.numerics != "int" else self.bits, "backward": self.backward,
                "per_channel": self.per_channel, "activations": self.activations,
                "attention": self.attention, "static_activations": self.static_activations,
                "skip": None if self.skip is None else list(self.skip)}


def dot_general_config(options: QuantizeOptions, *, rhs_is_weight: bool):
    """AQT's DotGeneral config for a matmul: `rhs_is_weight` False for activation × activation
    (attention), where per-channel weight scales do not apply and both sides follow
    `activations`."""
    bits = options.forward_bits
    lhs_bits = bits if options.activations else None
    rhs_bits = bits if rhs_is_weight else lhs_bits
    if options.backward == "quantized":
        backward_bits = 8 if options.numerics == "int" else _FP8_BACKWARD
        cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=backward_bits, drhs_bits=backward_bits)
    else:
        cfg = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
        backward_bits = None
    aqt_config.set_bits(cfg, fwd_lhs_bit=lhs_bits, fwd_rhs_bit=rhs_bits,
                        dlhs_lhs_bit=backward_bits, dlhs_rhs_bit=backward_bits,
                        drhs_lhs_bit=backward_bits, drhs_rhs_bit=backward_bits)
    if options.backward == "quantized":
        # The incoming gradient is the lhs of both backward matmuls: round it stochastically
        # (unbiased), the weights and activations it meets to nearest (AQT's config_v4 choice).
        aqt_config.set_stochastic_rounding(cfg, vjp_lhs_stochastic_rounding=True,
                                           vjp_rhs_stochastic_rounding=False,
                                           implementation="jax.uniform")
    else:
        aqt_config.set_stochastic_rounding(cfg, False, False, "jax.uniform")
    if rhs_is_weight and not options.per_channel:
        cfg.fwd.dg_quantizer.rhs.calib_shared_axes = "per_tensor"
    if options.static_activations:
        cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
        cfg.fwd.dg_quantizer.lhs.calibration = functools.partial(
            aqt_flax_calibration.MeanOfAbsMaxCalibration, quant_collection=QUANT_COLLECTION)
    return cfg


def tensor_quantizer(options: QuantizeOptions, *, static: bool = False):
    """AQT's quantizer of one tensor (a conv's kernel or input) in these numerics; `static` takes
    its scale from calibration statistics instead of the tensor's own absolute maximum."""
    quantizer = aqt_quantizer.quantizer_make(options.forward_bits, initialize_calibration=False)
    if static:
        quantizer.calibration = functools.partial(
            aqt_flax_calibration.MeanOfAbsMaxCalibration, quant_collection=QUANT_COLLECTION)
    quantizer.init_calibration()
    return quantizer


def quantize_options(**options) -> QuantizeOptions:
    """`QuantizeOptions(**options)`, with a one-line error for a name it does not have."""
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserError(f"unknown quantize option(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(fields))}")
    skip = options.get("skip")
    if isinstance(skip, Sequence) and not isinstance(skip, str):
        options["skip"] = tuple(skip)
    return QuantizeOptions(**options)
