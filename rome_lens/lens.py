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

>>> from rome_lens import load_model
>>> from rome_lens.lens import logit_lens
>>> model = load_model()
>>> lens = logit_lens(model, "The Eiffel Tower is located in the city of",
...                   targets=["Paris", "Rome"])
>>> model.to_single_str_token(int(lens.top_ids[-1, -1, 0]))  # last layer, last token, top-1
' Paris'
>>> int(lens.target_ranks[-1, 0])  # rank of " Paris" after the last layer
0
>>> lens.to_dataframe().columns.tolist()
['layer', 'target', 'prob', 'rank']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from rome_lens import hooks
from rome_lens.tokens import prompt_tokens, target_token_ids

__all__ = ["LogitLens", "logit_lens"]


@dataclass
class LogitLens:
    """The result of :func:`logit_lens` for one prompt."""

    prompt: str
    str_tokens: list[str]  # the prompt's tokens, BOS included
    tokens: Int[Tensor, " pos"]
    top_ids: Int[Tensor, "layer pos k"]  # the k most probable next tokens per layer
    top_log_probs: Float[Tensor, "layer pos k"]
    top_strs: list[list[list[str]]]  # top_ids as strings, [layer][pos][k]
    next_ranks: Int[Tensor, "layer next"]  # rank of the actual next token (pos - 1 of them)
    next_log_probs: Float[Tensor, "layer next"]
    targets: list[str]  # answers followed at the last position (their first token)
    target_ids: list[int]
    target_log_probs: Float[Tensor, "layer target"]  # at the last position
    target_ranks: Int[Tensor, "layer target"]  # 0 = top-1
    vocab_size: int  # d_vocab of the model, the worst possible rank + 1

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

    def plot(self, path: str | Path | None = None) -> Any:
        """Probability and rank of each target across layers (a matplotlib figure)."""
        from rome_lens import plots

        fig = plots.plot_logit_lens(self)
        if path is not None:
            plots.save_figure(fig, path)
        return fig


@torch.no_grad()
def logit_lens(
    model: HookedTransformer,
    prompt: str,
    *,
    targets: Sequence[str] | None = None,
    k: int = 10,
) -> LogitLens:
    """Project the residual stream after every layer through ``ln_final`` and ``unembed``.

    Args:
        model: any ``HookedTransformer`` with a tokenizer.
        prompt: the text to read.
        targets: answers to follow at the last position, e.g. ``[" Paris", " Rome"]``;
            each is tokenised as it follows ``prompt`` and its first token is
            tracked. Default: the model's own top-1 prediction.
        k: how many top tokens to keep per (layer, position).
    """
    if k < 1 or k > model.cfg.d_vocab:
        raise ValueError(f"k must be between 1 and d_vocab={model.cfg.d_vocab}, got {k}")
    tokens = prompt_tokens(model, prompt)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    captured: list[Tensor] = []
    with hooks.attached(model, [(name, hooks.capture(captured)) for name in names]):
        model(tokens, return_type=None)
    resid = torch.cat(captured)  # [layer, pos, d_model]
    log_probs = model.unembed(model.ln_final(resid)).float().log_softmax(-1)  # [layer, pos, vocab]
    if targets is None:
        target_ids = [int(log_probs[-1, -1].argmax())]  # the last layer's lens is the output
        targets = [model.to_single_str_token(target_ids[0])]
    else:
        if isinstance(targets, str):
            raise ValueError(f"targets must be a list of strings, got the string {targets!r}")
        target_ids = [target_token_ids(model, prompt, t)[0] for t in targets]
    top_log_probs, top_ids = log_probs.topk(k, dim=-1)
    last = log_probs[:, -1]  # [layer, vocab]
    chosen = last[:, target_ids]  # [layer, target]
    following = tokens[0, 1:]
    next_log_probs = log_probs[:, :-1].gather(-1, following.expand(len(resid), -1)[..., None])
    return LogitLens(
        prompt=prompt,
        str_tokens=list(model.to_str_tokens(tokens[0])),  # type: ignore[arg-type]
        tokens=tokens[0],
        top_ids=top_ids,
        top_log_probs=top_log_probs,
        top_strs=[[list(model.to_str_tokens(ids)) for ids in layer] for layer in top_ids],  # type: ignore[arg-type]
        next_ranks=(log_probs[:, :-1] > next_log_probs).sum(-1),
        next_log_probs=next_log_probs[..., 0],
        targets=list(targets),
        target_ids=target_ids,
        target_log_probs=chosen,
        target_ranks=(last[:, None, :] > chosen[..., None]).sum(-1),
        vocab_size=int(log_probs.shape[-1]),
    )
