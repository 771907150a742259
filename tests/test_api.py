"""The public API: every name 0.1.0 exported is still there, and every public function says
what its arguments are and what it returns."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import rome_lens

NAMES_IN_0_1 = [
    "DEFAULT_MODEL", "AppliedEdit", "AverageEffects", "CausalTrace", "EditRequest",
    "FTHyperParams", "KeyStats", "LogitLens", "MEMITHyperParams", "MultiLayerEdit",
    "ROMEHyperParams", "RankOneEdit", "SeveredTrace", "WeightEdit", "WeightPatch",
    "average_causal_effects", "edited", "embedding_noise_scale", "evaluate_edits", "ft_edit",
    "key_second_moment", "load_counterfact", "load_model", "logit_lens", "memit_edit",
    "rome_edit", "summarize", "tiny_model", "trace_fact", "trace_severed", "viz",
    "without_conflicts",
]  # fmt: skip
NAMES_OF_THE_EDITORS = [
    "AlphaEditHyperParams", "Editor", "SequentialEditor", "alphaedit_edit", "editors",
    "get_editor", "register_editor",
]  # fmt: skip
ROOMS = ["core", "stats", "tracing", "editing", "analysis", "influence", "evaluation", "viz"]


def public_functions():
    """Every function in the ``__all__`` of every module of rome_lens, once."""
    seen = set()
    for info in pkgutil.walk_packages(rome_lens.__path__, "rome_lens."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (
                inspect.isfunction(obj)
                and obj.__module__.startswith("rome_lens")
                and obj not in seen
            ):
                seen.add(obj)
                yield pytest.param(obj, id=f"{obj.__module__}.{obj.__name__}")


class TestNames:
    @pytest.mark.parametrize("name", NAMES_IN_0_1)
    def test_name_of_0_1_is_still_exported(self, name):
        """rome_lens.<name> still resolves, through the lazy package root."""
        assert getattr(rome_lens, name) is not None
        assert name in rome_lens.__all__

    @pytest.mark.parametrize("name", NAMES_OF_THE_EDITORS)
    def test_the_editors_family_is_exported(self, name):
        """The editor protocol, its registry, AlphaEdit and SequentialEditor are at the root."""
        assert getattr(rome_lens, name) is getattr(
            importlib.import_module("rome_lens.editing"), name
        )
        assert name in rome_lens.__all__

    def test_all_lists_what_the_root_exports(self):
        """Every name in rome_lens.__all__ resolves; an unknown one raises AttributeError."""
        for name in rome_lens.__all__:
            getattr(rome_lens, name)
        with pytest.raises(AttributeError, match="no attribute 'trace_facts'"):
            rome_lens.trace_facts  # noqa: B018

    @pytest.mark.parametrize("room", ROOMS)
    def test_each_room_explains_itself_with_an_example(self, room):
        """Each room's docstring says what it holds and runs an example on tiny_model()."""
        doc = importlib.import_module(f"rome_lens.{room}").__doc__ or ""
        assert ">>> " in doc and "tiny_model()" in doc


@pytest.mark.parametrize("function", list(public_functions()))
def test_public_functions_document_args_and_returns(function):
    """Google-style docstrings: an Args section naming each parameter, and a Returns section."""
    doc = inspect.getdoc(function) or ""
    parameters = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name == "items"
    ]
    if parameters:
        assert "Args:" in doc, "no Args section"
        missing = [name for name in parameters if f"{name}:" not in doc.split("Args:")[1]]
        assert not missing, f"Args does not describe {missing}"
    returns = inspect.signature(function).return_annotation
    if returns not in (None, "None", inspect.Signature.empty):
        assert "Returns:" in doc or "Yields:" in doc, "no Returns section"
