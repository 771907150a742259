"""The editors by name: the one registry every part of rome_lens reads.

:func:`~rome_lens.evaluation.evaluate_edits`,
:class:`~rome_lens.editing.sequential.SequentialEditor`, the ``rome-lens edit
--method`` command and the benchmarks in ``bench/`` all find an editor here,
so an editor registered with :func:`register_editor` serves in all of them.
ROME (``"rome"``), MEMIT (``"memit"``), AlphaEdit (``"alphaedit"``) and FT+L
(``"ft"``) are registered when :mod:`rome_lens.editing` is imported.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, FTEditor, editors, get_editor, register_editor
>>> from rome_lens.editing.registry import unregister_editor
>>> sorted(editors())
['alphaedit', 'ft', 'memit', 'rome']
>>> class QuickFT(FTEditor):  # a stand-in for an editor of your own
...     name = "quick_ft"
>>> _ = register_editor(QuickFT())
>>> request = EditRequest("{} is in", "The Louvre", "Rome")
>>> with warnings.catch_warnings(record=True):  # a random model may not take it
...     edit = get_editor("quick_ft").edit(tiny_model(), [request], layers=[1], progress=False)
>>> list(edit.deltas())
['blocks.1.mlp.W_out']
>>> unregister_editor("quick_ft").name
'quick_ft'
"""

from __future__ import annotations

from typing import TypeVar

from rome_lens.editing.editors import Editor

__all__ = ["editors", "get_editor", "register_editor", "unregister_editor"]

E = TypeVar("E", bound=Editor)
_EDITORS: dict[str, Editor] = {}


def register_editor(editor: E, *, replace: bool = False) -> E:
    """Make ``editor`` available under ``editor.name`` everywhere an editor is named.

    Args:
        editor: any object with the :class:`~rome_lens.editing.editors.Editor` protocol.
        replace: allow replacing another editor of the same name.

    Returns:
        The editor (so that ``ROME = register_editor(ROMEEditor())`` reads naturally).

    Raises:
        TypeError: ``editor`` lacks a member of the protocol.
        ValueError: another editor has that name and ``replace`` is false.
    """
    if not isinstance(editor, Editor):
        missing = [
            member
            for member in ("name", "settings_type", "batched", "default_layers", "start", "edit")
            if not hasattr(editor, member)
        ]
        raise TypeError(f"{editor!r} is no Editor: it lacks {missing}")
    other = _EDITORS.get(editor.name)
    if other is not None and other is not editor and not replace:
        raise ValueError(
            f"an editor named {editor.name!r} is registered already ({other!r}); "
            "pass replace=True to replace it"
        )
    _EDITORS[editor.name] = editor
    return editor


def unregister_editor(name: str) -> Editor:
    """Remove the editor named ``name`` from the registry.

    Args:
        name: its name.

    Returns:
        The editor removed.
    """
    get_editor(name)  # the same message for an unknown name
    return _EDITORS.pop(name)


def get_editor(method: str | Editor) -> Editor:
    """The editor registered as ``method``; an editor object is returned as it is.

    Args:
        method: a registered name (``"rome"``, ``"memit"``, ``"alphaedit"``, ``"ft"``,
            or one of your own), or an editor.

    Returns:
        The editor.

    Raises:
        ValueError: no editor has that name (the message lists those that do).
    """
    if not isinstance(method, str):
        if not isinstance(method, Editor):
            raise TypeError(f"method must be an editor's name or an Editor, got {method!r}")
        return method
    if method not in _EDITORS:
        raise ValueError(f"method must be one of {sorted(_EDITORS)}, got {method!r}")
    return _EDITORS[method]


def editors() -> dict[str, Editor]:
    """Every registered editor, by name, in the order registered.

    Returns:
        ``{name: editor}`` (a copy: registering goes through :func:`register_editor`).
    """
    return dict(_EDITORS)
