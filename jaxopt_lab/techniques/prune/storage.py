"""Compact storage of pruned weights: what a sparse model really costs to ship.

A mask alone saves nothing: the zeros are still stored. Here each pruned kernel is stored as its
non-zero values (in the weights' dtype) plus where they are, in one of two encodings:

- "bitmask": one bit per weight (`np.packbits`), so v + 1 / (8 p) bytes per non-zero for
  v-byte values at density p. Best at moderate sparsity.
- "relative_index" (Han et al. 2016, "Deep Compression", §3): per non-zero, the number of zeros
  skipped since the previous entry as an unsigned `index_bits`-bit integer (packed 8 // bits per
  byte). A run longer than the largest such integer, 2**bits - 1, is bridged by filler entries:
  a zero value at skip 2**bits - 1. That costs (v + bits / 8) bytes per entry, i.e. per non-zero
  times (1 + F) with F ≈ q / (1 - q) fillers, q = (1 - p) ** 2**bits, for randomly placed zeros.
  Best at high sparsity: it beats the bitmask once bits / 8 < 1 / (8 p) (density below 1 / bits)
  while fillers stay rare.

The default `index_bits` is 8 (Deep Compression's width for conv layers): with float32 values,
8-bit indices win beyond about 88 % sparsity (5.0 vs 5.25 bytes per non-zero at 90 %, 5.4 vs 16.5
at 99 %). 4-bit indices hardly ever win with float32 values: by the density (< 25 %) at which a
half-byte index beats the mask, fillers carrying a full 4-byte value eat the gain (30 vs 16.5
bytes per non-zero at 99 %). Deep Compression paired short indices with 5–8-bit quantized
values, where fillers are cheap.

"Non-zero" means any bit set, so -0.0 and NaN are kept as values and decoding is bitwise exact.
Shapes are not stored: they are the model's metadata (`like` in `decode`, e.g.
`jax.eval_shape` of the model's init), and `model_bytes` counts arrays only (DESIGN, Measurement).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_lab.core.measure import model_bytes
from jaxopt_lab.errors import UserError

ENCODINGS = ("bitmask", "relative_index")
INDEX_BITS = (4, 8)  # widths that pack whole into bytes


def encode(params: Any, encoding: str, paths: Sequence[str] | None = None,
           index_bits: int = 8) -> dict[str, Any]:
    """The deployable form of `params`: {path: array} for dense leaves, {path: {"values": ...,
    encoding: uint8 array}} for the encoded ones.

    Args:
      params: a pytree of arrays (jax or numpy), e.g. a pruned model's params.
      encoding: one of `ENCODINGS`.
      paths: the leaves to encode, as `jax.tree_util.keystr` prints their paths; None = every
        "['kernel']" leaf with ndim >= 2 (what pruning touches). Other leaves stay dense.
      index_bits: width of a relative index, one of `INDEX_BITS`.
    """
    if encoding not in ENCODINGS:
        raise UserError(f"prune storage encoding {encoding!r} is not one of {ENCODINGS}")
    _check_bits(index_bits)
    leaves = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
    chosen = _chosen(leaves, paths)
    return {path: _encode_leaf(x, encoding, index_bits) if path in chosen else x
            for path, x in leaves.items()}


def decode(encoded: dict[str, Any], like: Any, index_bits: int = 8) -> Any:
    """`params` again, bitwise, from `encode`'s output.

    Args:
      encoded: what `encode` returned.
      like: a pytree with the params' structure and shapes (arrays or `jax.ShapeDtypeStruct`s).
      index_bits: the width `encode` used.
    """
    _check_bits(index_bits)

    def leaf(path, x):
        stored = encoded[jax.tree_util.keystr(path)]
        return _decode_leaf(stored, x.shape, index_bits) if isinstance(stored, dict) else stored

    return jax.tree_util.tree_map_with_path(leaf, like)


def encoded_bytes(params: Any, paths: Sequence[str] | None = None,
                  index_bits: int = 8) -> dict[str, int]:
    """`model_bytes` of each encoded form: values, masks or packed indices, and dense leaves.

    Shapes are not counted (metadata, as the dense count leaves them out too); compare with
    `model_bytes(params)`, the dense model's.
    """
    return {f"model_bytes_{e}": model_bytes(encode(params, e, paths, index_bits))
            for e in ENCODINGS}


def _check_bits(index_bits: int) -> None:
    if index_bits not in INDEX_BITS:
        raise UserError(f"prune storage index_bits={index_bits!r} is not one of {INDEX_BITS}")


def _chosen(leaves: dict[str, np.ndarray], paths: Sequence[str] | None) -> set[str]:
    if paths is None:
        return {p for p, x in leaves.items() if p.endswith("['kernel']") and x.ndim >= 2}
    unknown = [p for p in paths if p not in leaves]
    if unknown:
        raise UserError(f"prune storage: no parameter at path {unknown[0]} (paths look like "
                        f"{next(iter(leaves), '')})")
    return set(paths)


def _nonzero(flat: np.ndarray) -> np.ndarray:
    """Where any bit is set: -0.0 == 0 numerically but would not round-trip as a zero."""
    return flat.view(np.dtype(f"u{flat.dtype.itemsize}")) != 0


def _encode_leaf(x: np.ndarray, encoding: str, index_bits: int) -> dict[str, np.ndarray]:
    flat = np.ascontiguousarray(x).reshape(-1)
    keep = _nonzero(flat)
    if encoding == "bitmask":
        return {"values": flat[keep], "bitmask": np.packbits(keep)}
    positions = np.flatnonzero(keep)
    span = 2**index_bits  # positions one entry can advance: up to 2**bits - 1 zeros, then itself
    skips = np.diff(positions, prepend=-1) - 1
    fillers = skips // span
    counts = fillers + 1  # entries per non-zero: its fillers, then itself
    last = np.cumsum(counts) - 1
    gaps = np.full(int(counts.sum()), span - 1, np.uint8)
    gaps[last] = skips - fillers * span
    values = np.zeros(gaps.size, flat.dtype)
    values[last] = flat[positions]
    return {"values": values, "relative_index": _pack(gaps, index_bits)}


def _decode_leaf(stored: dict[str, np.ndarray], shape: tuple[int, ...],
                 index_bits: int) -> np.ndarray:
    values = stored["values"]
    size = math.prod(shape)
    flat = np.zeros(size, values.dtype)
    if "bitmask" in stored:
        flat[np.unpackbits(stored["bitmask"], count=size).astype(bool)] = values
    else:
        packed = stored["relative_index"]
        if packed.size != -(-values.size * index_bits // 8):
            raise UserError(f"prune storage: {packed.size} index bytes do not hold "
                            f"{values.size} {index_bits}-bit indices; decode with the encoding's "
                            "index_bits")
        gaps = _unpack(packed, index_bits, values.size)
        # Fillers land on positions that were zero, so writing their zero values is harmless.
        flat[np.cumsum(gaps.astype(np.int64) + 1) - 1] = values
    return flat.reshape(shape)


def _pack(gaps: np.ndarray, bits: int) -> np.ndarray:
    """`bits`-bit integers, 8 // bits per byte, the first in the high bits (odd tail padded)."""
    per = 8 // bits
    grouped = np.pad(gaps, (0, -gaps.size % per)).reshape(-1, per)
    return np.bitwise_or.reduce(grouped << _shifts(bits), axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    return ((packed[:, None] >> _shifts(bits)) & (2**bits - 1)).reshape(-1)[:count]


def _shifts(bits: int) -> np.ndarray:
    return np.arange(8 // bits - 1, -1, -1, dtype=np.uint8) * bits
