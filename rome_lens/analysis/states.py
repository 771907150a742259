"""The residual stream at every depth, read over a text or a corpus.

The Microscope's metrics compare the residual stream before and after each
block: ``blocks.0.hook_resid_pre`` (the embeddings), then
``blocks.{l}.hook_resid_post`` for every block ``l``. :func:`residual_states`
reads all of them in one pass over a corpus (through
:class:`~rome_lens.core.corpus.Corpus` and :func:`~rome_lens.core.runtime.capture`),
and :func:`text_states` does the same for one text of any length, cut into
windows of ``n_ctx`` tokens. BOS is never among the tokens returned: its
residual stream is an outlier (an attention sink) that would dominate every
statistic.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis.states import residual_states, state_hooks
>>> model = tiny_model()
>>> state_hooks(model)
['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', \
'blocks.2.hook_resid_post']
>>> states = residual_states(model, ["The Eiffel Tower is in Paris."], progress=False)
>>> tuple(states.states.shape)  # (depth, token, d_model)
(4, 7, 64)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.corpus import Corpus, CorpusSource, bos_tokens, token_batches
from rome_lens.core.runtime import capture, linear_layout

__all__ = ["States", "check_text", "residual_states", "state_hooks", "text_states"]


@dataclass
class States:
    """The residual stream at every depth for some tokens (BOS excluded)."""

    states: Float[Tensor, "depth token d_model"]  # depth 0: embeddings; depth l + 1: after block l
    tokens: Int[Tensor, " token"]  # the token ids
    corpus: str  # where the text came from

    @property
    def n_tokens(self) -> int:
        """How many tokens were read."""
        return int(self.tokens.shape[0])


def state_hooks(model: Model) -> list[str]:
    """The hook points of the residual stream at every depth.

    Args:
        model: any TransformerLens model.

    Returns:
        ``blocks.0.hook_resid_pre``, then ``blocks.{l}.hook_resid_post`` for every block.
    """
    return ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)
    ]


@torch.no_grad()
def residual_states(
    model: Model,
    corpus: CorpusSource | Corpus,
    *,
    n_tokens: int | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> States:
    """The residual stream at every depth for the first ``n_tokens`` tokens of a corpus.

    Args:
        model: any TransformerLens model.
        corpus: strings, a ``.txt``/``.jsonl`` path, a :class:`Corpus`, or ``None``
            to sample text from the model.
        n_tokens: how many tokens (BOS excluded); ``None`` reads the whole corpus
            (a sampled corpus needs a number).
        max_length: the longest window run at once (default: 128 tokens, at most ``n_ctx``).
        batch_size: windows per forward pass.
        seed: seeds a sampled corpus.
        cache_dir: where a sampled corpus is cached.
        progress: show a progress bar.

    Returns:
        The states, float32 on the model's device, in corpus order within each batch.
    """
    source = Corpus.read(corpus)
    length = min(max_length or 128, model.cfg.n_ctx)
    chunks = source.chunks(
        model, n_tokens=n_tokens, max_length=length, seed=seed, cache_dir=cache_dir,
        progress=progress,
    )  # fmt: skip
    names = state_hooks(model)
    parts: list[Tensor] = []
    ids: list[Tensor] = []
    total = sum(len(c.tokens) - 1 for c in chunks)
    bar = tqdm(total=total, desc="residual stream", unit="tok", disable=not progress)
    with bar, linear_layout(model):
        for batch in token_batches(model, chunks, batch_size):
            found = capture(model, batch.tokens, names)
            stacked = torch.stack([found[name] for name in names])  # [depth batch pos d]
            parts.append(stacked[:, batch.counted.to(stacked.device)].float())
            ids.append(batch.tokens[batch.counted])
            bar.update(int(batch.counted.sum()))
    states = torch.cat(parts, dim=1)
    tokens = torch.cat(ids)
    if n_tokens is not None:
        states, tokens = states[:, :n_tokens], tokens[:n_tokens]
    return States(states, tokens, source.name)


def text_states(model: Model, text: str, *, progress: bool = False) -> States:
    """The residual stream at every depth for each token of ``text`` (BOS excluded), in order.

    A text longer than the model's context is read in windows of ``n_ctx``
    tokens, each starting afresh from BOS.

    Args:
        model: any TransformerLens model.
        text: the text.
        progress: show a progress bar.

    Returns:
        The states of the text's tokens, in order.
    """
    check_text(text)
    source = Corpus.read([text])
    chunks = source.chunks(model, max_length=model.cfg.n_ctx)
    names = state_hooks(model)
    skip = len(bos_tokens(model))
    parts, ids = [], []
    with torch.no_grad(), linear_layout(model):
        for chunk in tqdm(chunks, desc="residual stream", disable=not progress):
            found = capture(model, chunk.tokens[None], names)
            stacked = torch.stack([found[name][0] for name in names])
            parts.append(stacked[:, skip:].float())
            ids.append(chunk.tokens[skip:])
    return States(torch.cat(parts, dim=1), torch.cat(ids), "1 text")


def check_text(text: object) -> None:
    """Raise ``ValueError`` unless ``text`` is a non-empty string.

    Args:
        text: what the caller passed as text.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
