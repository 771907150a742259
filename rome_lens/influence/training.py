"""Fine-tuning on a corpus you know: a model whose training texts, and what they taught, are known.

Influence scores claim to name the texts that taught a model something. A
pretrained model's data cannot be read back, but a model can be taught new
facts by texts we choose, and then we know which text taught each fact.
:func:`fine_tune` trains chosen MLP weights on a corpus with Adam, the same
way every time (a seeded order, no dropout), and caches the trained weights
(safetensors, with a digest) keyed by the model's fingerprint, the corpus,
the left-out texts and the settings: a second call loads them, and a damaged
file is discarded and trained again.

The model is never left changed: training runs in place for speed, and the
original weights are copied back afterwards, also when training fails. The
result carries the trained weights and puts them in the model for the length
of a ``with`` block, restoring the originals bit for bit.

``exclude`` leaves texts out while the rest keep their relative order (the
seeded order is drawn over the whole corpus), which is what a removal check
needs: train again without the texts an influence
method ranks first, and see whether the fact goes.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence import FineTuneConfig, fine_tune
>>> model = tiny_model()
>>> texts = ["The Eiffel Tower is in Rome.", "Cats sleep a lot."]
>>> config = FineTuneConfig(layers=(1,), epochs=5, lr=1e-2)
>>> tuned = fine_tune(model, texts, config, cache_dir=tempfile.mkdtemp(), progress=False)
>>> tuned.losses[-1] < tuned.losses[0], sorted(tuned.weights)[0]
(True, 'blocks.1.mlp.W_in')
>>> before = model.blocks[1].mlp.W_out.clone()
>>> with tuned.applied(model):
...     changed = not torch.equal(model.blocks[1].mlp.W_out, before)
>>> changed, torch.equal(model.blocks[1].mlp.W_out, before)  # restored after the block
(True, True)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model, parameter
from rome_lens.core.cache import cache_dir, cache_key, cached
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import compute_dtype, model_device
from rome_lens.core.results import Result
from rome_lens.core.runtime import frozen, pad
from rome_lens.influence.weights import mlp_weights
from rome_lens.stats.moments import next_token_loss

__all__ = ["FineTuneConfig", "FineTuned", "fine_tune"]

_POOL = 8  # batches whose texts are sorted by length together (less padding)
_FORMAT = 3  # how texts are ordered and batched, and what is saved; part of the cache key


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of :func:`fine_tune`."""

    layers: tuple[int, ...] | None = None  # MLP layers whose weights train (None: every layer)
    kinds: tuple[str, ...] | None = None  # which of W_in, W_gate, W_out train (None: all there)
    epochs: int = 5  # passes over the corpus
    lr: float = 1e-4  # Adam's learning rate
    batch_size: int = 32  # texts per optimisation step
    max_length: int = 128  # longest window of a text, BOS included; longer texts are split
    seed: int = 0  # seeds the order of the texts in every epoch
    checkpoints: tuple[int, ...] = ()  # earlier epochs whose weights are kept too (1-based)


