"""Text to run a model over: your documents, or text the model samples itself.

Key statistics, the Microscope's linear maps and influence functions all read
a corpus the same way, through :class:`Corpus`:

* **from documents you pass**: an iterable of strings, a ``.txt`` file
  (documents separated by blank lines) or a ``.jsonl`` file (one ``"text"``
  field per line);
* **from the model itself** (``Corpus.read(None)``): sequences sampled from BOS
  with the full distribution, seeded and cached per model. That keeps every
  statistic offline and model-agnostic; the model's own samples are, by
  construction, text it finds typical.

:meth:`Corpus.chunks` cuts each document into windows of at most
``max_length`` tokens (BOS first, as the model reads text) and
:func:`token_batches` stacks chunks into right-padded :class:`Batch` es that
mark the real tokens and those to count (real and not BOS).

>>> from rome_lens.core.corpus import Corpus, token_batches
>>> from rome_lens.core.models import tiny_model
>>> model = tiny_model()
>>> corpus = Corpus.read(["The Eiffel Tower is in Paris.", "The Louvre is a museum."])
>>> chunks = corpus.chunks(model, max_length=8)
>>> [(c.document, len(c.tokens)) for c in chunks]
[(0, 8), (1, 8), (1, 5)]
>>> batch = next(token_batches(model, chunks, batch_size=8))
>>> int(batch.real.sum()), int(batch.counted.sum())  # real tokens; those but BOS
(21, 18)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.cache import CacheError, cache_dir, discard, load_tensors, save_tensors
from rome_lens.core.distributed import Split, is_main
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.generation import sample_tokens
from rome_lens.core.precision import to_host
from rome_lens.core.runtime import pad

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "SAMPLE_LENGTH",
    "Batch",
    "Chunk",
    "Corpus",
    "CorpusSource",
    "SHIPPED_SAMPLES",
    "add_shipped_fingerprint",
    "bos_tokens",
    "shipped_sample",
    "token_batches",
    "write_shipped_sample",
]

DEFAULT_MAX_LENGTH = 128  # longest window of corpus text run at once (BOS included)
SAMPLE_LENGTH = 64  # tokens per sequence sampled from the model, after BOS

CorpusSource = Iterable[str] | str | os.PathLike[str] | None
SHIPPED_SAMPLES = Path(__file__).resolve().parent / "data"  # default corpora shipped with rome_lens


@dataclass(frozen=True)
class Chunk:
    """A window of one document, as the model reads it."""

    document: int
    """Index of the document in the corpus."""
    start: int
    """Offset of the window's first token in the document (BOS not counted)"""
    tokens: Int[Tensor, " pos"]
    """BOS (if the model uses one), then the window."""


class Batch(NamedTuple):
    """Chunks stacked for one forward pass, right-padded."""

    tokens: Int[Tensor, "batch pos"]
    real: Bool[Tensor, "batch pos"]  # not padding
    counted: Bool[Tensor, "batch pos"]  # real and not BOS: the tokens statistics count
    indices: list[int]  # the chunks' positions in the list they came from


