"""One protocol for every editor: ROME, MEMIT, AlphaEdit, FT+L, and any of your own.

An :class:`Editor` turns edit requests into a
:class:`~rome_lens.editing.patches.WeightEdit` without changing the model::

    edit = editor.edit(model, requests, settings, layers=..., stats=...,
                       cache_dir=..., use_cache=..., progress=...)

It has a ``name`` (its key in :mod:`rome_lens.editing.registry`), the class of
its settings (``settings_type``, a leaf of the tree in
:mod:`rome_lens.editing.requests`), and says whether one edit writes many
requests (``batched``: MEMIT, AlphaEdit) or exactly one (ROME, FT+L, which
refuse several with a clear error; :class:`~rome_lens.editing.sequential.SequentialEditor`
and :func:`~rome_lens.evaluation.evaluate_edits` give them one at a time).
``stats`` is always ``{layer: KeyStats}``; ``cache_dir`` is the rome_lens cache
folder and ``use_cache`` says whether to read and write it (key statistics and
MEMIT's targets).

What an editor needs before its first edit, and carries from one edit to the
next, is explicit: an :class:`EditorState`, made by ``editor.start(model,
settings, ...)``. It holds the layers and the unedited model's key statistics,
and whatever else the editor keeps (AlphaEdit's null-space projectors and the
keys of the edits applied so far,
:class:`~rome_lens.editing.alphaedit.NullSpaceState`). ``editor.edit(...,
state=state)`` edits from it, ``state.after(edit)`` is the state once that edit
is applied, and ``state.carried_to(model)`` vouches for its statistics on the
model as the edits left it. That is all a series of edits needs.

:class:`BaseEditor` is the common course of the built-in editors (check the
settings and requests, start, compute, read every request back on the edited
model): subclass it, or write any class with the protocol's members.

>>> import warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing import EditRequest, Editor, ROMEHyperParams, get_editor
>>> model = tiny_model()
>>> rome = get_editor("rome")
>>> isinstance(rome, Editor), rome.settings_type.__name__, rome.batched
(True, 'ROMEHyperParams', False)
>>> settings = ROMEHyperParams(mom2_adjustment=False, context_lengths=())
>>> state = rome.start(model, settings, layers=[1])
>>> state.layers
(1,)
>>> request = EditRequest("{} is in", "The Louvre", "Rome")
>>> with warnings.catch_warnings(record=True):  # a random model may not take it
...     edit = rome.edit(model, [request], settings, state=state, progress=False)
>>> list(edit.deltas()), state.after(edit) == state  # ROME carries nothing forward
(['blocks.1.mlp.W_out'], True)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from rome_lens.core.backend import Model, mlp_output_hook
from rome_lens.core.fingerprint import check_layer
from rome_lens.editing.defaults import default_layer
from rome_lens.editing.outcomes import measure_outcomes, warn_misses
from rome_lens.editing.patches import WeightEdit
from rome_lens.editing.requests import EditorSettings, EditRequest, check_hparams, check_request
from rome_lens.stats.keys import KeyStats, checked_stats

W = TypeVar("W", bound=WeightEdit)

__all__ = [
    "BaseEditor",
    "Editor",
    "EditorState",
    "RunOptions",
    "SingleLayerEditor",
    "check_layers",
    "editor_settings",
    "layer_stats",
    "no_stats",
]


@dataclass(frozen=True)
class EditorState:
    """What an editor carries from one edit to the next: made by ``editor.start``.

    Frozen: an edit never changes a state, :meth:`after` makes the next one, so
    undoing a batch is going back to the state before it.
    """

    layers: tuple[int, ...]
    """The MLP layers the edits write, ascending."""
    stats: Mapping[int, KeyStats] = field(default_factory=dict)
    """The unedited model's key statistics per layer (empty for an editor that reads none)."""
    seconds: float = 0.0
    """Time spent making this state (key statistics, projectors): an edit started from
    it reports this as its ``stats_seconds``."""

    def carried_to(self, model: Model) -> EditorState:
        """This state on ``model`` as earlier edits left it: the statistics are vouched
        for as its own (editing in a row keeps the unedited model's C, as the papers do).

        Args:
            model: the model, edited since the state was made.

        Returns:
            The same state, its statistics carried over, its ``seconds`` zero.
        """
        stats = {layer: s.carried_to(model) for layer, s in self.stats.items()}
        return dataclasses.replace(self, stats=stats, seconds=0.0)

    def check(self, model: Model) -> None:
        """Raise ``ValueError`` unless every statistic in the state belongs to ``model``
        (computed on it, or vouched for by :meth:`carried_to`).

        Args:
            model: the model about to be edited from this state.
        """
        for layer, stats in self.stats.items():
            stats.check(model, layer)

    def after(self, edit: WeightEdit) -> EditorState:
        """The state once ``edit`` is applied: the same, for an editor that keeps nothing.

        Args:
            edit: an edit made from this state, now applied.

        Returns:
            The next state.
        """
        return self


