"""Which layers a technique touches: `skip` patterns over parameter paths, shared by pruning and
quantization so that both read `skip` the same way.

A parameter's path is what `jax.tree_util.keystr` prints for it in the params tree,
"['Block_0']['Dense_1']['kernel']"; a pattern is a regular expression, and a parameter is skipped
when any pattern matches its path (`re.search`). The default skips the first and the last
multiplying layers (matmul or conv) in the order the model calls them: the layer reading the input
and the one writing the logits, which lose the most accuracy to pruning or quantization (Han et al.
2016; Jacob et al. 2018 keep them at higher precision). `skip=()` touches every layer.

A model whose input goes through a lookup first (a language model's token embedding) has no kernel
there for either technique; its first multiplying layer is the one kept.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax

from jaxopt_lab.core.measure import flops_by_scope
from jaxopt_lab.core.tasks import apply_model
from jaxopt_lab.errors import UserError


def param_paths(params: Any) -> list[str]:
    """Every parameter's path, as the patterns see it."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def touched(params: Any, skip: Sequence[str]) -> Any:
    """A pytree of bools shaped like `params`: True where a technique applies (no pattern in
    `skip` matches the parameter's path)."""
    patterns = [re.compile(p) for p in skip]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(jax.tree_util.keystr(path)) for p in patterns), params)


def layers_in_call_order(model, variables: dict, sample_x) -> list[str]:
    """The module paths of the layers that multiply (own a kernel and run a matmul or conv), in
    the order the model calls them, e.g. ["Conv_0", "Conv_1", "Dense_0"]. Traced, not run."""
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def forward(params, state, x):
        outputs, _, _ = apply_model(model, params, state, x, None, train=False)
        return outputs

    kernels = {path.rsplit("['", 1)[0] for path in param_paths(params)
               if path.endswith("['kernel']")}
    return [scope for scope in flops_by_scope(forward, params, state, sample_x)
            if _prefix(scope) in kernels]


SEAM_FIELDS = ("dot_general_cls", "conv_general_dilated_cls")  # the model seam's fields


def without_seams(model):
    """`model` with its model-seam fields emptied where it has them: the float model under a
    technique's numerics (AQT's injected ops hide the layer order traced below)."""
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) \
        else set()
    empty = {name: None for name in SEAM_FIELDS
             if name in fields and getattr(model, name) is not None}
    return model.clone(**empty) if empty else model


def default_skip(model, variables: dict, sample_x) -> tuple[str, ...]:
    """Patterns for the first and the last multiplying layers (one, if the model has one), read
    from the float model."""
    layers = layers_in_call_order(without_seams(model), variables, sample_x)
    if not layers:
        return ()
    ends = dict.fromkeys((layers[0], layers[-1]))  # ordered, without a repeat
    return tuple("^" + re.escape(_prefix(layer)) for layer in ends)


def abstract_variables(model, sample_x) -> dict:
    """The shapes of `model`'s variables on `sample_x` (nothing runs)."""
    return jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x),
        sample_x)


def default_skip_or(skip: Sequence[str] | None, model, sample_x, missing: str) -> tuple[str, ...]:
    """`skip`, or where it is None the default: the model's first and last multiplying layers,
    traced on `sample_x`. `missing` is the technique's one-line error when either is None."""
    if skip is not None:
        return tuple(skip)
    if model is None or sample_x is None:
        raise UserError(missing)
    return default_skip(model, abstract_variables(model, sample_x), sample_x)


def _prefix(scope: str) -> str:
    """"Block_0/Dense_1" -> "['Block_0']['Dense_1']": the path prefix of the module's params."""
    return "".join(f"['{part}']" for part in scope.split("/"))


def check_patterns(name: str, patterns: Any, default: str) -> tuple[str, ...] | None:
    """`patterns` (a config's layer regexes: prune/quantize `skip`, `train.float32_layers`) as a
    tuple, or None (`default` says what None means); one UserError naming `name` otherwise."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not all(
            isinstance(p, str) for p in patterns):
        raise UserError(f"{name}={patterns!r} must be a tuple of regular expressions over "
                        f"parameter paths (or None for {default})")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise UserError(f"{name}: {pattern!r} is not a regular expression ({error})") from None
    return tuple(patterns)