@dataclass(frozen=True)
class Corpus:
    """Documents to run a model over, or ``documents=None`` to sample from the model."""

    documents: tuple[str, ...] | None
    """The texts; None: sequences sampled from the model."""
    name: str
    """Where the text came from, for reports."""

    @classmethod
    def read(cls, source: CorpusSource | Corpus) -> Corpus:
        """A corpus from strings, a ``.txt``/``.jsonl`` path, or ``None`` (model samples).

        Args:
            source: an iterable of strings; a path to a ``.txt`` file (documents
                separated by blank lines) or a ``.jsonl`` file (a ``"text"``
                field per line); ``None`` to sample from the model; or a corpus.

        Returns:
            The corpus.
        """
        if isinstance(source, Corpus):
            return source
        if source is None:
            return cls(None, "samples from the model")
        if isinstance(source, str | os.PathLike):
            return cls(tuple(_read_file(Path(source))), str(source))
        texts = list(source)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"corpus must hold strings, got {type(bad[0]).__name__}: {bad[0]!r}")
        return cls(tuple(texts), f"{len(texts)} texts")

    @property
    def sampled(self) -> bool:
        """Whether the text is sampled from the model rather than given."""
        return self.documents is None

    def id(self, seed: int = 0) -> str:
        """A short digest of the documents (or of the sampling settings), for cache keys."""
        if self.documents is None:
            return f"sampled{SAMPLE_LENGTH}s{seed}rows"  # rows: each drawn from its own uniforms
        sha = hashlib.sha256()
        for text in self.documents:
            sha.update(hashlib.sha256(text.encode()).digest())
        return sha.hexdigest()[:12]

    def chunks(
        self,
        model: Model,
        *,
        n_tokens: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        seed: int = 0,
        batch_size: int = 64,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> list[Chunk]:
        """The corpus cut into windows, until ``n_tokens`` non-BOS tokens (or the end).

        Args:
            model: the model whose tokenizer reads (or which samples) the text.
            n_tokens: stop once this many non-BOS tokens are in the chunks; ``None``
                takes every document whole (required for a sampled corpus: it
                says how much to sample).
            max_length: the longest chunk, BOS included (capped at ``n_ctx``).
            seed: seeds the sampling of a sampled corpus.
            batch_size: sequences sampled at once.
            cache_dir: where sampled sequences are cached (see :mod:`rome_lens.core.cache`).
            progress: show a progress bar while sampling.

        Returns:
            The chunks, in document order.
        """
        if n_tokens is not None and n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        if self.documents is None:
            if n_tokens is None:
                raise ValueError("a sampled corpus needs n_tokens: how many tokens to sample")
            samples = _model_samples(model, n_tokens, seed, batch_size, cache_dir, progress)
            return [Chunk(i, 0, tokens) for i, tokens in enumerate(samples)]
        chunks = list(self._windows(model, n_tokens, max_length))
        if not chunks:
            raise ValueError(f"the corpus {self.name} holds no text")
        return chunks

    def _windows(self, model: Model, n_tokens: int | None, max_length: int) -> Iterator[Chunk]:
        assert self.documents is not None
        bos = bos_tokens(model)
        step = min(max_length, model.cfg.n_ctx) - len(bos)
        if step < 1:
            raise ValueError(f"max_length must exceed the BOS length, got {max_length}")
        remaining = math.inf if n_tokens is None else n_tokens
        for doc, text in enumerate(self.documents):
            body = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
            for start in range(0, len(body), step):
                piece = body[start : start + int(min(step, remaining))]
                yield Chunk(doc, start, torch.cat([bos, piece]))
                remaining -= len(piece)
                if remaining <= 0:
                    return


def token_batches(model: Model, chunks: Sequence[Chunk], batch_size: int) -> Iterator[Batch]:
    """Right-padded batches of chunks, shortest first.

    Right padding needs no attention mask: under causal attention real tokens
    never see the pads that follow them.

    Args:
        model: the model the chunks are for (its BOS token is not counted).
        chunks: from :meth:`Corpus.chunks`.
        batch_size: most chunks per batch.

    Yields:
        One :class:`Batch` per forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    bos = bos_tokens(model)
    bos_id = int(bos[0]) if len(bos) else None
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens))  # little padding
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        tokens, mask = pad([chunks[i].tokens for i in indices], 0, "right")
        real = mask.bool()
        counted = real.clone()
        if bos_id is not None:
            counted[:, 0] &= tokens[:, 0] != bos_id
        yield Batch(tokens, real, counted, indices)


def bos_tokens(model: Model) -> Int[Tensor, " n"]:
    """``[BOS]`` as the model prepends it, or an empty tensor for models that prepend nothing.

    Args:
        model: any TransformerLens model with a tokenizer.

    Returns:
        The tokens the model puts before a text (empty if none).
    """
    return model.to_tokens("", truncate=False)[0]


def _start_token(model: Model) -> Int[Tensor, " 1"]:
    """The token unconditioned samples start from: the tokenizer's BOS, else its EOS."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(model.tokenizer, name, None)
        if token is not None:
            return torch.tensor([token])
    raise ValueError(
        "sampling a corpus needs a BOS or EOS token to start from, and this model's "
        "tokenizer has neither; pass corpus= texts instead"
    )


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"corpus path {str(path)!r} is not a file")
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [
                _jsonl_text(line, path, number)
                for number, line in enumerate(f, start=1)
                if line.strip()
            ]
    return [doc for doc in path.read_text().split("\n\n") if doc.strip()]


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number} is not valid JSON: {err}") from err
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise ValueError(f'{path}:{number} has no string "text" field')
    return text


