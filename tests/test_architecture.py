"""The layout docs/design.md claims, checked: the layers' import order (imports inside functions
count), no import cycle, and the size limits that keep a module one idea."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxopt_lab"

# docs/design.md: cli -> tune/optimize/profile/export -> workflows -> run -> compose ->
# techniques -> core -> data/models -> errors. A module may import its own layer or below.
LAYERS = (
    ("errors", "importpath", "selection", "host"),
    ("data", "models"),
    ("core",),
    ("techniques",),
    ("compose",),
    ("run",),
    ("workflows",),
    ("tune", "optimize", "profile", "export"),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The package module an import names (the longest known prefix), None outside it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """Every jaxopt_lab module `module` imports, at the top or inside a function."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target is not None and target != module:
                found.add(target)
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "jaxopt_lab"


GRAPH = {module: _imports(module) for module in MODULES}


def test_the_scan_sees_the_whole_package():
    assert len(MODULES) > 100
    assert sum(len(targets) for targets in GRAPH.values()) > 300
    assert {_layer(m) for m in MODULES} - {"jaxopt_lab"} == set(RANK)


def _upward_edges(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for module, targets in graph.items():
        if module == "jaxopt_lab":  # the public entry points: the top of the house
            continue
        for target in targets:
            if target == "jaxopt_lab":
                upward.append(f"{module} -> jaxopt_lab (the public API is for users)")
            elif RANK[_layer(target)] > RANK[_layer(module)]:
                upward.append(f"{module} -> {target}")
    return sorted(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_every_import_points_down_the_layers():
    upward = _upward_edges(GRAPH)
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_core_imports_no_technique_and_nothing_above():
    banned = ("techniques", "compose", "run", "workflows", "tune", "optimize", "profile",
              "export", "cli")
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() if _layer(m) == "core"
           for t in targets if _layer(t) in banned]
    assert not bad, bad


def test_there_is_no_import_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks themselves, on the real graph with one bad edge added."""
    graph = {m: set(t) for m, t in GRAPH.items()}
    graph["jaxopt_lab.core.step"].add("jaxopt_lab.techniques.prune")
    assert _upward_edges(graph) == ["jaxopt_lab.core.step -> jaxopt_lab.techniques.prune"]
    assert _cycle(graph) is None  # prune does not import core.step back
    graph["jaxopt_lab.core.tasks"].add("jaxopt_lab.core.step")  # step imports tasks
    assert _cycle(graph) is not None
    # names are resolved to modules: `from jaxopt_lab.techniques import prune` is the package
    assert "jaxopt_lab.compose.techniques" in GRAPH["jaxopt_lab.compose.experiment"]
    assert "jaxopt_lab.workflows.train" in GRAPH["jaxopt_lab.tune.trials"]


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_a_module_over_400_lines_says_why():
    unexplained = []
    for module, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            if "400 lines" not in docstring:
                unexplained.append(f"{module}: {len(text.splitlines())} lines")
    assert not unexplained, unexplained
