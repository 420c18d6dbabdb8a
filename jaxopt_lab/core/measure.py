"""What a model costs: bytes of its deployable arrays, FLOPs per example, and inference latency.

These are the fields every summary.json, report and results table carries (`model_bytes`,
`flops_per_example`, `latency_ms_batch1`, `latency_ms_batch256`), so every technique is measured
the same way.

FLOPs are counted from the jaxpr, not from XLA's compiled cost analysis: the latter depends on the
backend and undercounts convolutions that GPUs hand to a library (cuDNN), so a pruned or quantized
model would not compare with its float original across machines. The jaxpr is the same everywhere.
Following the convention of papers' FLOP counts, only `dot_general` and `conv_general_dilated` are
counted, at 2 FLOPs per multiply-accumulate; elementwise ops, which matmuls and convs dominate,
are not.

`compiled_memory` reads the device memory a compiled program needs from XLA's own buffer
assignment (`compiled.memory_analysis()`): summary.json's `step_memory` is the loop's compiled
train call's (per device), which is where remat's and sharded parameters' savings show. On XLA:CPU it shows little with the
default scheduler, which favours concurrency over memory; with
`--xla_cpu_enable_concurrency_optimized_scheduler=false` the ResNet's drop is clear
(`tests/test_remat.py`). Accelerators were not measured here.

Latency is the median of warm, compiled runs: these machines are shared and noisy, and a median
ignores the odd slow run that a mean would average in.
"""

import functools
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_lab.core.tasks import inference