def _model_samples(
    model: Model,
    n_tokens: int,
    seed: int,
    batch_size: int,
    cache_root: str | os.PathLike[str] | None,
    progress: bool,
) -> list[Tensor]:
    """``ceil(n_tokens / 64)`` sequences sampled from the start token (shorter if n_ctx is).

    The rows come from the sample shipped for this model where there is one
    (:func:`shipped_sample`), else from the cache, else from the model; rows
    the shipped sample lacks are sampled and cached. A model that prepends no
    BOS is still sampled from its tokenizer's start token (unconditioned text
    needs a first token), which is then dropped: the samples are text as that
    model reads it.
    """
    length = min(SAMPLE_LENGTH, model.cfg.n_ctx - 1)
    n_sequences = math.ceil(n_tokens / length)
    shipped, not_shipped = _shipped(model, seed, length)
    if shipped is not None and len(shipped) >= n_sequences:
        return _as_read(model, shipped[:n_sequences])
    name = f"samples-{model_fingerprint(model)}-s{seed}-{n_sequences}x{length}-rows.st"
    path = cache_dir(cache_root) / "samples" / name
    try:
        return list(load_tensors(path)[0]["tokens"])
    except FileNotFoundError:
        pass
    except (CacheError, KeyError) as err:
        discard(path, str(err))
    for reason in not_shipped:
        warnings.warn(f"rome_lens: sampling the corpus: {reason}", stacklevel=4)
    first = 0 if shipped is None else len(shipped)
    more = _sample_rows(model, range(first, n_sequences), seed, length, batch_size, progress)
    tokens = _as_read(model, more if shipped is None else torch.cat([shipped, more]))
    if is_main(Split.of(None)):  # under torch.distributed, every rank samples the same; one writes
        save_tensors(path, {"tokens": torch.stack(tokens)}, {"seed": seed})
    return tokens


def _sample_rows(
    model: Model, rows: range, seed: int, length: int, batch_size: int, progress: bool
) -> Int[Tensor, "rows length_plus_1"]:
    """Rows ``rows`` of the seeded sample: the start token, then ``length`` sampled tokens.

    Row ``i`` reads the ``i``-th row of one seeded ``[rows, length]`` draw of
    uniform numbers, so it is the same text whatever else is sampled beside
    it, and a longer sample extends a shorter one. (Up to rounding: a batch of
    another size multiplies in another order, and a row can part from its
    twin where two tokens are all but tied.)
    """
    uniforms = torch.rand(rows.stop, length, generator=torch.Generator().manual_seed(seed))
    start = _first_token(model).view(1, 1)
    batches = []
    bar = tqdm(total=len(rows) * length, desc="sampling corpus", unit="tok", disable=not progress)
    with bar:
        for first in range(rows.start, rows.stop, batch_size):
            last = min(first + batch_size, rows.stop)
            prompts = start.expand(last - first, 1)
            batches.append(
                sample_tokens(model, prompts, length, uniforms=uniforms[first:last], bar=bar)
            )
    return to_host(torch.cat(batches))  # one move, after the last batch


def _first_token(model: Model) -> Int[Tensor, " 1"]:
    """The token samples start from: the model's BOS, else its tokenizer's start token."""
    bos = bos_tokens(model)
    return bos[:1] if len(bos) else _start_token(model)


def _as_read(model: Model, rows: Int[Tensor, "rows length_plus_1"]) -> list[Tensor]:
    """Sampled rows as the model reads text: with the start token if it prepends BOS."""
    return list(rows if len(bos_tokens(model)) else rows[:, 1:])


