"""Key statistics: the second moment C = E[k kᵀ] of an MLP's keys over text.

ROME treats ``blocks.{L}.mlp.W_out`` as a linear associative memory: the MLP's
hidden activation ``k`` (TransformerLens's ``blocks.{L}.mlp.hook_post``) is a
key, and ``W_outᵀ k`` is the value it recalls. An edit that inserts a new
key-value pair while disturbing the other keys as little as possible (in the
least-squares sense, over the keys the model actually meets) needs their second
moment ``C``. :func:`key_second_moment` estimates it:

* **accumulated in float64**, ``C = Σ k kᵀ / n`` over every non-BOS token;
* **over text you pass** (an iterable of strings, or a path to a ``.txt`` file,
  split into documents at blank lines, or a ``.jsonl`` file with a ``"text"``
  field per line), or, by default, **over text the model samples itself**:
  sequences of 64 tokens from BOS, full-distribution sampling, seeded and
  batched. That keeps statistics offline and model-agnostic; the model's own
  samples are, by construction, text it finds typical;
* **cached on disk** in the rome_lens cache folder, keyed by the fingerprint of
  the weights feeding the key (:mod:`rome_lens.fingerprint`), the layer, the
  corpus and ``n_tokens``. An entry computed on another model is never read, and
  a corrupt one is rebuilt.

The default sample, ``n_tokens=20_000``, is about 13 times ``d_mlp`` for the
default model, enough for a well-conditioned C at the layers ROME edits there
(condition numbers 220 to 48,000 at layers 2 to 12), and it takes about 100 s
the first time on a 2-core CPU, nearly all of it sampling, which happens once
per model and is shared by every layer. ``bench/bench_rome.py --only n_tokens``
measures editing quality against the sample size.

>>> import rome_lens, tempfile
>>> from rome_lens.stats import key_second_moment
>>> model = rome_lens.tiny_model()
>>> texts = ["The Eiffel Tower is in Paris.", "The Louvre is a museum in Paris."]
>>> stats = key_second_moment(model, 1, corpus=texts, progress=False,
...                           cache_dir=tempfile.mkdtemp())
>>> stats.moment.shape, stats.moment.dtype, stats.n_tokens
(torch.Size([256, 256]), torch.float64, 20)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rome_lens.cache import CacheError, cache_dir, discard, load_tensors, save_tensors
from rome_lens.fingerprint import check_layer, model_fingerprint
from rome_lens.generation import sample_tokens
from rome_lens.hooks import attached, capture
from rome_lens.models import linear_layout

__all__ = ["DEFAULT_N_TOKENS", "KeyStats", "checked_stats", "key_second_moment"]

DEFAULT_N_TOKENS = 20_000
SAMPLE_LENGTH = 64  # tokens per sampled sequence, after BOS
MAX_CHUNK = 128  # longest window of corpus text run at once

Corpus = Iterable[str] | str | os.PathLike[str] | None


@dataclass
class KeyStats:
    """The second moment of ``blocks.{layer}.mlp.hook_post`` over a corpus."""

    layer: int
    moment: Float[Tensor, "d_mlp d_mlp"]  # E[k kᵀ], float64
    n_tokens: int  # keys averaged
    corpus: str  # where the text came from
    fingerprint: str  # model_fingerprint(model, upto_layer=layer)
    eigenvalues: Float[Tensor, " d_mlp"]  # of `moment`, ascending

    @property
    def condition_number(self) -> float:
        """Largest over smallest eigenvalue (``inf`` when C is singular)."""
        low, high = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        return high / low if low > 0 else math.inf

    def check(self, model: HookedTransformer, layer: int) -> None:
        """Raise ``ValueError`` unless these statistics belong to ``model`` at ``layer``."""
        if layer != self.layer:
            raise ValueError(f"statistics are for layer {self.layer}, not layer {layer}")
        found = model_fingerprint(model, upto_layer=layer)
        if found != self.fingerprint:
            raise ValueError(
                f"statistics were computed on another model (fingerprint {self.fingerprint}, "
                f"this model's is {found} at layer {layer})"
            )

    def ridge(self, max_condition: float) -> float:
        """What to add to C's diagonal for a condition number of at most ``max_condition``.

        Zero for a well-conditioned C; otherwise it warns, since the edit then
        trusts the statistics less than asked.
        """
        condition = self.condition_number
        if condition <= max_condition:
            return 0.0
        low, high = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        ridge = (high - max_condition * low) / (max_condition - 1)
        warnings.warn(
            f"key statistics of layer {self.layer} are ill-conditioned (condition number "
            f"{condition:.3g} from {self.n_tokens} tokens): adding {ridge:.3g} to the diagonal; "
            "compute them over more tokens",
            stacklevel=3,
        )
        return ridge

    def regularised(self, ridge: float) -> Float[Tensor, "d_mlp d_mlp"]:
        """C + ridge · I (float64)."""
        return self.moment + ridge * torch.eye(len(self.moment), dtype=self.moment.dtype)

    def to_dataframe(self) -> pd.DataFrame:
        """One row: layer, token count, corpus and conditioning."""
        return pd.DataFrame(
            [
                {
                    "layer": self.layer,
                    "n_tokens": self.n_tokens,
                    "corpus": self.corpus,
                    "fingerprint": self.fingerprint,
                    "trace": self.moment.trace().item(),
                    "condition_number": self.condition_number,
                }
            ]
        )


def key_second_moment(
    model: HookedTransformer,
    layer: int,
    *,
    corpus: Corpus = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    batch_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> KeyStats:
    """Estimate C = E[k kᵀ] of ``blocks.{layer}.mlp.hook_post`` over ``n_tokens`` tokens.

    Args:
        corpus: strings, a ``.txt``/``.jsonl`` path, or ``None`` to sample text
            from the model (seeded by ``seed``).
        n_tokens: how many keys to average (fewer if a given corpus runs out).
        cache_dir: the rome_lens cache folder (default: see :mod:`rome_lens.cache`).
        use_cache: read and write the disk cache.
    """
    check_layer(model, layer)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    fingerprint = model_fingerprint(model, upto_layer=layer)
    texts, corpus_name = _read_corpus(corpus)
    corpus_id = _corpus_id(texts, seed)
    path = cache_dir_for_stats(cache_dir) / f"L{layer}-{fingerprint}-{corpus_id}-{n_tokens}.st"
    if use_cache:
        cached = _load(path, fingerprint, layer)
        if cached is not None:
            return cached
    if texts is None:
        sequences = _model_samples(model, n_tokens, seed, batch_size, cache_dir, progress)
    else:
        sequences = list(_chunks(model, texts, n_tokens))
        if not sequences:
            raise ValueError(f"the corpus {corpus_name} holds no text")
    moment, count = _accumulate(model, layer, sequences, n_tokens, batch_size, progress)
    stats = KeyStats(
        layer=layer,
        moment=moment,
        n_tokens=count,
        corpus=corpus_name,
        fingerprint=fingerprint,
        eigenvalues=torch.linalg.eigvalsh(moment),
    )
    if use_cache:
        tensors = {"moment": stats.moment, "eigenvalues": stats.eigenvalues}
        meta = {"layer": layer, "n_tokens": count, "corpus": corpus_name}
        save_tensors(path, tensors, {**meta, "fingerprint": fingerprint})
    return stats


def checked_stats(
    model: HookedTransformer,
    layer: int,
    stats: KeyStats | None,
    *,
    n_tokens: int = DEFAULT_N_TOKENS,
    progress: bool = True,
) -> KeyStats:
    """``stats`` after checking they belong to ``model`` at ``layer``; if ``None``, the cached
    (or newly computed) statistics over ``n_tokens`` sampled tokens."""
    if stats is None:
        return key_second_moment(model, layer, n_tokens=n_tokens, progress=progress)
    stats.check(model, layer)
    return stats


def cache_dir_for_stats(override: str | os.PathLike[str] | None = None) -> Path:
    """The folder of cached statistics, inside the rome_lens cache folder."""
    return cache_dir(override) / "key_stats"


def _load(path: Path, fingerprint: str, layer: int) -> KeyStats | None:
    try:
        tensors, meta = load_tensors(path)
        if meta.get("fingerprint") != fingerprint or meta.get("layer") != layer:
            raise CacheError(f"it belongs to another model or layer ({meta})")
        n_tokens = meta["n_tokens"]
        assert isinstance(n_tokens, int)
        return KeyStats(
            layer=layer,
            moment=tensors["moment"],
            n_tokens=n_tokens,
            corpus=str(meta["corpus"]),
            fingerprint=fingerprint,
            eigenvalues=tensors["eigenvalues"],
        )
    except FileNotFoundError:
        return None
    except (CacheError, KeyError, AssertionError) as err:
        discard(path, str(err))
        return None


def _read_corpus(corpus: Corpus) -> tuple[list[str] | None, str]:
    """The corpus's documents (``None`` for model samples) and a description."""
    if corpus is None:
        return None, "samples from the model"
    if isinstance(corpus, str | os.PathLike):
        path = Path(corpus)
        if not path.is_file():
            raise ValueError(f"corpus path {str(path)!r} is not a file")
        if path.suffix == ".jsonl":
            return [_jsonl_text(line, path, i) for i, line in _lines(path)], str(path)
        return [doc for doc in path.read_text().split("\n\n") if doc.strip()], str(path)
    texts = list(corpus)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"corpus must hold strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts, f"{len(texts)} texts"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, line


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number} is not valid JSON: {err}") from err
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str):
        raise ValueError(f'{path}:{number} has no string "text" field')
    return text