def model_bytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree`, as a deployable form stores them (no file metadata).

    Leaves may be jax or numpy arrays or `jax.ShapeDtypeStruct`s (to size a model without building
    it); Python scalars are ignored. Sub-byte dtypes are packed, so an array costs its bit count
    / 8 rounded up: 5 int4 values take 3 bytes, though jax holds each int4 in a byte.

    >>> model_bytes({"w": jnp.zeros((2, 3)), "q": jnp.zeros(5, jnp.int4), "step": 1})
    27
    """
    return sum(
        -(-math.prod(leaf.shape) * _bits(leaf.dtype) // 8)
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )


def _bits(dtype: Any) -> int:
    """Bits per element; `itemsize` alone would say 8 for int4 and float4."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return jnp.dtype(dtype).itemsize * 8


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of `fn(*args, **kwargs)`: 2 per multiply-accumulate of its matmuls and convolutions.

    `args` may be arrays or `jax.ShapeDtypeStruct`s (nothing runs); `kwargs` are bound as static
    (e.g. `train=False`). Inside control flow: a scan counts `length` times, a cond its most
    expensive branch, a while loop one iteration (its trip count is unknown when tracing), and a
    pmap or shard_map body once per device it runs on. A conv counts every output element's full
    window, padding included, as papers do.

    >>> count_flops(jnp.dot, jnp.zeros((2, 3)), jnp.zeros((3, 4)))
    48
    """
    return sum(_scope_flops(fn, args, kwargs).values())


def flops_by_scope(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """`count_flops` split by Flax module path ("Dense_0", "Block_0/Conv_1"), for a per-layer profile.

    Flax names each module call's ops after the module; the root module's own ops are under "".
    """
    return dict(_scope_flops(fn, args, kwargs))


def _scope_flops(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Counter[str]:
    """The one traversal behind count_flops and flops_by_scope: FLOPs by module path."""
    jaxpr = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr
    counts: Counter[str] = Counter()
    for stack, flops in _walk(jaxpr, "").items():
        counts[_module_path(stack)] += flops
    return counts


def _walk(jaxpr: Any, scope: str) -> Counter[str]:
    """FLOPs by name stack of `jaxpr` and every jaxpr nested in its eqns' params.

    Sub-jaxprs are found by type, not by primitive name, so jit, remat, custom_jvp/vjp, scan,
    cond, while, pmap and shard_map are all handled, under whatever names a JAX version gives them.
    A nested jaxpr's name stacks are relative to the eqn that holds it, hence `scope`.
    """
    counts: Counter[str] = Counter()
    for eqn in jaxpr.eqns:
        here = "/".join(s for s in (scope, str(eqn.source_info.name_stack)) if s)
        flops = _eqn_flops(eqn)
        if flops:
            counts[here] += flops
        for value in eqn.params.values():
            values = value if isinstance(value, tuple | list) else (value,)
            options = [o for o in map(_open, values) if o is not None]
            if not options:
                continue
            # A tuple of jaxprs holds alternatives (cond's branches), of which one runs.
            sub = max((_walk(o, here) for o in options), key=lambda c: sum(c.values()))
            repeats = _repeats(eqn.params)
            for key, n in sub.items():
                counts[key] += repeats * n
    return counts


def _open(value: Any) -> Any:
    """The Jaxpr in `value` (a Jaxpr, or a ClosedJaxpr wrapping one), else None."""
    if hasattr(value, "eqns"):
        return value
    inner = getattr(value, "jaxpr", None)
    return inner if hasattr(inner, "eqns") else None


def _repeats(params: dict[str, Any]) -> int:
    """How many times an eqn runs its sub-jaxprs: scan's length, or once per pmap/shard_map device."""
    if "length" in params:  # scan
        return params["length"]
    if "axis_size" in params:  # xla_pmap; newer JAX traces pmap as a shard_map instead
        return params["axis_size"]
    mesh = params.get("mesh")
    if mesh is not None:  # shard_map: the body sees one shard, on every device of its manual axes
        # The axes this shard_map makes manual: `manual_axes` in JAX 0.7, `newly_manual_axes` in
        # 0.10. Counting the whole mesh instead would multiply by its auto axes too.
        manual = params.get("manual_axes", params.get("newly_manual_axes", mesh.axis_names))
        return math.prod(mesh.shape[a] for a in manual)
    return 1


def _eqn_flops(eqn: Any) -> int:
    """2 × multiply-accumulates of a dot_general or conv_general_dilated eqn; 0 for any other."""
    name = eqn.primitive.name
    out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if name == "dot_general":
        (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * out * math.prod(lhs[d] for d in lhs_contracting)
    if name == "conv_general_dilated":
        # Each output element sums over the kernel's window and its input features (already per
        # group in the kernel's shape): every kernel dimension but the output features.
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * out * math.prod(rhs) // out_features
    return 0


def _module_path(name_stack: str) -> str:
    """Flax module path from a name stack like "MLP/MLP._dense/Dense_0": "Dense_0".

    Flax scopes each module call as "name" or "name.method"; a method calling another method of
    the same module repeats the name, so repeats are merged. The first scope is the root module,
    which no variable path names, so it is dropped.
    """
    parts: list[str] = []
    for part in name_stack.split("/"):
        module = part.split(".")[0]
        if module and (not parts or parts[-1] != module):
            parts.append(module)
    return "/".join(parts[1:])


def latency_ms(
    apply_fn: Callable[..., Any],
    sample_x: Any,
    batch_size: int,
    *,
    variables: Any = None,
    warmup: int = 2,
    runs: int = 10,
) -> float:
    """Median wall time, in ms, of a compiled `apply_fn` on a batch of `batch_size` inputs.

    The batch is zeros shaped like `sample_x` ([1, ...]) but with `batch_size` rows, on the default
    device. Compilation and `warmup` calls come before the `runs` timed ones, each synchronized.

    With `variables`, `apply_fn(variables, x)` is called and they are passed as arguments: arrays
    a function closes over are compiled in as constants, which XLA folds (dequantizing int8
    weights at compile time, say), so the time would not be the deployed model's.
    """
    x = jnp.zeros((batch_size, *sample_x.shape[1:]), sample_x.dtype)
    args = (x,) if variables is None else (variables, x)
    compiled = jax.jit(apply_fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_model(
    model: Any, variables: Any, sample_x: Any, *, batch_sizes: tuple[int, ...] = (1, 256)
) -> dict[str, float | int]:
    """The summary fields of a Flax linen `model`: bytes, FLOPs per example and latencies.

    `variables` are all its collections ({"params": ..., "batch_stats": ...}); `sample_x` is one
    input, [1, *input_shape], in the model's input dtype. The model runs in inference mode with a
    "params" rng, which AQT layers draw at apply time (other models ignore it), exactly as the
    task's evaluation calls it (`core/tasks.py::apply_model`). Each batch size b
    gives a `latency_ms_batch{b}` key.
    """
    apply = inference(model)
    result: dict[str, float | int] = {
        "model_bytes": model_bytes(variables),
        "flops_per_example": count_flops(apply, variables, sample_x[:1]),
    }
    for b in batch_sizes:
        result[f"latency_ms_batch{b}"] = latency_ms(apply, sample_x, b, variables=variables)
    return result


def compiled_memory(jitted: Any, *args: Any) -> dict[str, int]:
    """Bytes per device of `jitted`'s compiled program for `args` (XLA's memory analysis;
    `jax.stages.Compiled.memory_analysis`): arguments, outputs, temporaries, and `peak_bytes` =
    their sum less the outputs that reuse donated arguments' buffers. {} where the backend gives
    none. `args` may be arrays (donated ones too: only their shapes and shardings are read) or
    ShapeDtypeStructs; where `jitted` was called with such arguments, its compilation is reused.
    """
    stats = jitted.lower(*args).compile().memory_analysis()
    if stats is None:
        return {}
    sizes = {"argument_bytes": stats.argument_size_in_bytes,
             "output_bytes": stats.output_size_in_bytes,
             "temp_bytes": stats.temp_size_in_bytes,
             "alias_bytes": stats.alias_size_in_bytes}
    peak = (sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"]
            - sizes["alias_bytes"])
    return {**{k: int(v) for k, v in sizes.items()}, "peak_bytes": int(peak)}