def shipped_sample(model: Model, seed: int, length: int) -> Int[Tensor, "rows pos"] | None:
    """The sample shipped inside the package for this model, if there is one.

    A model's default corpus costs minutes to sample and a few hundred
    kilobytes to store, so the default model's comes with rome_lens
    (``rome_lens/core/data/``). A shipped file names the model fingerprints it
    was drawn for (each backend, with and without BOS); a model whose
    fingerprint is not among them gets ``None`` and is sampled as any other
    model is. When that happens to a model of the shipped file's name (other
    weights, dtype or configuration, or an edit), or a shipped file fails its
    checksum, :meth:`Corpus.chunks` says so in a warning before it samples.

    Args:
        model: the model that would sample.
        seed: the sample's seed.
        length: tokens per row after the start token.

    Returns:
        ``[rows, 1 + length]`` token ids (the start token first), or ``None``.
    """
    return _shipped(model, seed, length)[0]


def _shipped(
    model: Model, seed: int, length: int
) -> tuple[Int[Tensor, "rows pos"] | None, list[str]]:
    """The shipped rows for this model, or ``None`` and why the files of its name do not serve."""
    fingerprint, reasons = None, []
    for path in sorted(SHIPPED_SAMPLES.glob("*.st")):
        try:
            tensors, meta = load_tensors(path, what="shipped sample")
            tokens = tensors["tokens"].long()
            if tokens.dim() != 2:
                raise CacheError(f"its tokens are {tokens.dim()}-d, not [rows, pos]")
        except (FileNotFoundError, CacheError, KeyError) as err:
            reasons.append(f"the shipped sample {path.name} is unreadable ({err})")
            continue
        if meta.get("seed") != seed or tokens.shape[1] != length + 1:
            continue
        if not bool((tokens[:, 0] == _first_token(model)).all()):
            continue
        fingerprint = fingerprint or model_fingerprint(model)
        found = meta.get("fingerprints")
        drawn_for = [str(f) for f in found] if isinstance(found, list) else []
        if fingerprint in drawn_for:
            return tokens, []
        if meta.get("model_name") == getattr(model.cfg, "model_name", None):
            reasons.append(
                f"the sample shipped for {meta.get('model_name')} was drawn from models of "
                f"fingerprint {', '.join(drawn_for)}; this model's is {fingerprint} (its weights, "
                "dtype or configuration differ)"
            )
    return None, reasons


def write_shipped_sample(
    model: Model,
    path: str | os.PathLike[str],
    *,
    n_tokens: int,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Sample the default corpus of ``model`` and write it as a shipped sample.

    Args:
        model: the model to sample from.
        path: the ``.st`` file to write (its sidecar beside it).
        n_tokens: tokens to sample (rounded up to whole rows).
        seed: the seed, as :meth:`Corpus.chunks` takes it.
        progress: show a progress bar counting the tokens sampled.

    Returns:
        The path written.
    """
    length = min(SAMPLE_LENGTH, model.cfg.n_ctx - 1)
    rows = _sample_rows(model, range(math.ceil(n_tokens / length)), seed, length, 64, progress)
    meta = {"seed": seed, "model_name": model.cfg.model_name, "fingerprints": []}
    save_tensors(Path(path), {"tokens": rows.to(torch.int32)}, meta)
    return add_shipped_fingerprint(model, path)


def add_shipped_fingerprint(model: Model, path: str | os.PathLike[str]) -> Path:
    """Record that ``model`` (with and without BOS) draws the shipped sample at ``path``.

    The same weights under another backend (TL 3's ``HookedTransformer``) or
    another BOS setting sample the same text, but fingerprint differently.

    Args:
        model: the model, on the backend to add.
        path: a file written by :func:`write_shipped_sample`.

    Returns:
        The path.
    """
    path = Path(path)
    tensors, meta = load_tensors(path, what="shipped sample")
    fingerprints = list(meta["fingerprints"])  # type: ignore[call-overload]
    if meta["model_name"] != model.cfg.model_name:
        raise ValueError(
            f"{path} was sampled from {meta['model_name']}, not {model.cfg.model_name}"
        )
    chosen = model.cfg.default_prepend_bos
    try:
        for prepend in (False, True):
            model.cfg.default_prepend_bos = prepend
            fingerprints.append(model_fingerprint(model))
    finally:
        model.cfg.default_prepend_bos = chosen
    meta["fingerprints"] = sorted(set(fingerprints))
    save_tensors(path, tensors, meta)
    return path
