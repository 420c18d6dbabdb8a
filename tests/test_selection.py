"""Every "best" is chosen on validation: `choose` refuses anything else, and a static check finds
choices made around it (max / min / sorted / filter or a comprehension's condition over a test
figure) in experiments/, benchmarks/ and jaxopt_lab/."""

import ast
import pathlib

import pytest

from jaxopt_lab import choose
from jaxopt_lab.profile.pareto import best_candidate

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("experiments", "benchmarks", "jaxopt_lab")

# Validation and test rankings disagree: "b" is best on validation, "c" on test.
ROWS = [
    {"name": "a", "validation_accuracy": 0.90, "test_accuracy": 0.91, "size_ratio": 1.0},
    {"name": "b", "validation_accuracy": {"mean": 0.95, "std": 0.01},
     "test_accuracy": 0.92, "size_ratio": 2.0},
    {"name": "c", "validation_accuracy": 0.93, "test_accuracy": 0.97, "size_ratio": 8.0},
]


def test_the_best_is_the_best_on_validation_not_on_test():
    assert choose(ROWS, "validation_accuracy")["name"] == "b"
    assert max(ROWS, key=lambda r: r["test_accuracy"])["name"] == "c"  # what choose must not do
    assert choose(ROWS, "validation_accuracy", maximize=False)["name"] == "a"


def test_within_a_bound_the_preferred_property_decides_among_admissible_rows():
    assert choose(ROWS, "validation_accuracy", at_least=0.93, prefer="size_ratio")["name"] == "c"
    assert choose(ROWS, "validation_accuracy", at_least=0.94, prefer="size_ratio")["name"] == "b"
    assert choose(ROWS, "validation_accuracy", at_least=0.99, prefer="size_ratio") is None
    # float rounding at the bound does not decide (the deep-compression headline's 1.4e-9)
    assert choose(ROWS, "validation_accuracy", at_least=0.93 + 1e-12,
                  prefer="size_ratio")["name"] == "c"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"metric": "test_accuracy"}, "not a validation figure"),
    ({"metric": "accuracy"}, "not a validation figure"),
    ({"metric": "validation_accuracy", "at_least": 0.9, "prefer": "test_accuracy"},
     "names a split's figure"),
    ({"metric": "validation_accuracy", "at_least": 0.9}, "at_least needs prefer"),
])
def test_choices_on_anything_but_validation_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose(ROWS, **kwargs)


def test_optimize_picks_its_candidate_on_validation():
    baseline = {"validation_accuracy": 0.95}
    rows = [dict(r, speedup_batch256=1.0) for r in ROWS]
    assert best_candidate(baseline, rows, max_drop=2.0, objective="size") == "c"
    assert best_candidate(baseline, rows, max_drop=1.0, objective="size") == "b"
    assert best_candidate(baseline, rows, max_drop=0.0, objective="size") == "b"


# --- the static check -------------------------------------------------------------------------

# Keys that held test figures without naming their split, before rows named it.
BARE = ("accuracy", "loss", "paired_difference")
NOT_A_CHOICE = "# reported, not chosen"  # marks a line that filters test figures to show them


def _mentions_test(node: ast.AST) -> bool:
    """Whether an expression reads a test figure: a name, attribute or string with "test" as a
    word of it (test_accuracy, r["test_paired_difference"], tests), or a bare key of `BARE`."""
    for sub in ast.walk(node):
        text = (sub.value if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
                else sub.id if isinstance(sub, ast.Name)
                else sub.attr if isinstance(sub, ast.Attribute) else None)
        if text is None:
            continue
        if any(w in ("test", "tests") for w in text.lower().split("_")):
            return True
        if isinstance(sub, ast.Constant) and text in BARE:
            return True
    return False


def choices_over_test(source: str) -> list[int]:
    """Lines where max/min/sorted/filter, or a comprehension's condition, ranks or filters by a
    test figure."""
    lines, text = [], source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("max", "min", "sorted", "filter")):
            keys = [k.value for k in node.keywords if k.arg == "key"]
            deciding = keys or ([node.args[0]] if node.func.id == "filter" else node.args[:1])
            if any(_mentions_test(expr) for expr in deciding):
                lines.append(node.lineno)
        elif isinstance(node, ast.comprehension) and any(_mentions_test(c) for c in node.ifs):
            lines.append(node.ifs[0].lineno)
    return [line for line in lines if NOT_A_CHOICE not in text[line - 1]]


@pytest.mark.parametrize("snippet", [
    "best = max(rows, key=lambda r: r['accuracy']['test'])",
    "best = max(rows, key=lambda r: r['test_accuracy'])",
    "best = sorted(rows, key=lambda r: -r['test_paired_difference']['mean'])[0]",
    "within = [r for r in rows if r['test_paired_difference']['mean'] >= -0.01]",
    "kept = list(filter(lambda r: r.test_accuracy > 0.9, rows))",
    "best = min(test_losses)",
    "best = max(rows, key=lambda r: r['accuracy']['mean'])",
    "within = [r for r in rows if r['paired_difference']['mean'] >= -0.01]",
])
def test_the_static_check_flags_choices_over_test_figures(snippet):
    assert choices_over_test(snippet) == [1]


@pytest.mark.parametrize("snippet", [
    "best = choose(rows, 'validation_accuracy')",
    "acc = [m['test_accuracy'] for m in sorted(members, key=lambda m: m['seed']) if m['q'] == q]",
    "fastest = min(times)",
    "shown = {k: v for k, v in attrs.items() if k.startswith('test_')}  # reported, not chosen",
])
def test_the_static_check_passes_reporting_and_validation_choices(snippet):
    assert choices_over_test(snippet) == []


def test_no_code_chooses_on_a_test_figure():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 100
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files
             for line in choices_over_test(p.read_text())]
    assert not found, f"choose a best with jaxopt_lab.choose on validation: {found}"
