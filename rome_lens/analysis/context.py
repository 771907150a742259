"""How much of its context does each token carry? Contextualization (arXiv 2502.15007, §3.2).

LLM-Microscope measures it by reconstruction. From token i's residual streams
at every depth, ``[h_i^0 … h_i^L]``, an adapter builds one vector
``e_i = g(f([h_i^0 … h_i^L]))``: ``f`` a trainable pooling over depths (softmax
weights over the depths, each depth first divided by its typical norm), ``g``
a two-layer MLP. A decoder (a copy of the model) reads ``e_i`` in place of a
token embedding and reconstructs the tokens before i. The score ``C_i`` is that
reconstruction's cross-entropy: **lower means token i holds more of its context.**

The paper leaves three choices open; rome_lens makes them so (see
``docs/microscope.md`` for what they cost):

* **prefix length**: the ``prefix_length = 8`` tokens before i (tokens with
  fewer predecessors get no score), so every score is over the same task;
* **how e_i enters the decoder**: as the embedding at position 1, after BOS
  (the position the model always sees first), through ``hook_embed``; the
  decoder then reads the prefix teacher-forced and predicts each of its tokens;
* **training**: Adam on the mean cross-entropy, ``steps`` steps of
  ``tokens_per_step`` tokens sampled from a pool of ``n_tokens`` training tokens
  whose residual streams are read once.

Two variants: ``decoder="full"`` trains the decoder copy as well (the paper's),
``decoder="frozen"`` trains only f and g (about a third cheaper per step, and
its adapter is a few MB). ``bench/bench_microscope.py`` measures how well their
rankings of tokens agree.

>>> import tempfile
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis.context import (ContextHyperParams, contextualization,
...                                                   train_context_adapter)
>>> model = tiny_model()
>>> hparams = ContextHyperParams(prefix_length=2, steps=3, n_tokens=200)
>>> adapter = train_context_adapter(model, hparams=hparams, cache_dir=tempfile.mkdtemp(),
...                                 progress=False)
>>> result = contextualization(model, "The Eiffel Tower is in Paris.", adapter, progress=False)
>>> len(result.scores) == len(result.str_tokens), bool(result.scores[:2].isnan().all())
(True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from rome_lens.analysis.states import check_text, state_hooks
from rome_lens.core import backend
from rome_lens.core.backend import Model
from rome_lens.core.cache import cache_dir, cache_key, cached
from rome_lens.core.corpus import Chunk, Corpus, CorpusSource, bos_tokens, token_batches
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.hooks import Hook, attached
from rome_lens.core.precision import compute_dtype, model_device, model_dtype, to_host
from rome_lens.core.results import Result, register_type
from rome_lens.core.runtime import capture, frozen, linear_layout, run_to_layer, unembed

__all__ = [
    "ContextAdapter",
    "ContextHyperParams",
    "Contextualization",
    "contextualization",
    "train_context_adapter",
]

Decoder = Literal["frozen", "full"]


@dataclass(frozen=True)
class ContextHyperParams:
    """Settings of :func:`train_context_adapter` (see the module docstring)."""

    prefix_length: int = 8
    """Tokens before token i that the decoder reconstructs."""
    decoder: Decoder = "frozen"
    """``"frozen"``: only f and g train; ``"full"``: a copy of the model trains too."""
    steps: int = 300
    """Optimisation steps."""
    tokens_per_step: int = 16
    """Tokens whose prefixes are reconstructed per optimisation step (formerly ``batch_size``,
    the name that now means sequences per forward pass)."""
    lr: float = 1e-3
    """Adam learning rate of g."""
    pool_lr: float = 0.03
    """Adam learning rate of f's pooling logits (one per depth)."""
    decoder_lr: float = 1e-5
    """Adam learning rate of the decoder copy (``"full"`` only)."""
    n_tokens: int = 8_192
    """Training tokens; their residual streams are kept in memory."""
    hidden: int | None = None
    """Width of g's hidden layer (``None``: d_model)."""
    seed: int = 0
    """Seeds the sampled corpus, the initialisation and the batches."""

    def __post_init__(self) -> None:
        if self.decoder not in ("frozen", "full"):
            raise ValueError(f"decoder must be 'frozen' or 'full', got {self.decoder!r}")
        for name in ("prefix_length", "steps", "tokens_per_step", "n_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def batch_size(self) -> int:
        """Deprecated name of :attr:`tokens_per_step`."""
        warnings.warn(_RENAMED, DeprecationWarning, stacklevel=2)
        return self.tokens_per_step

    @classmethod
    def from_dict(cls, fields: Mapping[str, object]) -> ContextHyperParams:
        """The settings saved as ``fields`` (by ``dataclasses.asdict``), also when saved
        under the old name ``batch_size``.

        Args:
            fields: the settings, by field name.

        Returns:
            The settings.
        """
        renamed = {"tokens_per_step" if k == "batch_size" else k: v for k, v in fields.items()}
        return cls(**renamed)  # type: ignore[arg-type]


_RENAMED = (
    "ContextHyperParams.batch_size is now tokens_per_step (tokens per optimisation step); "
    "batch_size means sequences per forward pass everywhere in rome_lens"
)


def _accepting_batch_size(init: Callable[..., None]) -> Callable[..., None]:
    """``ContextHyperParams.__init__`` that still takes the deprecated ``batch_size=``."""

    @functools.wraps(init)
    def accepting(self: ContextHyperParams, *args: Any, **kwargs: Any) -> None:
        if "batch_size" in kwargs:
            warnings.warn(_RENAMED, DeprecationWarning, stacklevel=2)
            if "tokens_per_step" in kwargs:
                raise TypeError("pass tokens_per_step or its old name batch_size, not both")
            kwargs["tokens_per_step"] = kwargs.pop("batch_size")
        init(self, *args, **kwargs)

    return accepting


ContextHyperParams.__init__ = _accepting_batch_size(ContextHyperParams.__init__)  # type: ignore[method-assign]


class _Adapter(nn.Module):
    """f (softmax pooling over depths, each divided by its typical norm) then g (an MLP)."""

    scales: Tensor
    out_scale: Tensor

    def __init__(self, scales: Tensor, d_model: int, hidden: int, out_scale: float) -> None:
        super().__init__()
        self.pool = nn.Parameter(torch.zeros(len(scales)))
        self.register_buffer("scales", scales.float())
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, states: Float[Tensor, "batch depth d"]) -> Float[Tensor, "batch d"]:
        weights = self.pool.softmax(0)
        pooled = (weights[None, :, None] * states / self.scales[None, :, None]).sum(1)
        return self.out_scale * self.down(nn.functional.gelu(self.up(pooled)))

    def weights(self) -> Tensor:
        return self.pool.detach().softmax(0)


