"""The docs do not drift from the code: README.md and docs/*.md are checked against the CLI, the
config schema, the model registry and the repository's files. Fast: nothing trains or compiles.

- Every `jaxopt-lab ...` command line in a shell code block (``` bash / sh / console / none) parses
  with the CLI's own parser. Backslash-continued lines are joined and a leading `$ ` is stripped;
  env assignments before the command (`XLA_FLAGS=... jaxopt-lab train ...`) and a command quoted
  inside another (`gcloud ... --command="... jaxopt-lab train ..."`) are found too, and
  `jaxopt-lab launch -n 2 -- train ...` parses the inner command as well. Extra arguments are
  allowed, as `jaxopt_lab.cli.main` allows them, only after the commands that take config
  overrides, and only as `--config.KEY=VALUE`.
- A `train`, `sweep`, `optimize` or `profile` command whose --config file is in the repository
  loads with its overrides through `load_config` (which validates keys and values).
- Every `--config.KEY` named anywhere in those files (command lines, comments and prose) is a key
  of `default_config()`; a `model.*` key is one of some registry model's hyperparameters.
- Relative links in README.md, docs/*.md and results/README.md resolve; every results/*.md is
  listed in results/README.md and every docs page in docs/README.md; backticked repository paths
  (`configs/x.py`, `core/step.py` meaning jaxopt_lab/core/step.py) and dotted `jaxopt_lab.x.y`
  names exist, and every `from jaxopt_lab... import ...` in a python code block imports.

Allowed placeholders: a command line containing `...` is skipped (keep the docs concrete: there are
none today), and `--config.KEY` in capitals is a placeholder the key scan does not match.
Each check asserts how many items it found, so a scan that finds nothing fails.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from jaxopt_lab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS_INDEX = ROOT / "results" / "README.md"
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
# The commands after which cli.main hands the unknown arguments to load_config as overrides.
OVERRIDABLE = ("train", "sweep", "optimize", "profile")
KEY = re.compile(r"--config\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
REPO_PATH = re.compile(r"^[\w.-]+(/[\w.-]+)+(\.(py|ipynb|sh|md|json|png|txt|toml|cfg)|/)$")
DOTTED = re.compile(r"^jaxopt_lab(\.[A-Za-z_]\w*)+$")
# First path components that name a run's or a user's files, not the repository's.
NOT_REPO = {"runs", "RUN", "DIR", "WORKDIR", "my_pkg"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _shell_lines(path: Path):
    """(line number, logical line) of the shell code blocks in `path`."""
    block, pending, start = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            block = fence[3:].strip().lower() if block is None else None
            pending = ""
            continue
        if block not in SHELL_BLOCKS:
            continue
        if not pending:
            start = number
        pending += line.strip() if not pending else " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        logical, pending = pending, ""
        yield start, logical.removeprefix("$ ")


def _invocations(tokens: list[str]) -> list[list[str]]:
    """The argument lists of the `jaxopt-lab` commands in one shell line's tokens."""
    for i, token in enumerate(tokens):
        if os.path.basename(token) == "jaxopt-lab":
            return [tokens[i + 1:]]
        if "jaxopt-lab " in token:  # a command quoted inside another: ssh --command="..."
            inner = token.split("=", 1)[1] if token.startswith("-") else token
            return [argv for part in inner.split("&&")
                    for argv in _invocations(shlex.split(part, comments=True))]
    return []


def _commands():
    """(where, argv) of every documented command line; argv without the program name."""
    found = []
    for path in DOCS:
        for number, line in _shell_lines(path):
            if "jaxopt-lab" not in line or "..." in line:
                continue
            where = f"{_rel(path)}:{number}"
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                pytest.fail(f"{where}: cannot split {line!r}: {e}")
            found += [(where, argv) for argv in _invocations(tokens)]
    return found


