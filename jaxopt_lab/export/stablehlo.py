"""A run's deployed form as a StableHLO artifact (`jaxopt-lab export`, the default `--to`).

FILE holds the serialized `jax.export.Exported` of `x -> outputs`, the run's variables inside it
as constants and its batch dimension symbolic, so it serves any batch size. Loading it needs jax
alone, not jaxopt_lab:

    import jax, numpy as np
    with open("model.stablehlo", "rb") as f:
        model = jax.export.deserialize(bytearray(f.read()))
    x = np.zeros((8, *model.in_avals[0].shape[1:]), model.in_avals[0].dtype)
    outputs = model.call(x)
"""

from __future__ import annotations

import jax
import numpy as np

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def write_stablehlo(apply, variables, sample: np.ndarray, out: str,
                    platforms: tuple[str, ...] = ()) -> dict:
    """Writes `apply(variables, x)` for a symbolic batch to `out`; returns what the metadata
    adds: the output signature and the platforms it lowers for (default: this backend)."""
    (batch,) = jax.export.symbolic_shape("batch")
    signature = jax.ShapeDtypeStruct((batch, *sample.shape[1:]), sample.dtype)
    exported = jax.export.export(jax.jit(lambda x: apply(variables, x)),
                                 platforms=platforms or None)(signature)
    with open(out, "wb") as f:
        f.write(exported.serialize())
    output = exported.out_avals[0]
    return {"output": {"shape": ["batch", *output.shape[1:]], "dtype": str(output.dtype)},
            "platforms": list(exported.platforms), "jax": jax.__version__}