@dataclass(repr=False)
class ContextAdapter(Result):
    """A trained f and g (and, for ``decoder="full"``, the trained decoder copy)."""

    kind = "context_adapter"
    adapter: dict[str, Tensor]  # f and g's parameters and buffers
    decoder: dict[str, Tensor]  # the decoder copy's weights ("full"), else empty
    hparams: dict[str, object]  # the ContextHyperParams it was trained with
    losses: list[float]  # training loss at each step
    corpus: str  # where the training text came from
    fingerprint: str  # model_fingerprint of the model it reads
    seconds: float = 0.0  # training time

    def __repr__(self) -> str:
        settings = self.settings
        return (
            f"ContextAdapter(decoder={settings.decoder!r}, prefix_length="
            f"{settings.prefix_length}, {len(self.losses)} steps, final loss "
            f"{self.losses[-1] if self.losses else float('nan'):.3f})"
        )

    @property
    def settings(self) -> ContextHyperParams:
        """The settings it was trained with."""
        return ContextHyperParams.from_dict(self.hparams)

    @property
    def depth_weights(self) -> Float[Tensor, " depth"]:
        """f's pooling weights over depths (0: the embeddings; l + 1: after block l)."""
        return self.adapter["pool"].softmax(0)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per training step: the loss."""
        return pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses})

    def modules(self, model: Model) -> tuple[_Adapter, Model]:
        """f and g as a module, and the decoder (the model itself when it is frozen)."""
        self.check_model(model)
        hidden = int(self.adapter["up.weight"].shape[0])
        adapter = _Adapter(self.adapter["scales"], model.cfg.d_model, hidden, 1.0)
        adapter.load_state_dict(self.adapter)
        decoder = model
        if self.decoder:
            decoder = backend.copy_model(model)
            decoder.load_state_dict(self.decoder, strict=False)
        return adapter.to(model_device(model)).eval(), decoder


@dataclass
class Contextualization(Result):
    """Each token's contextualization score: how badly its prefix is reconstructed from it."""

    kind = "contextualization"
    text: str  # the text read
    str_tokens: list[str]  # its tokens (BOS excluded)
    scores: Float[Tensor, " token"]  # C_i, mean cross-entropy of the prefix; nan without one
    depth_weights: Float[Tensor, " depth"]  # the adapter's pooling weights over depths
    decoder: str  # "frozen" or "full"
    prefix_length: int  # tokens reconstructed
    fingerprint: str = ""  # model_fingerprint of the model

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token."""
        return pd.DataFrame(
            {
                "token": range(len(self.str_tokens)),
                "str_token": self.str_tokens,
                "contextualization": self.scores.tolist(),
            }
        )


def train_context_adapter(
    model: Model,
    corpus: CorpusSource | Corpus = None,
    *,
    hparams: ContextHyperParams | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ContextAdapter:
    """Train f and g (and the decoder copy, for ``decoder="full"``) to reconstruct prefixes.

    A frozen-decoder adapter is cached per model fingerprint, corpus and settings;
    a full one (a copy of the model's weights) is not.

    Args:
        model: any TransformerLens model (not changed).
        corpus: training text: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`,
            or ``None`` to sample it from the model.
        hparams: the settings (``None``: :class:`ContextHyperParams` defaults).
        batch_size: sequences per forward pass while the training tokens' residual
            streams are read.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cache (frozen decoder only).
        progress: show progress bars.

    Returns:
        The trained adapter, with its loss at every step.
    """
    hparams = ContextHyperParams() if hparams is None else hparams
    if not isinstance(hparams, ContextHyperParams):
        raise TypeError(f"hparams must be ContextHyperParams, got {type(hparams).__name__}")
    source = Corpus.read(corpus)
    fingerprint = model_fingerprint(model)

    def train() -> ContextAdapter:
        return _train_adapter(model, source, hparams, fingerprint, batch_size, cache_dir, progress)

    return cached(
        _cache_path(fingerprint, source, hparams, cache_dir),
        train,
        load=lambda path: ContextAdapter.load(path, model=model),
        save=lambda path, adapter: adapter.save(path),
        use_cache=use_cache and hparams.decoder == "frozen",
    )


def _train_adapter(
    model: Model,
    source: Corpus,
    hparams: ContextHyperParams,
    fingerprint: str,
    batch_size: int,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> ContextAdapter:
    """Read the training tokens' states once, then train f and g (and the decoder copy)."""
    started = time.perf_counter()
    chunks = source.chunks(
        model,
        n_tokens=hparams.n_tokens,
        max_length=min(128, model.cfg.n_ctx),
        seed=hparams.seed,
        cache_dir=cache_dir,
        progress=progress,
    )
    pool_states, prefixes = _examples(model, chunks, hparams.prefix_length, batch_size, progress)
    if len(prefixes) < hparams.tokens_per_step:
        raise ValueError(
            f"the training text gives {len(prefixes)} tokens with {hparams.prefix_length} "
            f"tokens before them; a step needs {hparams.tokens_per_step}: pass more text"
        )
    generator = torch.Generator().manual_seed(hparams.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hparams.seed)
        adapter = _Adapter(
            pool_states.float().square().sum(-1).mean(0).sqrt(),  # typical norm per depth
            model.cfg.d_model,
            hparams.hidden or model.cfg.d_model,
            float(model.W_E.detach().norm(dim=1).mean()) / model.cfg.d_model**0.5,
        ).to(model_device(model))  # initialised on the CPU: the same f, g on any device
    decoder = model
    if hparams.decoder == "full":
        decoder = backend.copy_model(model)
        trained = compute_dtype(model_dtype(model))
        if trained != model_dtype(model):  # Adam's steps vanish in a half-precision copy
            decoder = decoder.to(trained, print_details=False)
    losses = _train(model, decoder, adapter, pool_states, prefixes, hparams, generator, progress)
    return ContextAdapter(
        adapter={k: v.detach().clone() for k, v in adapter.state_dict().items()},
        decoder={}
        if decoder is model
        else {k: v.detach().clone() for k, v in decoder.state_dict().items()},
        hparams=dataclasses.asdict(hparams),
        losses=losses,
        corpus=source.name,
        fingerprint=fingerprint,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def contextualization(
    model: Model,
    text: str,
    adapter: ContextAdapter | None = None,
    *,
    hparams: ContextHyperParams | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> Contextualization:
    """The contextualization score of every token of ``text``.

    Args:
        model: any TransformerLens model.
        text: the text (read in windows of ``n_ctx`` tokens if longer).
        adapter: a trained adapter (``None``: train one, or load it from the cache,
            on text sampled from the model with ``hparams``).
        hparams: the settings of the adapter trained when ``adapter`` is ``None``.
        cache_dir: the rome_lens cache folder.
        use_cache: read and write the cached adapter, when ``adapter`` is ``None``
            (scores themselves are not cached).
        batch_size: sequences per forward pass while scoring (each token's prefix,
            read by the decoder, is one sequence).
        progress: show progress bars.

    Returns:
        ``C_i`` for every token (nan for the first ``prefix_length`` of each window).

    Raises:
        ValueError: the adapter was trained on another model.
    """
    check_text(text)
    if adapter is None:
        adapter = train_context_adapter(
            model, hparams=hparams, cache_dir=cache_dir, use_cache=use_cache, progress=progress
        )
    settings = adapter.settings
    f_and_g, decoder = adapter.modules(model)
    k = settings.prefix_length
    chunks = Corpus.read([text]).chunks(model, max_length=model.cfg.n_ctx)
    skip = len(bos_tokens(model))
    scores, tokens = [], []
    with frozen(decoder):
        for chunk in chunks:
            states, prefixes = _examples(model, [chunk], k, 1, progress=False)
            chunk_scores = torch.full((len(chunk.tokens) - skip,), float("nan"))
            found = [
                _prefix_loss(
                    decoder, f_and_g(states[i : i + batch_size]), prefixes[i : i + batch_size], skip
                )
                for i in range(0, len(prefixes), batch_size)
            ]
            if found:
                chunk_scores[k:] = to_host(torch.cat(found))  # once per window, to be shown
            scores.append(chunk_scores)
            tokens.append(chunk.tokens[skip:])
    return Contextualization(
        text=text,
        str_tokens=[model.to_single_str_token(t) for t in torch.cat(tokens).tolist()],
        scores=torch.cat(scores),
        depth_weights=adapter.depth_weights,
        decoder=settings.decoder,
        prefix_length=k,
        fingerprint=adapter.fingerprint,
    )


# The names before 0.3, in British spelling: kept as aliases (see the CHANGELOG).
Contextualisation = Contextualization
contextualisation = contextualization
register_type("contextualisation")(Contextualization)  # results saved before 0.3 still load


def _examples(
    model: Model, chunks: list[Chunk], k: int, batch_size: int, progress: bool
) -> tuple[Float[Tensor, "example depth d"], Int[Tensor, "example k"]]:
    """Every token with ``k`` real tokens before it: its states at every depth, and the k tokens.

    Examples come chunk by chunk in the order of ``chunks``, each chunk's in position order;
    the chunks are read ``batch_size`` at a time.
    """
    names = state_hooks(model)
    skip = len(bos_tokens(model))
    found: dict[int, tuple[Tensor, Tensor]] = {}
    with torch.no_grad(), linear_layout(model):
        batches = token_batches(model, chunks, batch_size)
        for batch in tqdm(batches, desc="reading states", disable=not progress):
            read = capture(model, batch.tokens, names)
            stacked = torch.stack([read[name] for name in names]).float()  # stays on the device
            for row, index in enumerate(batch.indices):
                tokens = chunks[index].tokens
                positions = range(skip + k, len(tokens))
                if positions:
                    states = stacked[:, row, skip + k : len(tokens)].transpose(0, 1)
                    prefixes = torch.stack([tokens[p - k : p] for p in positions])
                    found[index] = (states, prefixes)
    if not found:
        device = model_device(model)
        return (
            torch.empty(0, len(names), model.cfg.d_model, device=device),
            torch.empty(0, k, dtype=torch.long),
        )
    ordered = [found[i] for i in sorted(found)]
    return torch.cat([s for s, _ in ordered]), torch.cat([p for _, p in ordered])


def _prefix_loss(
    decoder: Model, vectors: Tensor, prefixes: Tensor, skip: int
) -> Float[Tensor, " batch"]:
    """Mean cross-entropy of each prefix, read by the decoder after its vector (and BOS)."""
    batch, k = prefixes.shape
    slot = prefixes[:, :1]  # any token: its embedding is replaced by the vector
    bos = bos_tokens(decoder).to(prefixes.device)  # sampled text's prefixes wait on the CPU
    tokens = torch.cat([bos.expand(batch, -1), slot, prefixes[:, :-1]], dim=1)
    position = skip  # where the vector goes: right after BOS

    def put(act: Tensor, hook: object) -> Tensor:
        act = act.clone()
        act[:, position] = vectors.to(act)
        return act

    hooks: list[tuple[str, Hook]] = [("hook_embed", put)]
    with attached(decoder, hooks):
        resid = run_to_layer(decoder, tokens, decoder.cfg.n_layers)
    reads = resid[:, position : position + k].reshape(batch * k, -1)
    log_probs = unembed(decoder, reads).float().log_softmax(-1)
    nll = -log_probs.gather(-1, prefixes.reshape(-1, 1).to(log_probs.device))[:, 0]
    return nll.view(batch, k).mean(1)


def _train(
    model: Model,
    decoder: Model,
    adapter: _Adapter,
    states: Tensor,
    prefixes: Tensor,
    hparams: ContextHyperParams,
    generator: torch.Generator,
    progress: bool,
) -> list[float]:
    skip = len(bos_tokens(model))
    mlp = [p for name, p in adapter.named_parameters() if name != "pool"]
    groups = [{"params": mlp, "lr": hparams.lr}, {"params": [adapter.pool], "lr": hparams.pool_lr}]
    full = decoder is not model
    if full:
        groups.append({"params": decoder.parameters(), "lr": hparams.decoder_lr})
    optimizer = torch.optim.Adam(groups)
    losses: list[float] = []
    bar = tqdm(range(hparams.steps), desc=f"training f, g ({hparams.decoder} decoder)",
               disable=not progress)  # fmt: skip
    layout = linear_layout(model) if not full else contextlib.nullcontext()
    with frozen(model), torch.enable_grad(), layout:
        if full:
            for param in decoder.parameters():
                param.requires_grad_(True)
        for _ in bar:
            index = torch.randint(len(prefixes), (hparams.tokens_per_step,), generator=generator)
            loss = _prefix_loss(decoder, adapter(states[index]), prefixes[index], skip).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _cache_path(
    fingerprint: str,
    corpus: Corpus,
    hparams: ContextHyperParams,
    root: str | os.PathLike[str] | None,
) -> Path:
    """The file of the frozen-decoder adapter trained with these settings on this corpus."""
    digest = cache_key(corpus.id(hparams.seed), dataclasses.asdict(hparams), length=16)
    return cache_dir(root) / "microscope" / f"context-{fingerprint}-{digest}.st"