def _parse(where: str, argv: list[str]):
    """The parsed arguments and config overrides of one command line, as cli.main parses them."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `jaxopt-lab {shlex.join(argv)}` does not parse: "
                    f"{stderr.getvalue().strip()}")
    bad = [e for e in extra if args.command not in OVERRIDABLE or not e.startswith("--config.")]
    assert not bad, f"{where}: `jaxopt-lab {shlex.join(argv)}`: unrecognized arguments {bad}"
    if args.command == "launch":
        inner = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        assert inner, f"{where}: `jaxopt-lab {shlex.join(argv)}` launches nothing"
        return _parse(where, inner)
    return args, extra


def test_documented_commands_parse():
    commands = _commands()
    for where, argv in commands:
        _parse(where, argv)
    assert len(commands) >= 40, f"found only {len(commands)} jaxopt-lab command lines"
    assert len({where.split(":")[0] for where, _ in commands}) >= 10


def test_documented_configs_load_with_their_overrides():
    from jaxopt_lab import load_config

    parsed = [(where, *_parse(where, argv)) for where, argv in _commands()]
    # Runs the docs train first (a teacher, say): a config naming one cannot load before it exists.
    workdirs = {args.workdir for _, args, _ in parsed if getattr(args, "workdir", None)}
    loaded = 0
    for where, args, overrides in parsed:
        config = getattr(args, "config", None)
        if args.command in OVERRIDABLE and config and (ROOT / config).is_file():
            try:
                load_config(str(ROOT / config), overrides)
            except Exception as e:  # noqa: BLE001 -- name the line, whatever the error
                if not any(f"{workdir}'" in str(e) for workdir in workdirs):
                    pytest.fail(f"{where}: {config} {' '.join(overrides)}: "
                                f"{type(e).__name__}: {e}")
            loaded += 1
    assert loaded >= 25, f"loaded only {loaded} documented configs"


def _schema_has(schema, key: str, model_keys: set[str]) -> bool:
    parts = key.split(".")
    if parts[0] == "model" and len(parts) == 2:
        return parts[1] in model_keys
    node = schema
    for part in parts:
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def test_documented_config_keys_exist():
    from jaxopt_lab import default_config
    from jaxopt_lab.models import MODELS, model_hparams

    schema = default_config()
    model_keys = {"name"}.union(*(model_hparams(name) for name in MODELS))
    named = {}
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for key in KEY.findall(line):
                named.setdefault(key, f"{_rel(path)}:{number}")
    unknown = {key: where for key, where in named.items()
               if not _schema_has(schema, key, model_keys)}
    assert not unknown, f"config keys not in the schema: {unknown}"
    assert len(named) >= 60, f"found only {len(named)} distinct --config keys"


def test_relative_links_resolve():
    checked, broken = 0, []
    for path in [*DOCS, RESULTS_INDEX]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue
                checked += 1
                if not (path.parent / target.split("#")[0]).exists():
                    broken.append(f"{_rel(path)}:{number}: {target}")
    assert not broken, f"broken links: {broken}"
    assert checked >= 60, f"found only {checked} relative links"


def test_indexes_list_every_page():
    results = RESULTS_INDEX.read_text()
    missing = [p.name for p in sorted((ROOT / "results").glob("*.md"))
               if p != RESULTS_INDEX and f"]({p.name})" not in results]
    assert not missing, f"results/README.md does not list {missing}"
    docs = (ROOT / "docs" / "README.md").read_text()
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md"]
    missing = [p.name for p in pages if f"]({p.name})" not in docs]
    assert not missing, f"docs/README.md does not list {missing}"
    assert len(pages) >= 11


def test_named_files_and_modules_exist():
    paths, modules, missing = 0, 0, []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in BACKTICKED.findall(line):
                where = f"{_rel(path)}:{number}: {name}"
                if REPO_PATH.match(name) and name.split("/")[0] not in NOT_REPO:
                    paths += 1
                    if not any((base / name).exists() for base in (ROOT, ROOT / "jaxopt_lab")):
                        missing.append(where)
                elif DOTTED.match(name):
                    modules += 1
                    if not _importable(name):
                        missing.append(where)
    assert not missing, f"named files or modules that do not exist: {missing}"
    assert paths >= 30 and modules >= 5, (paths, modules)


def _python_blocks(path: Path):
    """(first line number, source) of the python code blocks in `path`, dedented."""
    lines, block, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            if block == "python":
                yield start, textwrap.dedent("\n".join(lines))
            block, lines, start = (fence[3:].strip().lower() if block is None else None), [], number
        elif block == "python":
            lines.append(line)


def test_documented_python_imports_resolve():
    names, missing = 0, []
    for path in DOCS:
        for start, source in _python_blocks(path):
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxopt_lab"):
                    dotted = [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    dotted = [a.name for a in node.names if a.name.startswith("jaxopt_lab")]
                else:
                    continue
                names += len(dotted)
                missing += [f"{_rel(path)}:{start + node.lineno}: {name}"
                            for name in dotted if not _importable(name)]
    assert not missing, f"documented imports that fail: {missing}"
    assert names >= 15, f"found only {names} documented jaxopt_lab imports"


def _importable(dotted: str) -> bool:
    """`jaxopt_lab.a.b.c` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            node = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(node, attribute):
                return False
            node = getattr(node, attribute)
        return True
    return False