@runtime_checkable
class Editor(Protocol):
    """An editor: turns requests into a reversible weight edit (see the module docstring)."""

    @property
    def name(self) -> str:
        """Its name in the registry, e.g. ``"rome"``."""
        ...

    @property
    def settings_type(self) -> type[Any]:
        """The class of its settings; ``settings_type()`` are its defaults."""
        ...

    @property
    def batched(self) -> bool:
        """Whether one edit writes many requests (otherwise exactly one)."""
        ...

    def default_layers(self, model: Model) -> list[int]:
        """The layers it edits in ``model`` when none are given."""
        ...

    def start(
        self,
        model: Model,
        settings: Any,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> EditorState:
        """What edits of ``model`` start from: the layers checked, the statistics read."""
        ...

    def edit(
        self,
        model: Model,
        requests: Sequence[EditRequest],
        settings: Any = None,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        state: EditorState | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> WeightEdit:
        """The edit writing ``requests``, with each read back; the model is not changed.

        ``state`` (from :meth:`start`, or a series' current one) replaces
        ``layers`` and ``stats``.
        """
        ...


@dataclass(frozen=True)
class RunOptions:
    """The run options of an edit, handed together to an editor's parts."""

    cache_dir: str | os.PathLike[str] | None = None
    """The rome_lens cache folder (``None``: see :mod:`rome_lens.core.cache`)."""
    use_cache: bool = True
    """Read and write the cache (key statistics, MEMIT's targets)."""
    progress: bool = True
    """Show progress bars."""


class BaseEditor(ABC, Generic[W]):
    """The common course of every built-in editor; subclasses fill in the steps that differ.

    :meth:`edit` checks the settings (exactly ``settings_type``) and the
    requests before any slow work, starts a state unless given one, computes
    the edit, and reads every request back on the edited model
    (``edit.outcomes``), warning with ``EditMissWarning`` about those that did
    not take. :meth:`start` checks the layers, reads the key statistics unless
    the settings need none, and makes the state. The steps: ``default_layers``,
    ``check_requests``, ``checked_layers``, ``unread_stats``, ``state_from`` and
    ``compute``.
    """

    name: str
    """Its name in the registry."""
    label: str
    """How messages name it ("ROME")."""
    settings_type: type[EditorSettings]
    """The class of its settings."""
    batched: bool = False
    """Whether one edit writes many requests."""

    def edit(
        self,
        model: Model,
        requests: Sequence[EditRequest],
        settings: Any = None,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        state: EditorState | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> W:
        """The edit writing ``requests``, each read back on the edited model.

        Args:
            model: the model (not changed: apply the result with ``edit.apply(model)``).
            requests: the facts to write.
            settings: the editor's settings (``None``: its defaults).
            layers: the layers to edit (``None``: its default), when no state is given.
            stats: key statistics per layer, when no state is given.
            state: what to edit from (``None``: :meth:`start` makes it).
            cache_dir: the rome_lens cache folder.
            use_cache: read and write the cache.
            progress: show progress bars.

        Returns:
            The edit, with ``outcomes``; it warns with ``EditMissWarning`` about
            requests that did not take.
        """
        settings = editor_settings(self, settings)
        requests = self.check_requests(model, requests)
        options = RunOptions(cache_dir, use_cache, progress)
        if state is None:
            state = self._started(model, settings, layers, stats, options)
        elif layers is not None or stats is not None:
            raise ValueError("give layers and stats to start(), or a state, not both")
        else:
            state.check(model)
        edit = self.compute(model, requests, settings, state, options)
        edit = dataclasses.replace(edit, outcomes=measure_outcomes(model, edit))  # type: ignore[type-var]
        warn_misses(edit)
        return edit

    def start(
        self,
        model: Model,
        settings: Any,
        *,
        layers: Sequence[int] | None = None,
        stats: Mapping[int, KeyStats] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> EditorState:
        """What edits of ``model`` start from: the layers checked, their key statistics
        (unless the settings read none), and what the editor keeps.

        Args:
            model: the model, unedited.
            settings: the editor's settings.
            layers: the layers to edit (``None``: :meth:`default_layers`).
            stats: key statistics per layer (missing ones are read or computed).
            cache_dir: the rome_lens cache folder.
            use_cache: read and write the cache.
            progress: show progress bars.

        Returns:
            The state.
        """
        options = RunOptions(cache_dir, use_cache, progress)
        return self._started(model, editor_settings(self, settings), layers, stats, options)

    def _started(
        self,
        model: Model,
        settings: Any,
        layers: Sequence[int] | None,
        stats: Mapping[int, KeyStats] | None,
        options: RunOptions,
    ) -> EditorState:
        """:meth:`start` for settings already checked (:meth:`edit` checks them first)."""
        started = time.perf_counter()
        chosen = self.checked_layers(
            model, self.default_layers(model) if layers is None else layers
        )
        reason = self.unread_stats(settings)
        if reason is None:
            found = layer_stats(model, chosen, stats, settings.mom2_n_tokens, options)
        else:
            no_stats(stats, reason)
            found = {}
        return self.state_from(model, settings, chosen, found, started)

    @abstractmethod
    def default_layers(self, model: Model) -> list[int]:
        """The layers it edits in ``model`` when none are given.

        Args:
            model: the model.

        Returns:
            The layers, ascending.
        """

    @abstractmethod
    def check_requests(self, model: Model, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests as a list, each checked against ``model``, before any slow work."""

    def checked_layers(self, model: Model, layers: Sequence[int]) -> list[int]:
        """The layers, checked: in range, at least one, strictly ascending."""
        return check_layers(model, layers)

    def unread_stats(self, settings: Any) -> str | None:
        """Why no key statistics are read with ``settings``; ``None`` when they are."""
        return None

    def state_from(
        self,
        model: Model,
        settings: Any,
        layers: list[int],
        stats: dict[int, KeyStats],
        started: float,
    ) -> EditorState:
        """The state of ``model``, from the checked layers and their statistics
        (``started``: when :meth:`start` began, by ``time.perf_counter()``)."""
        return EditorState(tuple(layers), stats, seconds=time.perf_counter() - started)

    @abstractmethod
    def compute(
        self,
        model: Model,
        requests: list[EditRequest],
        settings: Any,
        state: EditorState,
        options: RunOptions,
    ) -> W:
        """The edit of the checked ``requests`` from ``state``, its outcomes not yet read
        (a dataclass with an ``outcomes`` field; the model is left as it was)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SingleLayerEditor(BaseEditor[W]):
    """An editor of one request in one layer's ``W_out``, through ``W_out``'s own output
    (ROME, FT+L): several requests are refused with a clear error."""

    def default_layers(self, model: Model) -> list[int]:
        """``[default_layer(model)]``, the layer a third of the way in unless listed."""
        return [default_layer(model)]

    def check_requests(self, model: Model, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Exactly one request, checked."""
        requests = list(requests)
        if len(requests) != 1:
            raise ValueError(
                f"{self.label} writes one request per edit, got {len(requests)}: write them one "
                "at a time (SequentialEditor and evaluate_edits do)"
            )
        check_request(model, requests[0])
        return requests

    def checked_layers(self, model: Model, layers: Sequence[int]) -> list[int]:
        """Exactly one layer, in range, whose ``W_out`` output has a hook point."""
        layers = list(layers)
        if len(layers) != 1:
            raise ValueError(f"{self.label} edits one layer, got layers={layers}")
        mlp_output_hook(model, check_layer(model, layers[0]))  # refuses, before any work
        return layers


def editor_settings(editor: Editor, settings: Any) -> Any:
    """``settings`` after checking they are of exactly ``editor.settings_type``; its
    defaults for ``None``.

    Args:
        editor: the editor.
        settings: the settings given, or ``None``.

    Returns:
        The settings.

    Raises:
        TypeError: settings of another class, named with the expected one.
    """
    if settings is None:
        return editor.settings_type()
    check_hparams(settings, editor.settings_type)
    return settings


def check_layers(model: Model, layers: Sequence[int]) -> list[int]:
    """The layers, checked: in range, at least one, strictly ascending.

    Args:
        model: the model.
        layers: the MLP layers to edit.

    Returns:
        The layers, as a list.
    """
    layers = [check_layer(model, layer) for layer in layers]
    if not layers:
        raise ValueError("layers must name at least one MLP layer, got none")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layers must be in strictly ascending order, got {layers}")
    return layers


def layer_stats(
    model: Model,
    layers: Sequence[int],
    stats: Mapping[int, KeyStats] | None,
    n_tokens: int,
    options: RunOptions,
) -> dict[int, KeyStats]:
    """Key statistics for each layer: those given, checked against the model, the rest
    read from the cache or computed over ``n_tokens`` sampled tokens.

    Args:
        model: the model.
        layers: the layers.
        stats: statistics per layer given by the caller (others are ignored).
        n_tokens: tokens to compute missing statistics over.
        options: where the cache is, whether to use it, and whether to show progress.

    Returns:
        ``{layer: KeyStats}`` for every layer.
    """
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(f"stats must be {{layer: KeyStats}}, got {type(stats).__name__}")
    given = stats or {}
    read = functools.partial(checked_stats, n_tokens=n_tokens, cache_dir=options.cache_dir,
                             use_cache=options.use_cache, progress=options.progress)  # fmt: skip
    return {layer: read(model, layer, given.get(layer)) for layer in layers}


def no_stats(stats: Mapping[int, KeyStats] | None, reason: str) -> None:
    """Raise ``ValueError`` when statistics are given to an editor that reads none.

    Args:
        stats: the statistics given.
        reason: why none are read, for the message.
    """
    if stats:
        raise ValueError(f"stats were given but {reason}")
