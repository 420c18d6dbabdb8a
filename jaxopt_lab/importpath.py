"""Objects named by an import path, "package.module:attribute": a user's own model or data set
named in a config, without registering anything at import."""

from __future__ import annotations

import importlib
import re

from jaxopt_lab.errors import UserError

_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(name: object) -> bool:
    """True for strings shaped like "package.module:attribute"."""
    return isinstance(name, str) and bool(_PATH.fullmatch(name))


def load_object(path: str, what: str):
    """The object `path` names; `what` (e.g. "model.name") names the config key in errors."""
    module_name, _, attribute = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what}={path!r}: cannot import module {module_name!r} ({e})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what}={path!r}: module {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj
