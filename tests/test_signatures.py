"""The shape of the public API: short public functions, and run options that mean one thing.

A public function's body is the code under its docstring, from the first statement
to the last; the signature and the docstring do not count, so documenting an
argument never pushes a function over the limit. The run options (``progress``,
``use_cache``, ``cache_dir``, ``seed``, ``distributed``, ``batch_size``) are
taken with one type and, where one can serve, one default wherever a public
function takes them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rome_lens

PACKAGE = Path(rome_lens.__file__).resolve().parent
MAX_BODY_LINES = 60
ROOMS = ["core", "stats", "tracing", "editing", "analysis", "influence", "evaluation", "viz"]

LONG_BODIES = {
    "rome_lens.viz.svg.line_chart": "draws axes, ticks, lines, markers and the legend of one "
    "SVG in order; to be split into one function per part",
}  # qualified name -> why it is still longer than MAX_BODY_LINES

RUN_OPTION_DEFAULTS = {
    "progress": True,
    "use_cache": True,
    "cache_dir": None,
    "seed": 0,
    "distributed": None,
}
OTHER_DEFAULTS = {
    ("rome_lens.core.predict.predict_next", "progress"): "one quick batched pass, mostly "
    "inside a longer run that shows its own bar",
    ("rome_lens.core.predict.known_facts", "progress"): "one quick batched pass, mostly "
    "inside a longer run that shows its own bar",
    ("rome_lens.core.predict.target_nll", "progress"): "one quick batched pass, mostly "
    "inside a longer run that shows its own bar",
    ("rome_lens.analysis.states.text_states", "progress"): "the states of one text, mostly "
    "inside a longer run that shows its own bar",
}  # (qualified name, option) -> why its default differs from RUN_OPTION_DEFAULTS
RUN_OPTIONS = [*RUN_OPTION_DEFAULTS, "batch_size"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _public_definitions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Module-level public functions and the public methods of public classes, by name."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, functions) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def _body_lines(function: ast.AST) -> int:
    """Lines from the first statement under the docstring to the end of the last."""
    assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
    body = function.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        body = body[1:] if isinstance(first.value.value, str) else body
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def body_lengths() -> dict[str, int]:
    """Every public function's body length in rome_lens, by qualified name."""
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, function in _public_definitions(tree):
            lengths[f"{module}.{name}"] = _body_lines(function)
    return lengths


def public_callables() -> dict[str, Callable[..., object]]:
    """The functions, classes and public methods that rome_lens and its rooms export."""
    found: dict[str, Callable[..., object]] = {}
    for module_name in ["rome_lens", *(f"rome_lens.{room}" for room in ROOMS)]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj) or not getattr(obj, "__module__", "").startswith("rome_lens"):
                continue
            found[f"{obj.__module__}.{getattr(obj, '__qualname__', name)}"] = obj
            if isinstance(obj, type):
                for method_name, method in inspect.getmembers(obj, inspect.isfunction):
                    if not method_name.startswith("_") and method.__module__.startswith(
                        "rome_lens"
                    ):
                        found[f"{method.__module__}.{method.__qualname__}"] = method
    return found


def run_option_parameters() -> list[tuple[str, inspect.Parameter]]:
    """Every run option a public callable takes with a default, as (qualified name, parameter)."""
    found = []
    for name, obj in sorted(public_callables().items()):
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        for parameter in signature.parameters.values():
            if parameter.name in RUN_OPTIONS and parameter.default is not parameter.empty:
                found.append((name, parameter))  # a required field is a record, not an option
    return found


class TestFunctionLength:
    def test_no_public_function_body_is_longer_than_the_limit(self):
        """Public functions and methods stay within MAX_BODY_LINES, but for LONG_BODIES."""
        too_long = {
            name: lines
            for name, lines in body_lengths().items()
            if lines > MAX_BODY_LINES and name not in LONG_BODIES
        }
        assert not too_long, f"split these into functions with one job each: {too_long}"

    def test_every_long_body_listed_is_still_long(self):
        """An entry of LONG_BODIES that was split or removed is dropped from the list."""
        lengths = body_lengths()
        stale = [name for name in LONG_BODIES if lengths.get(name, 0) <= MAX_BODY_LINES]
        assert not stale, f"remove from LONG_BODIES: {stale}"

    def test_the_measure_skips_the_docstring(self):
        """A function of a long docstring and two statements has a body of two lines."""
        source = 'def f(x):\n    """Doc.\n\n    More.\n    """\n    y = x\n    return y\n'
        (function,) = ast.parse(source).body
        assert _body_lines(function) == 2


class TestRunOptions:
    def test_the_public_api_takes_run_options(self):
        """The inspection sees the options of functions, methods and the influence room."""
        names = {name for name, _ in run_option_parameters()}
        assert "rome_lens.influence.scores.influence_many" in names
        assert "rome_lens.tracing.engine.average_causal_effects" in names

    @pytest.mark.parametrize("option", list(RUN_OPTION_DEFAULTS))
    def test_one_default_per_option(self, option):
        """Where a public callable takes a run option, its default is the package's."""
        expected = RUN_OPTION_DEFAULTS[option]
        other = {
            name: parameter.default
            for name, parameter in run_option_parameters()
            if parameter.name == option
            and parameter.default != expected
            and (name, option) not in OTHER_DEFAULTS
        }
        assert not other, f"{option} defaults to {expected!r} everywhere else: {other}"

    def test_every_other_default_listed_is_still_other(self):
        """An entry of OTHER_DEFAULTS whose default now agrees is dropped from the list."""
        defaults = {(name, p.name): p.default for name, p in run_option_parameters()}
        stale = [
            key
            for key in OTHER_DEFAULTS
            if defaults.get(key, RUN_OPTION_DEFAULTS[key[1]]) == RUN_OPTION_DEFAULTS[key[1]]
        ]
        assert not stale, f"remove from OTHER_DEFAULTS: {stale}"

    @pytest.mark.parametrize("option", RUN_OPTIONS)
    def test_one_type_per_option(self, option):
        """A run option has one annotation wherever it is taken."""
        annotations = {str(p.annotation) for _, p in run_option_parameters() if p.name == option}
        assert len(annotations) == 1, f"{option} is annotated {annotations}"

    def test_batch_size_counts_sequences(self):
        """batch_size defaults to a positive number of sequences wherever it is taken."""
        bad = {
            name: p.default
            for name, p in run_option_parameters()
            if p.name == "batch_size" and not (isinstance(p.default, int) and p.default > 0)
        }
        assert not bad
