"""Next-token predictions for many prompts at once, padded correctly.

Prompts of different lengths share a batch only through padding, and padding
is where factual recall quietly breaks: pad tokens must be masked out of
attention, and with left padding every position must be shifted so that the
real text still starts at position 0. TransformerLens does both when it is
given an explicit ``attention_mask``, which is what this module builds (it
never infers the mask from pad-token ids, which fails when the pad token is
also BOS). Either padding side then gives the same probabilities as running
each prompt alone.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.core.predict import predict_next
>>> model = tiny_model()
>>> preds = predict_next(model, ["The Eiffel Tower is in", "Paris is"], targets=["Paris", "a"])
>>> preds.target_prob.shape
torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.runtime import PaddingSide, linear_layout, pad, run_to_layer, unembed
from rome_lens.core.tokens import prompt_tokens, target_token_ids

__all__ = ["NextTokenPredictions", "known_facts", "predict_next", "target_nll"]


@dataclass
class NextTokenPredictions:
    """What the model predicts after each prompt."""

    prompts: list[str]
    top_token: Int[Tensor, " prompt"]
    """Arg-max next token."""
    top_prob: Float[Tensor, " prompt"]
    target_token: Int[Tensor, " prompt"] | None
    """First token of each target, if given."""
    target_prob: Float[Tensor, " prompt"] | None
    target_rank: Int[Tensor, " prompt"] | None = None
    """Tokens more probable than it (0: top-1)"""

    @property
    def target_is_top(self) -> Tensor:
        """Whether each target's first token is the top-1 prediction."""
        if self.target_token is None:
            raise ValueError("no targets were given to predict_next")
        return self.top_token == self.target_token

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt."""
        data: dict[str, object] = {
            "prompt": self.prompts,
            "top_token": self.top_token.tolist(),
            "top_prob": self.top_prob.tolist(),
        }
        if self.target_token is not None and self.target_prob is not None:
            data["target_token"] = self.target_token.tolist()
            data["target_prob"] = self.target_prob.tolist()
        if self.target_rank is not None:
            data["target_rank"] = self.target_rank.tolist()
        return pd.DataFrame(data)


def predict_next(
    model: Model,
    prompts: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    batch_size: int = 64,
    padding_side: PaddingSide = "right",
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> NextTokenPredictions:
    """Top-1 next token, and each target's first-token probability, for every prompt.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompts: the texts whose next token is predicted.
        targets: an answer per prompt whose first token is scored, or ``None``.
        batch_size: prompts per forward pass.
        padding_side: ``"right"`` or ``"left"``; both give each prompt's unpadded result.
        prepend_bos: as in TransformerLens (``None``: the model's default).
        progress: show a progress bar.

    Returns:
        The top-1 token and its probability for every prompt, and each target's first-token
        probability and rank when targets are given.
    """
    prompts = list(prompts)
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"got {len(targets)} targets for {len(prompts)} prompts")
    sequences = [prompt_tokens(model, p, prepend_bos)[0] for p in prompts]
    target_token = None
    if targets is not None:
        target_token = torch.tensor(
            [target_token_ids(model, p, t)[0] for p, t in zip(prompts, targets, strict=True)]
        )
    assert model.tokenizer is not None
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    top_probs, top_tokens, target_probs, target_ranks = [], [], [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(prompts), batch_size), disable=not progress):
            chunk = sequences[start : start + batch_size]
            tokens, mask = pad(chunk, pad_id, padding_side)
            resid = run_to_layer(model, tokens, model.cfg.n_layers, attention_mask=mask)
            last = mask.shape[1] - 1 if padding_side == "left" else mask.sum(1) - 1
            rows = torch.arange(len(chunk))
            # Unembed only the last real position: the vocabulary is most of the cost.
            logits = unembed(model, resid[rows, last])
            probs = logits.float().softmax(-1)
            top = probs.max(-1)
            top_probs.append(top.values)
            top_tokens.append(top.indices)
            if target_token is not None:
                chosen = probs[rows, target_token[start : start + batch_size]]
                target_probs.append(chosen)
                target_ranks.append((probs > chosen[:, None]).sum(-1))
    return NextTokenPredictions(  # one move each, after the last batch
        prompts,
        top_token=to_host(torch.cat(top_tokens)),
        top_prob=to_host(torch.cat(top_probs)),
        target_token=target_token,
        target_prob=to_host(torch.cat(target_probs)) if target_probs else None,
        target_rank=to_host(torch.cat(target_ranks)) if target_ranks else None,
    )


def known_facts(
    model: Model,
    facts: Sequence[Mapping[str, str]],
    *,
    answer_key: str = "attribute",
    batch_size: int = 64,
    progress: bool = False,
) -> list[Mapping[str, str]]:
    """The facts whose answer (``fact[answer_key]``) starts with the model's top-1 token.

    Args:
        model: any TransformerLens model with a tokenizer.
        facts: mappings with a ``"prompt"`` and an answer.
        answer_key: the key of the answer in each fact.
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        The facts the model answers top-1, in order.
    """
    preds = predict_next(
        model,
        [f["prompt"] for f in facts],
        targets=[f[answer_key] for f in facts],
        batch_size=batch_size,
        progress=progress,
    )
    return [f for f, known in zip(facts, preds.target_is_top.tolist(), strict=True) if known]


def target_nll(
    model: Model,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> Float[Tensor, " prompt"]:
    """Mean per-token negative log-likelihood of each whole target after its prompt.

    This is ROME's CounterFact score: ``exp(-nll)`` is the geometric mean of the
    target tokens' probabilities, so targets of different lengths compare fairly.
    Sequences are right-padded, which needs no mask under causal attention.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompts: the texts the targets follow.
        targets: one answer per prompt (a leading space is added as the tokenizer expects).
        batch_size: sequences per forward pass.
        progress: show a progress bar.

    Returns:
        The mean NLL of each target's tokens, one per prompt.
    """
    if len(targets) != len(prompts):
        raise ValueError(f"got {len(targets)} targets for {len(prompts)} prompts")
    encoded = []
    for prompt, target in zip(prompts, targets, strict=True):
        head = prompt_tokens(model, prompt)[0]
        answer = target_token_ids(model, prompt, target)
        full = torch.cat([head, torch.tensor(answer, device=head.device)])
        encoded.append((full, len(head), answer))
    device = model_device(model)
    out = torch.empty(len(encoded), device=device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # little padding
    with torch.inference_mode(), linear_layout(model):
        for start in tqdm(range(0, len(order), batch_size), disable=not progress):
            chunk = order[start : start + batch_size]
            tokens, _ = pad([encoded[i][0] for i in chunk], 0, "right")
            resid = run_to_layer(model, tokens, model.cfg.n_layers)
            rows: list[int] = []
            positions: list[int] = []
            answers: list[int] = []
            for row, i in enumerate(chunk):
                _, prompt_len, answer = encoded[i]
                rows += [row] * len(answer)
                positions += range(prompt_len - 1, prompt_len - 1 + len(answer))
                answers += answer
            owners = torch.tensor(rows, device=device)
            logits = unembed(model, resid[owners, torch.tensor(positions, device=device)])
            log_probs = logits.float().log_softmax(-1)
            picked = torch.arange(len(answers), device=device), torch.tensor(answers, device=device)
            nll = -log_probs[picked]
            sums = nll.new_zeros(len(chunk)).index_add(0, owners, nll)
            counts = torch.bincount(owners, minlength=len(chunk))
            out[torch.tensor(chunk, device=device)] = sums / counts
    return to_host(out)  # one move, after the last batch