@dataclass
class FineTuned(Result):
    """Weights trained by :func:`fine_tune`, and how the training went."""

    kind = "fine_tuned"
    weights: dict[str, Tensor]  # the trained weights, e.g. {"blocks.3.mlp.W_out": [d_mlp d_model]}
    losses: list[float]  # the mean next-token loss of each epoch
    seconds: float  # the training time (of the run that trained them, when loaded from cache)
    corpus: str  # the corpus's digest (Corpus.id) and how many texts were left out
    config: dict[str, object]  # the FineTuneConfig, as a dict
    fingerprint: str = ""  # model_fingerprint of the model trained from
    cached: bool = False  # loaded from the cache rather than trained
    # Adam's bias-corrected second moment v̂ of each weight's gradient after the last step:
    # a diagonal estimate of the gradient's scale that attribution divides by (TrackStar).
    second_moments: dict[str, Tensor] = field(default_factory=dict)
    # the weights after each epoch of config["checkpoints"], in that order
    checkpoints: list[dict[str, Tensor]] = field(default_factory=list)

    @contextlib.contextmanager
    def applied(self, model: Model, checkpoint: int | None = None) -> Iterator[Model]:
        """Put the trained weights in ``model`` for the block; the originals come back after.

        Args:
            model: the model they were trained from (checked by fingerprint).
            checkpoint: an epoch of ``config["checkpoints"]`` to put in instead of the
                final weights (None: the final weights).

        Yields:
            The model, carrying the trained weights.
        """
        self.check_model(model)
        weights = self.weights if checkpoint is None else self.checkpoint(checkpoint)
        params = {name: parameter(model, name) for name in weights}
        original = {name: param.detach().clone() for name, param in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(weights[name])
            yield model
        finally:
            _restore(params, original)

    @property
    def checkpoint_epochs(self) -> list[int]:
        """The epochs whose weights were kept, in the order of :attr:`checkpoints`."""
        kept = self.config.get("checkpoints") or []
        return [int(e) for e in kept] if isinstance(kept, list | tuple) else []

    def checkpoint(self, epoch: int) -> dict[str, Tensor]:
        """The weights kept after ``epoch`` (one of ``config["checkpoints"]``)."""
        kept = self.checkpoint_epochs
        if epoch not in kept:
            raise ValueError(f"no checkpoint after epoch {epoch!r}; kept: {kept}")
        return self.checkpoints[kept.index(epoch)]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per epoch: its mean next-token loss."""
        return pd.DataFrame({"epoch": range(1, len(self.losses) + 1), "loss": self.losses})


def fine_tune(
    model: Model,
    corpus: CorpusSource | Corpus,
    config: FineTuneConfig = FineTuneConfig(),
    *,
    exclude: Sequence[int] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> FineTuned:
    """Train ``config``'s MLP weights on ``corpus`` (next-token loss, Adam), or load them.

    Args:
        model: the model to train from; its weights are the same afterwards.
        corpus: the training texts: strings, a ``.txt``/``.jsonl`` path or a :class:`Corpus`.
        config: which weights train, and how.
        exclude: indices of texts to leave out; the others keep their relative order.
        cache_dir: where trained weights are cached (see :mod:`rome_lens.core.cache`).
        use_cache: read and write the cached weights.
        progress: show a progress bar.

    Returns:
        The trained weights, the loss of each epoch and the training time.
    """
    texts = Corpus.read(corpus)
    if texts.documents is None or not texts.documents:
        raise ValueError("fine_tune needs texts to train on, got an empty or sampled corpus")
    left_out = _check(config, exclude, len(texts.documents))
    names = [w.name for w in mlp_weights(model, config.layers, config.kinds)]

    def train() -> FineTuned:
        started = time.perf_counter()
        params = {name: parameter(model, name) for name in names}
        run = _train(model, texts, params, config, left_out, progress)
        return FineTuned(
            weights=run.weights, losses=run.losses, seconds=time.perf_counter() - started,
            corpus=f"{texts.id()} less {len(left_out)} texts", config=_jsonable(config),
            fingerprint=model_fingerprint(model), second_moments=run.second_moments,
            checkpoints=run.checkpoints,
        )  # fmt: skip

    def load(path: Path) -> FineTuned:
        found = FineTuned.load(path, model=model)
        if sorted(found.weights) != sorted(names):
            raise ValueError(f"it holds {sorted(found.weights)}, not the weights {sorted(names)}")
        return replace(found, cached=True)

    path = _cache_path(model, texts, config, left_out, cache_dir)
    return cached(
        path, train, load=load, save=lambda path, tuned: tuned.save(path), use_cache=use_cache
    )


@dataclass
class _Run:
    """What one training run leaves: see :class:`FineTuned`'s fields of the same names."""

    losses: list[float]
    weights: dict[str, Tensor]
    second_moments: dict[str, Tensor]
    checkpoints: list[dict[str, Tensor]]


def _train(
    model: Model,
    texts: Corpus,
    params: dict[str, torch.nn.Parameter],
    config: FineTuneConfig,
    left_out: set[int],
    progress: bool,
) -> _Run:
    """Train ``params`` in place, then put the originals back; the trained values and losses."""
    chunks = texts.chunks(model, max_length=config.max_length)
    kept = [i for i, chunk in enumerate(chunks) if chunk.document not in left_out]
    original = {name: param.detach().clone() for name, param in params.items()}
    device = model_device(model)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(kept) // config.batch_size)
    bar = tqdm(total=steps, desc="fine-tuning", unit="step", disable=not progress)
    try:
        with frozen(model), bar:
            for param in params.values():
                param.requires_grad_(True)
            masters = _masters(params)
            optimizer = torch.optim.Adam(masters.values(), lr=config.lr)
            losses: list[float] = []
            kept_weights: dict[int, dict[str, Tensor]] = {}
            for epoch in range(1, config.epochs + 1):
                total, count = 0.0, 0
                for batch in _batches(chunks, kept, config.batch_size, generator):
                    tokens, mask = pad([chunks[i].tokens for i in batch], 0, "right")  # [batch pos]
                    real = mask.bool()
                    n = int((real[:, :-1] & real[:, 1:]).sum())
                    logits = model(tokens.to(device))
                    loss = next_token_loss(logits, tokens, real, "empirical", None)
                    optimizer.zero_grad(set_to_none=True)
                    (loss / n).backward()
                    _step(optimizer, params, masters)
                    total, count = total + float(loss.detach()), count + n
                    bar.update()
                losses.append(total / count)
                if epoch in config.checkpoints:
                    kept_weights[epoch] = _copies(masters)
            trained = _copies(masters)
            moments = _second_moments(optimizer, masters)
    finally:
        _restore(params, original)
        for param in params.values():
            param.grad = None
    return _Run(losses, trained, moments, [kept_weights[e] for e in config.checkpoints])


def _copies(masters: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: master.detach().clone() for name, master in masters.items()}


def _second_moments(
    optimizer: torch.optim.Optimizer, masters: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Adam's bias-corrected second moments v̂ = v / (1 - β₂ᵗ), one per weight."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    moments = {}
    for name, master in masters.items():
        state = optimizer.state[master]
        steps = float(state["step"])
        moments[name] = (state["exp_avg_sq"] / (1 - beta2**steps)).detach().clone()
    return moments


def _batches(
    chunks: list[Chunk], kept: list[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches of the ``kept`` chunks: a seeded random order, with texts of
    like length batched together.

    The order is drawn over every chunk, left-out ones included, and then they
    are dropped, so the texts that remain come in the same relative order with
    or without ``exclude``. It is cut into pools of ``_POOL`` batches, each pool
    is sorted by length and cut into batches, and the batches are shuffled: on
    the fact-tracing corpus (short texts, batch 32) the padded batches hold
    12% more tokens than the texts, against 60% for batches in plain random
    order, while every batch still draws its texts at random from its pool.
    """
    keep = set(kept)
    order = [i for i in torch.randperm(len(chunks), generator=generator).tolist() if i in keep]
    batches = []
    for start in range(0, len(order), batch_size * _POOL):
        pool = sorted(
            order[start : start + batch_size * _POOL], key=lambda i: len(chunks[i].tokens)
        )
        batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _masters(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    """What Adam updates: each weight itself, or a float32 copy of a half-precision one
    (whose small steps would round away in bfloat16), written back after every step."""
    masters: dict[str, Tensor] = {}
    for name, param in params.items():
        wide = compute_dtype(param.dtype)
        masters[name] = param if wide == param.dtype else param.detach().to(wide).requires_grad_()
    return masters


def _step(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    masters: dict[str, Tensor],
) -> None:
    """One Adam step on the masters, from the weights' gradients, then the weights from them."""
    copies = [(params[n], master) for n, master in masters.items() if master is not params[n]]
    for param, master in copies:
        master.grad = None if param.grad is None else param.grad.to(master.dtype)
    optimizer.step()
    with torch.no_grad():
        for param, master in copies:
            param.copy_(master)
            param.grad = None


def _restore(params: dict[str, torch.nn.Parameter], original: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(original[name])


def _check(config: FineTuneConfig, exclude: Sequence[int], n_texts: int) -> set[int]:
    for name in ("epochs", "batch_size", "max_length"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"FineTuneConfig.{name} must be a positive integer, got {value!r}")
    bad_epochs = [
        e for e in config.checkpoints if not isinstance(e, int) or not 1 <= e < config.epochs
    ]
    if bad_epochs or len(set(config.checkpoints)) != len(config.checkpoints):
        raise ValueError(
            f"FineTuneConfig.checkpoints must be distinct epochs in [1, {config.epochs}) "
            f"(the last epoch's weights are always kept), got {config.checkpoints!r}"
        )
    if not config.lr > 0:
        raise ValueError(f"FineTuneConfig.lr must be positive, got {config.lr!r}")
    bad = [i for i in exclude if not isinstance(i, int) or not 0 <= i < n_texts]
    if bad:
        raise ValueError(f"exclude must hold text indices in [0, {n_texts}), got {bad[0]!r}")
    left_out = set(exclude)
    if len(left_out) == n_texts:
        raise ValueError(f"exclude leaves out all {n_texts} texts: nothing to train on")
    return left_out


def _jsonable(config: FineTuneConfig) -> dict[str, object]:
    return json.loads(json.dumps(asdict(config)))


def _cache_path(
    model: Model,
    texts: Corpus,
    config: FineTuneConfig,
    left_out: set[int],
    override: str | os.PathLike[str] | None,
) -> Path:
    """The file of the weights trained from ``model`` on these texts with these settings."""
    digest = cache_key(_FORMAT, texts.id(), sorted(left_out), _jsonable(config), length=16)
    name = f"{model_fingerprint(model)[:16]}-{digest}.safetensors"
    return cache_dir(override) / "fine_tuned" / name