def _corpus_id(texts: list[str] | None, seed: int) -> str:
    if texts is None:
        return f"sampled{SAMPLE_LENGTH}s{seed}"
    sha = hashlib.sha256()
    for text in texts:
        sha.update(hashlib.sha256(text.encode()).digest())
    return sha.hexdigest()[:12]


def _chunks(model: HookedTransformer, texts: list[str], n_tokens: int) -> Iterator[Tensor]:
    """Each document with BOS, cut into windows, until ``n_tokens`` non-BOS tokens."""
    bos = _bos(model)
    step = min(MAX_CHUNK, model.cfg.n_ctx) - len(bos)
    remaining = n_tokens
    for text in texts:
        body = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
        for start in range(0, len(body), step):
            piece = body[start : start + min(step, remaining)]
            yield torch.cat([bos, piece])
            remaining -= len(piece)
            if remaining <= 0:
                return


def _model_samples(
    model: HookedTransformer,
    n_tokens: int,
    seed: int,
    batch_size: int,
    cache_root: str | os.PathLike[str] | None,
    progress: bool,
) -> list[Tensor]:
    """``ceil(n_tokens / 64)`` sequences sampled from BOS (shorter if n_ctx is), cached."""
    length = min(SAMPLE_LENGTH, model.cfg.n_ctx - 1)
    n_sequences = math.ceil(n_tokens / length)
    name = f"samples-{model_fingerprint(model)}-s{seed}-{n_sequences}x{length}.st"
    path = cache_dir(cache_root) / "samples" / name
    try:
        return list(load_tensors(path)[0]["tokens"])
    except FileNotFoundError:
        pass
    except (CacheError, KeyError) as err:
        discard(path, str(err))
    bos = _bos(model)
    if len(bos) == 0:
        raise ValueError("sampling a corpus needs a BOS token; pass corpus= texts instead")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in tqdm(
        range(0, n_sequences, batch_size), desc="sampling corpus", disable=not progress
    ):
        rows = min(batch_size, n_sequences - start)
        prompts = bos[:1].expand(rows, 1)
        batches.append(sample_tokens(model, prompts, length, generator=generator).cpu())
    tokens = torch.cat(batches)
    save_tensors(path, {"tokens": tokens}, {"seed": seed})
    return list(tokens)


