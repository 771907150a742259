"""The logit lens: what the residual stream would predict if the model stopped early.

After each layer ``l``, the residual stream ``blocks.{l}.hook_resid_post`` is
sent through the model's own final norm (``ln_final``) and unembedding, as if
the remaining layers were skipped (nostalgebraist 2020). Read down the layers,
the distributions show where an association forms: on a fact prompt the answer
climbs the ranks in the middle layers, and after an edit the new answer takes
over at the edited layers. The last layer's lens is the model's own prediction.

:func:`logit_lens` keeps, for every (layer, position), the top-k tokens and the
rank of the token that actually comes next, and for chosen targets their
probability and rank at the last position, layer by layer.

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis.lens import logit_lens
>>> model = tiny_model()
>>> lens = logit_lens(model, "The Eiffel Tower is located in the city of",
...                   targets=["Paris", "Rome"], progress=False)
>>> lens.top_ids.shape  # (layer, position, k)
torch.Size([3, 10, 10])
>>> final = model(lens.tokens[None])[0, -1].log_softmax(-1)  # the last layer is the output
>>> torch.allclose(lens.top_log_probs[-1, -1], final.topk(10).values, atol=1e-5)
True
>>> lens.to_dataframe().columns.tolist()
['layer', 'target', 'prob', 'rank']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.core.precision import to_host
from rome_lens.core.results import Result
from rome_lens.core.runtime import capture, unembed
from rome_lens.core.tokens import prompt_tokens, target_token_ids

__all__ = ["LogitLens", "lens_log_probs", "logit_lens"]


@dataclass
class LogitLens(Result):
    """The result of :func:`logit_lens` for one prompt."""

    kind = "logit_lens"
    prompt: str
    str_tokens: list[str]
    """The prompt's tokens, BOS included."""
    tokens: Int[Tensor, " pos"]
    top_ids: Int[Tensor, "layer pos k"]
    """The k most probable next tokens per layer."""
    top_log_probs: Float[Tensor, "layer pos k"]
    top_strs: list[list[list[str]]]
    """top_ids as strings, [layer][pos][k]."""
    next_ranks: Int[Tensor, "layer next"]
    """Rank of the actual next token (pos - 1 of them)"""
    next_log_probs: Float[Tensor, "layer next"]
    targets: list[str]
    """Answers followed at the last position (their first token)"""
    target_ids: list[int]
    target_log_probs: Float[Tensor, "layer target"]
    """At the last position."""
    target_ranks: Int[Tensor, "layer target"]
    """0 = top-1."""
    vocab_size: int
    """d_vocab of the model, the worst possible rank + 1."""
    fingerprint: str = ""
    """model_fingerprint of the lensed model."""

    @property
    def n_layers(self) -> int:
        return int(self.top_ids.shape[0])

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, target): probability and rank at the last position."""
        rows = [
            {
                "layer": layer,
                "target": target,
                "prob": float(self.target_log_probs[layer, t].exp()),
                "rank": int(self.target_ranks[layer, t]),
            }
            for layer in range(self.n_layers)
            for t, target in enumerate(self.targets)
        ]
        return pd.DataFrame(rows, columns=["layer", "target", "prob", "rank"])

    def top_dataframe(self) -> pd.DataFrame:
        """One row per (layer, position, rank) of the top-k tokens."""
        layers, positions, k = self.top_ids.shape
        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "pos": pos,
                    "str_token": self.str_tokens[pos],
                    "rank": r,
                    "prediction": self.top_strs[layer][pos][r],
                    "prob": float(self.top_log_probs[layer, pos, r].exp()),
                }
                for layer in range(layers)
                for pos in range(positions)
                for r in range(k)
            ]
        )


@torch.no_grad()
def lens_log_probs(
    model: Model, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """Log-probabilities of the next token read off ``blocks.{l}.hook_resid_post`` for every l.

    Each layer's residual stream goes through the model's own ``ln_final`` and
    unembedding; the last layer's is the model's output.

    Args:
        model: any TransformerLens model.
        tokens: ``[batch pos]`` token ids.

    Returns:
        ``[layer batch pos d_vocab]`` log-probabilities.
    """
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    found = capture(model, tokens, names)
    resid = torch.stack([found[name] for name in names])  # [layer batch pos d_model]
    flat = unembed(model, resid.flatten(0, 2))
    return flat.float().log_softmax(-1).view(*resid.shape[:3], -1)


@torch.no_grad()
def logit_lens(
    model: Model,
    prompt: str,
    *,
    targets: Sequence[str] | None = None,
    k: int = 10,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> LogitLens:
    """Project the residual stream after every layer through ``ln_final`` and ``unembed``.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text to read.
        targets: answers to follow at the last position, e.g. ``[" Paris", " Rome"]``;
            each is tokenised as it follows ``prompt`` and its first token is
            tracked. Default: the model's own top-1 prediction.
        k: how many top tokens to keep per (layer, position).
        prepend_bos: as in TransformerLens (``None``: the model's default).
        progress: show a progress bar (one step per stage; a lens takes one forward pass).

    Returns:
        The lens: top-k tokens per (layer, position), the ranks of the actual
        next tokens, and each target's log-probability and rank by layer.
    """
    if k < 1 or k > model.cfg.d_vocab:
        raise ValueError(f"k must be between 1 and d_vocab={model.cfg.d_vocab}, got {k}")
    if isinstance(targets, str):
        raise ValueError(f"targets must be a list of strings, got the string {targets!r}")
    tokens = prompt_tokens(model, prompt, prepend_bos)
    bar = tqdm(total=2, desc="logit lens", disable=not progress, leave=False)
    with bar:
        log_probs = lens_log_probs(model, tokens)[:, 0]  # [layer, pos, vocab]
        bar.update()
        if targets is None:
            target_ids = [int(log_probs[-1, -1].argmax())]  # the last layer's lens is the output
            targets = [model.to_single_str_token(target_ids[0])]
        else:
            target_ids = [target_token_ids(model, prompt, t)[0] for t in targets]
        top_log_probs, top_ids = log_probs.topk(k, dim=-1)
        last = log_probs[:, -1]  # [layer, vocab]
        chosen = last[:, target_ids]  # [layer, target]
        following = tokens[0, 1:].to(log_probs.device)
        n_layers = log_probs.shape[0]
        next_log_probs = log_probs[:, :-1].gather(-1, following.expand(n_layers, -1)[..., None])
        next_ranks = (log_probs[:, :-1] > next_log_probs).sum(-1)
        target_ranks = (last[:, None, :] > chosen[..., None]).sum(-1)
        bar.update()
    # The lens's small results move to the CPU once, to be shown; the vocabulary stays.
    top_ids, top_log_probs = to_host(top_ids), to_host(top_log_probs)
    return LogitLens(
        prompt=prompt,
        str_tokens=list(model.to_str_tokens(tokens[0])),
        tokens=to_host(tokens[0]),
        top_ids=top_ids,
        top_log_probs=top_log_probs,
        top_strs=[[list(model.to_str_tokens(ids)) for ids in layer] for layer in top_ids],
        next_ranks=to_host(next_ranks),
        next_log_probs=to_host(next_log_probs[..., 0]),
        targets=list(targets),
        target_ids=target_ids,
        target_log_probs=to_host(chosen),
        target_ranks=to_host(target_ranks),
        vocab_size=int(log_probs.shape[-1]),
        fingerprint=model_fingerprint(model),
    )
