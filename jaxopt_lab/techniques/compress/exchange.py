"""The exchange the element-wise compressors share: encode, all-gather, decode and average.

Top-k, random-k, scaled signs and quantization each let a device choose its own encoding (its own
indices, its own scale), so their payloads cannot be summed entry by entry by an all-reduce: each
device all-gathers every device's payload and decodes them all. Receivers add the devices'
decodings one device at a time, in device order, so every device computes the same sum in the
same order and ends with the same mean (the state stays replicated; a scatter-add over all the
gathered pairs at once could be summed in a different order on each GPU, by atomics).

Error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"): a device compresses p = g + e and keeps e' = p - sent, where
sent is exactly what the others will decode from its payload, so nothing is ever lost, only late.

Bytes: `comm_bytes` is the payload of every array this device passes to a collective (size x
itemsize, indices included), except where a population's member sends fewer entries than the
arrays hold (top-k at its own ratio within the largest's k): then its own, `Codec.sent_bytes`.
`comm_bytes_uncompressed` is what the plain all-reduce would pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_lab.core.step import DATA_AXIS, Reducer, data_mean

Payload = dict[str, jax.Array]  # name -> 1-D array; one dtype per name for every tensor


class Codec(NamedTuple):
    """One method's encoding of a flat float32 tensor.

    encode(x [d], key) -> (payload, sent [d]): what this device passes to the all-gather, and the
      dense tensor every receiver decodes from that payload.
    add_decoded(acc [d], payload) -> acc + the tensor that one device's payload encodes.
    sent_bytes(d) -> the bytes this member sends for a tensor of d entries, where its payload
      holds more (a population's largest k); None: the payload's.
    """

    encode: Callable[[jax.Array, jax.Array], tuple[Payload, jax.Array]]
    add_decoded: Callable[[jax.Array, Payload], jax.Array]
    sent_bytes: Callable[[int], Any] | None = None


class ResidualState(NamedTuple):
    """One device's error-feedback memory."""

    residual: Any  # float32 pytree shaped like the params: what is still owed to the others


def nbytes(arrays) -> int:
    """Bytes of the arrays (or shapes) passed to a collective: size x itemsize, summed."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(arrays))


def gather(tree):
    """`all_gather` over DATA_AXIS (a new leading device axis); on a one-device axis just that
    axis, as `data_mean` skips a one-device all-reduce."""
    if jax.lax.axis_size(DATA_AXIS) == 1:
        return jax.tree.map(lambda x: x[None], tree)
    return jax.lax.all_gather(tree, DATA_AXIS)


def init_residual(params) -> ResidualState:
    return ResidualState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))


def elementwise_reducer(codec_for: Callable[[dict], Codec], *, error_feedback: bool,
                        min_size: int) -> Reducer:
    """A Reducer that sends each tensor of at least `min_size` elements through the codec
    `codec_for(hparams)` (a population's member reads its own values there) and all-reduces the
    rest as they are.

    comm_state: ResidualState with error feedback, () without.
    """

    def init(params):
        return init_residual(params) if error_feedback else ()

    def reduce(grads, comm_state, rng, hparams):
        codec = codec_for(hparams)
        leaves, treedef = jax.tree.flatten(grads)
        residuals = (jax.tree.leaves(comm_state.residual) if error_feedback
                     else [None] * len(leaves))
        corrected = [g.astype(jnp.float32) if e is None else g.astype(jnp.float32) + e
                     for g, e in zip(leaves, residuals, strict=True)]
        chosen = [i for i, g in enumerate(leaves) if g.size >= max(min_size, 1)]
        plain = [i for i in range(len(leaves)) if i not in chosen]

        # Encode every chosen tensor; bucket the payloads by name so that each name is one
        # all-gather however many tensors there are (fewer, larger collectives).
        payloads, sent = [], {}
        for i in chosen:
            payload, sent[i] = codec.encode(corrected[i].ravel(), jax.random.fold_in(rng, i))
            payloads.append(payload)
        # Tensors sent as they are keep their own dtype (their residual stays zero).
        unsent = [corrected[i].astype(leaves[i].dtype) for i in plain]
        outputs = dict(zip(plain, data_mean(unsent), strict=True)) if plain else {}
        if chosen:
            names = sorted(payloads[0])
            buckets = gather({k: jnp.concatenate([p[k] for p in payloads]) for k in names})
            sizes = [{k: p[k].size for k in names} for p in payloads]
            sums = _sum_decodings(codec, buckets, sizes, [leaves[i].size for i in chosen])
            count = jax.lax.axis_size(DATA_AXIS)
            for i, total in zip(chosen, sums, strict=True):
                outputs[i] = (total / count).reshape(leaves[i].shape)

        mean = [outputs[i].astype(g.dtype) for i, g in enumerate(leaves)]
        sent_bytes = (sum(codec.sent_bytes(leaves[i].size) for i in chosen)
                      if codec.sent_bytes else nbytes(payloads))
        stats = {"comm_bytes": jnp.float32(sent_bytes + nbytes(unsent)),
                 "comm_bytes_uncompressed": jnp.float32(nbytes(leaves))}
        if error_feedback:
            new = [corrected[i] - sent[i].reshape(corrected[i].shape) if i in sent
                   else residuals[i] for i in range(len(leaves))]
            comm_state = ResidualState(jax.tree.unflatten(treedef, new))
        return jax.tree.unflatten(treedef, mean), comm_state, stats

    return Reducer(init, reduce)


def _sum_decodings(codec: Codec, buckets: Payload, sizes: list[dict[str, int]],
                   lengths: list[int]) -> list[jax.Array]:
    """Each tensor's sum over devices of the decoded payloads, added in device order."""

    def add_device(device, totals):
        row = {k: v[device] for k, v in buckets.items()}
        offsets = dict.fromkeys(row, 0)
        out = []
        for total, size in zip(totals, sizes, strict=True):
            payload = {k: row[k][offsets[k]:offsets[k] + size[k]] for k in row}
            offsets = {k: offsets[k] + size[k] for k in row}
            out.append(codec.add_decoded(total, payload))
        return out

    devices = next(iter(buckets.values())).shape[0]
    zeros = [jnp.zeros((n,), jnp.float32) for n in lengths]
    return jax.lax.fori_loop(0, devices, add_device, zeros)