def _accumulate(
    model: HookedTransformer,
    layer: int,
    sequences: list[Int[Tensor, " pos"]],
    n_tokens: int,
    batch_size: int,
    progress: bool,
) -> tuple[Float[Tensor, "d_mlp d_mlp"], int]:
    """Sum of k kᵀ (float64) over the non-BOS positions of ``sequences``, and the count."""
    d_mlp = model.cfg.d_mlp
    assert d_mlp is not None
    moment = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
    count = 0
    bos_id = _bos_id(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding
    hook_name = f"blocks.{layer}.mlp.hook_post"
    with torch.inference_mode(), linear_layout(model):
        for start in tqdm(range(0, len(order), batch_size), desc="keys", disable=not progress):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            keep = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, seq in enumerate(batch):
                tokens[row, : len(seq)] = seq
                keep[row, : len(seq)] = True
                keep[row, 0] &= bos_id is None or int(seq[0]) != bos_id
            store: list[Tensor] = []
            # Right padding needs no mask: under causal attention real tokens never see pads.
            with attached(model, [(hook_name, capture(store))]):
                model(tokens.to(model.cfg.device), stop_at_layer=layer + 1)
            keys = store[0].cpu()[keep][: n_tokens - count].double()
            moment += keys.T @ keys
            count += keys.shape[0]
            if count >= n_tokens:
                break
    return moment / max(count, 1), count


def _bos(model: HookedTransformer) -> Int[Tensor, " n"]:
    """``[BOS]`` as the model prepends it, or an empty tensor for models that prepend nothing."""
    return model.to_tokens("", truncate=False)[0]


def _bos_id(model: HookedTransformer) -> int | None:
    bos = _bos(model)
    return int(bos[0]) if len(bos) else None
