"""Dotted config keys ("optim.lr"): reading, testing and setting one value of a nested config.

A config is a tree of blocks (`ml_collections.ConfigDict`, or the plain dicts of
`ConfigDict.to_dict()`) whose leaves are values; a dotted key names a path from the root. The
functions here only walk that tree: the messages a user sees (an unknown override, a sweep key
that is not a config key) are their callers', which know what the key was for.

>>> config = {"optim": {"lr": 0.1, "name": "adam"}, "seed": 0}
>>> get_key(config, "optim.lr")
0.1
>>> longest_prefix(config, "optim.lrx")
(['optim'], {'lr': 0.1, 'name': 'adam'})
>>> set_key(config, "optim.lr", "0.3", convert=keep_type)
>>> config["optim"]["lr"]
0.3
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections


def is_block(node: Any) -> bool:
    """Whether `node` is a block of keys (a ConfigDict or a dict), not a value."""
    return isinstance(node, (ml_collections.ConfigDict, Mapping))


def longest_prefix(config, dotted: str) -> tuple[list[str], Any]:
    """The longest leading run of `dotted`'s parts that exists in `config`, and the node it
    reaches (`config` itself when not even the first part does).

    The key exists exactly when every part was found; otherwise the first missing part is
    `dotted.split(".")[len(found)]` and the node is the block it is missing from (or a value,
    when the key goes on below a value), so an error can list what is allowed there.
    """
    node, found = config, []
    for part in dotted.split("."):
        if not is_block(node) or part not in node:
            break
        node, found = node[part], [*found, part]
    return found, node


def has_key(config, dotted: str) -> bool:
    """Whether `dotted` names a value or a block of `config`."""
    return len(longest_prefix(config, dotted)[0]) == len(dotted.split("."))


def get_key(config, dotted: str) -> Any:
    """The value (or block) at `dotted`.

    Raises:
      KeyError: naming `dotted`, when it is not in `config`.
    """
    found, node = longest_prefix(config, dotted)
    if len(found) != len(dotted.split(".")):
        raise KeyError(dotted)
    return node


def set_key(config, dotted: str, value: Any,
            convert: Callable[[Any, Any], Any] | None = None) -> None:
    """Replaces the value at `dotted` in place; the key must exist (KeyError otherwise).

    A ConfigDict must be unlocked if the new value's type differs. `convert(old, value)`, where
    given, returns what is stored from the value there now and the new one: `keep_type` casts to
    the old value's type (a population member's numpy float32 learning rate back to float).
    """
    *blocks, leaf = dotted.split(".")
    node = config
    for block in blocks:
        node = node[block]
    old = node[leaf]
    node[leaf] = value if convert is None else convert(old, value)


def keep_type(old: Any, value: Any) -> Any:
    """`value` as the type of `old` (`type(old)(value)`), for `set_key(..., convert=keep_type)`."""
    return type(old)(value)
