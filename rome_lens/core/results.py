"""One interface for every rome_lens result: a table, a figure, a widget, a file.

A causal trace, a logit lens, key statistics, an edit and an evaluation all
answer the same four requests, because they all derive from :class:`Result`:

* ``result.to_dataframe()``: the numbers, one row per cell of the result;
* ``result.plot(ax=None)``: a matplotlib ``Figure`` (drawn into ``ax`` if given);
* ``result.widget()``: a :class:`rome_lens.viz.Widget` for Jupyter or an offline page;
* ``result.save(path)`` and ``Type.load(path, model=None)``: safetensors for the
  tensors and JSON for everything else, checked by a SHA-256 digest, never
  pickle. With ``model``, ``load`` refuses a result computed on another model.

The figures and widgets are drawn by :mod:`rome_lens.viz`, which sits above
every result in the package's layers: it registers a view for each result type
with :func:`register_view`, and :meth:`Result.plot` and :meth:`Result.widget`
look the view up (importing :mod:`rome_lens.viz` the first time). So the result
classes never import the code that draws them.

>>> import tempfile, torch
>>> from dataclasses import dataclass
>>> from rome_lens.core.results import Result
>>> @dataclass
... class Scores(Result):
...     kind = "doc_scores"
...     name: str
...     values: torch.Tensor
>>> path = Scores("demo", torch.arange(3.0)).save(tempfile.mkdtemp() + "/scores.safetensors")
>>> Scores.load(path)
Scores(name='demo', values=tensor([0., 1., 2.]))
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
import safetensors.torch
from torch import Tensor

from rome_lens.core.backend import Model
from rome_lens.core.cache import load_tensors, save_tensors
from rome_lens.core.fingerprint import check_fingerprint, model_fingerprint

__all__ = [
    "FORMAT",
    "Result",
    "layer_token_frame",
    "register_type",
    "register_view",
    "view",
]

FORMAT = 2  # version of the saved layout; bump when it changes
R = TypeVar("R", bound="Result")
T = TypeVar("T", bound=type)

_TYPES: dict[str, type] = {}  # saved name -> dataclass, for decoding nested values
_VIEWS: dict[tuple[type, str], Callable[..., Any]] = {}  # (result type, "plot"/"widget") -> view


class Result:
    """Base of every result: ``to_dataframe``, ``plot``, ``widget``, ``save``/``load``.

    Subclasses are dataclasses with a class attribute ``kind``, the name their
    files are saved under; two classes may not share a kind.
    """

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            register_type(cls.kind)(cls)

    def to_dataframe(self) -> pd.DataFrame:
        """The result's numbers as a table."""
        raise NotImplementedError(f"{type(self).__name__} has no table")

    def plot(self, ax: Any = None, *, path: str | os.PathLike[str] | None = None) -> Any:
        """Draw the result (a matplotlib ``Figure``).

        Args:
            ax: a matplotlib ``Axes`` (or a list of them, for results drawn in
                several panels) to draw into; ``None`` makes a new figure.
            path: also save the figure there (PNG, SVG or PDF by the suffix).

        Returns:
            The figure.
        """
        figure = view(self, "plot")(self, ax=ax)
        if path is not None:
            view(self, "save_figure")(figure, path)
        return figure

    def widget(self) -> Any:
        """A :class:`rome_lens.viz.Widget` showing the result (displays itself in Jupyter)."""
        return view(self, "widget")(self)

    def check_model(self, model: Model) -> None:
        """Raise ``ValueError`` unless the result was computed on ``model``.

        Results that carry a ``fingerprint`` compare it with the model's;
        others accept any model.
        """
        expected = getattr(self, "fingerprint", "")
        if expected:
            check_fingerprint(model_fingerprint(model), expected, f"this {type(self).__name__}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to ``path`` (safetensors) and ``path.json`` (metadata and digest).

        Returns:
            The path written.
        """
        tensors: dict[str, Tensor] = {}
        fields = _encode(self, "", tensors)
        save_tensors(Path(path), tensors, {"format": FORMAT, "kind": self.kind, "value": fields})
        return Path(path)

    def to_bytes(self) -> bytes:
        """The result as safetensors bytes, its fields as JSON metadata (no pickle).

        Returns:
            What :meth:`from_bytes` reads back.
        """
        tensors: dict[str, Tensor] = {}
        fields = _encode(self, "", tensors)
        meta = {"format": str(FORMAT), "kind": self.kind, "value": json.dumps(fields)}
        return safetensors.torch.save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls: type[R], data: bytes) -> R:
        """Read a result written by :meth:`to_bytes`.

        Args:
            data: the bytes.

        Returns:
            The result.
        """
        tensors = safetensors.torch.load(data)
        size = int.from_bytes(data[:8], "little")  # safetensors: header length, then JSON header
        meta = json.loads(data[8 : 8 + size]).get("__metadata__", {})
        target = _TYPES.get(meta.get("kind", ""))
        if meta.get("format") != str(FORMAT) or target is None or not issubclass(target, cls):
            raise ValueError(f"these bytes hold no {cls.__name__} (kind {meta.get('kind')!r})")
        return _decode(json.loads(meta["value"]), tensors)

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str], model: Model | None = None) -> R:
        """Read a result written by :meth:`save`.

        Args:
            path: the file written by ``save``.
            model: if given, the result must have been computed on it.

        Returns:
            The result.

        Raises:
            FileNotFoundError: the file or its ``.json`` sidecar is missing.
            rome_lens.core.cache.CacheError: the file is damaged.
            ValueError: the file holds another kind of result, or comes from another model.
        """
        what = f"{cls.__name__} file"
        tensors, meta = load_tensors(Path(path), what=what)
        kind = meta.get("kind")
        if meta.get("format") != FORMAT or not isinstance(kind, str) or kind not in _TYPES:
            raise ValueError(
                f"{path} holds no rome_lens result this version reads "
                f"(kind {kind!r}, format {meta.get('format')!r}; expected format {FORMAT})"
            )
        target = _TYPES[kind]
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {target.__name__}, not a {cls.__name__}")
        result = _decode(meta["value"], tensors)
        if model is not None:
            result.check_model(model)
        return result


def layer_token_frame(str_tokens: Sequence[str], **columns: Any) -> pd.DataFrame:
    """One row per (layer, token) of values read at every layer for every token.

    Args:
        str_tokens: the tokens, one per column of the grids.
        **columns: each a ``[layer, token]`` grid (a tensor or nested lists), by the
            name of its column in the table.

    Returns:
        Columns ``layer``, ``token``, ``str_token``, then one per grid; tensors'
        values as Python floats.
    """
    grids = {name: _as_rows(grid) for name, grid in columns.items()}
    n_layers = len(next(iter(grids.values())))
    return pd.DataFrame(
        [
            {"layer": layer, "token": t, "str_token": token}
            | {name: grid[layer][t] for name, grid in grids.items()}
            for layer in range(n_layers)
            for t, token in enumerate(str_tokens)
        ]
    )


def _as_rows(grid: Any) -> list[list[Any]]:
    """A ``[layer, token]`` grid as nested lists (a tensor's values as floats)."""
    return grid.double().tolist() if isinstance(grid, Tensor) else [list(row) for row in grid]


def register_type(name: str) -> Callable[[T], T]:
    """Class decorator: save and load instances of a dataclass under ``name``.

    Args:
        name: the name saved files use for the class.

    Returns:
        The decorator.

    Raises:
        ValueError: another class is already registered under ``name``.
    """

    def register(cls: T) -> T:
        other = _TYPES.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"{cls.__name__} and {other.__name__} both claim the kind {name!r}")
        _TYPES[name] = cls
        return cls

    return register


def register_view(
    result_type: type, name: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` draws ``result_type`` (``name`` is ``"plot"`` or ``"widget"``).

    Args:
        result_type: the result class the view draws.
        name: ``"plot"``, ``"widget"`` or ``"save_figure"``.

    Returns:
        The decorator.

    Raises:
        ValueError: that result type already has a view of that name.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if (result_type, name) in _VIEWS:
            raise ValueError(f"{result_type.__name__} already has a {name} view")
        _VIEWS[result_type, name] = fn
        return fn

    return register


def view(result: object, name: str) -> Callable[..., Any]:
    """The view ``name`` registered for ``result``'s type (or its nearest base class).

    Args:
        result: a result.
        name: ``"plot"``, ``"widget"`` or ``"save_figure"``.

    Returns:
        The registered function.
    """
    for attempt in range(2):
        for klass in type(result).__mro__:
            found = _VIEWS.get((klass, name))
            if found is not None:
                return found
        if attempt == 0:
            importlib.import_module("rome_lens.viz")  # registers every view on import
    raise NotImplementedError(f"{type(result).__name__} has no {name} view")


def _encode(value: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``value``, moving its tensors into ``tensors`` under dotted names."""
    if isinstance(value, Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"$tensor": prefix}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _type_name(type(value))
        fields = {
            f.name: _encode(getattr(value, f.name), _join(prefix, f.name), tensors)
            for f in dataclasses.fields(value)
            if f.init
        }
        return {"$type": name, "fields": fields}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, _join(prefix, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(prefix, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            "$dict": [[k, _encode(v, _join(prefix, str(k)), tensors)] for k, v in value.items()]
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} at {prefix or 'the top'}: {value!r}")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$dict" in obj:
        return {k: _decode(v, tensors) for k, v in obj["$dict"]}
    if "$type" in obj:
        cls = _TYPES.get(obj["$type"])
        if cls is None:
            raise ValueError(f"unknown saved type {obj['$type']!r}")
        return cls(**{k: _decode(v, tensors) for k, v in obj["fields"].items()})
    raise ValueError(f"unreadable saved value {obj!r}")


def _type_name(cls: type) -> str:
    for name, registered in _TYPES.items():
        if registered is cls:
            return name
    raise TypeError(f"{cls.__name__} is not registered for saving (rome_lens.core.results)")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
