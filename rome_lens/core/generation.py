"""Seeded text sampling from a model, for the parts of rome_lens that need text.

Three things in rome_lens read text the model writes itself:

* the **context prefixes** of a ROME edit (short continuations of "The",
  "Therefore", ... that the edited fact is averaged over),
* the **default corpus** of the key statistics, when no text is given, so that
  statistics work offline for any model,
* the **generations** whose n-gram entropy measures fluency after an edit;

and one thing reads what it writes greedily: whether an edited model, asked
the edited question, *writes* the new answer (:func:`greedy_continuations`),
which scores under teacher forcing overstate.

:func:`sample_tokens` samples them with a key-value cache, one token per step
for the whole batch, from a ``torch.Generator`` seeded by the caller, so the
same seed and the same weights give the same text. Prompts are grouped by token
length, so no batch ever needs padding.

>>> from rome_lens.core.generation import sample_text
>>> from rome_lens.core.models import tiny_model
>>> model = tiny_model()
>>> texts = sample_text(model, ["The", "The"], max_new_tokens=4, seed=0)
>>> len(texts), texts == sample_text(model, ["The", "The"], max_new_tokens=4, seed=0)
(2, True)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model, forward, new_kv_cache
from rome_lens.core.precision import model_device, to_host
from rome_lens.core.runtime import linear_layout, pad, run_to_layer, unembed
from rome_lens.core.tokens import prompt_tokens

__all__ = ["greedy_continuations", "sample_text", "sample_tokens"]


def sample_tokens(
    model: Model,
    prompts: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    *,
    generator: torch.Generator | None = None,
    uniforms: Float[Tensor, "batch new"] | None = None,
    top_k: int | None = None,
    bar: tqdm | None = None,
) -> Int[Tensor, "batch pos_plus_new"]:
    """Append ``max_new_tokens`` sampled tokens to each row of ``prompts`` (all one length).

    Each token inverts the CDF at one uniform number. ``generator`` draws them a
    step at a time for the whole batch; ``uniforms`` gives them per row instead,
    so that a row's text does not depend on which rows are sampled beside it.

    Args:
        model: the model that samples.
        prompts: ``[batch pos]`` token ids, every row the same length.
        max_new_tokens: tokens to append.
        generator: the random generator that draws the uniforms a step at a time
            (give it or ``uniforms``, not both).
        uniforms: ``[batch max_new_tokens]`` numbers in [0, 1), one row per prompt,
            instead of ``generator``.
        top_k: sample among the k most probable tokens; ``None``: the full distribution.
        bar: a progress bar advanced by the batch size at every step (tokens sampled).

    Returns:
        The prompts with the sampled tokens appended.
    """
    batch = prompts.shape[0]
    if (generator is None) == (uniforms is None):
        raise ValueError("sample_tokens needs exactly one of generator= and uniforms=")
    if uniforms is None:
        uniforms = torch.rand(max_new_tokens, batch, generator=generator).T  # step-major draws
    if uniforms.shape != (batch, max_new_tokens):
        raise ValueError(
            f"uniforms must be [{batch}, {max_new_tokens}] (rows, new tokens), "
            f"got {list(uniforms.shape)}"
        )
    cache = new_kv_cache(model, batch)
    tokens = prompts.to(model_device(model))
    uniforms = uniforms.to(tokens.device)
    new = tokens
    with torch.inference_mode(), linear_layout(model):
        for step in range(max_new_tokens):
            logits = forward(model, new, past_kv_cache=cache)[:, -1].float()
            new = _sample(logits, uniforms[:, step : step + 1], top_k)
            tokens = torch.cat([tokens, new], dim=1)
            if bar is not None:
                bar.update(batch)
    return tokens


def _sample(
    logits: Float[Tensor, "batch vocab"], u: Float[Tensor, "batch 1"], top_k: int | None
) -> Int[Tensor, "batch 1"]:
    """One token per row, by inverting the CDF (``torch.multinomial`` is ~10x slower here).

    The CDF stays on the logits' device and the uniforms come from a CPU
    generator, so a seed gives the same text on any device.
    """
    indices = None
    if top_k is not None:
        logits, indices = logits.topk(top_k, dim=-1)
    cdf = logits.softmax(-1).cumsum(-1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1)
    return choice if indices is None else indices.gather(-1, choice)


def sample_text(
    model: Model,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    seed: int = 0,
    top_k: int | None = 5,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Each prompt followed by ``max_new_tokens`` sampled tokens, as text (BOS dropped).

    ``top_k=5`` follows ROME's generations; ``None`` samples the full distribution.

    Args:
        model: the model that samples.
        prompts: the texts to continue.
        max_new_tokens: tokens to append to each.
        seed: seeds the sampling.
        top_k: sample among the k most probable tokens; ``None``: the full distribution.
        batch_size: prompts sampled at once.
        progress: show a progress bar.

    Returns:
        One text per prompt: the prompt and its continuation.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    encoded = [prompt_tokens(model, p)[0] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, tokens in enumerate(encoded):
        by_length[len(tokens)].append(i)
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = [""] * len(encoded)
    groups = [
        rows[start : start + batch_size]
        for _, rows in sorted(by_length.items())
        for start in range(0, len(rows), batch_size)
    ]
    for rows in tqdm(groups, desc="sampling", disable=not progress):
        tokens = sample_tokens(
            model,
            torch.stack([encoded[i] for i in rows]),
            max_new_tokens,
            generator=generator,
            top_k=top_k,
        )
        n_special = len(encoded[rows[0]]) - len(prompt_tokens(model, prompts[rows[0]], False)[0])
        for i, row in zip(rows, tokens, strict=True):
            out[i] = str(model.to_string(row[n_special:]))
    return out


def greedy_continuations(
    model: Model,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    *,
    batch_size: int = 64,
) -> list[str]:
    """What greedy decoding writes after each prompt: ``max_new_tokens`` arg-max tokens, as text.

    Prompts of any lengths share a batch, right-padded: under causal attention
    a real token never sees the padding after it, and each row's next token is
    read at its own last position. Every step reruns the whole (short)
    sequences, which for a few tokens costs less than a key-value cache per
    prompt length.

    Args:
        model: the model that writes.
        prompts: the texts to continue.
        max_new_tokens: tokens to write, for every prompt or one count per prompt.
        batch_size: prompts per forward pass.

    Returns:
        One continuation per prompt (the new text only).
    """
    prompts = list(prompts)
    budgets = (
        [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    )
    if len(budgets) != len(prompts):
        raise ValueError(f"got {len(budgets)} token counts for {len(prompts)} prompts")
    if any(b < 0 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 0, got {min(budgets)}")
    encoded = [prompt_tokens(model, p)[0] for p in prompts]
    written: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        written += _greedy_batch(model, [encoded[i] for i in rows], [budgets[i] for i in rows])
    return [str(model.to_string(torch.tensor(tokens, dtype=torch.long))) for tokens in written]


def _greedy_batch(model: Model, prompts: list[Tensor], budgets: list[int]) -> list[list[int]]:
    """The arg-max tokens after each prompt of one batch, ``budgets[i]`` for row ``i``."""
    device = model_device(model)
    steps = max(budgets)
    tokens, mask = pad(prompts, 0, "right")
    tokens = torch.cat([tokens, tokens.new_zeros(len(prompts), steps)], 1).to(device)
    lengths = mask.sum(1).to(device)  # [batch]: real tokens so far
    budget = torch.tensor(budgets, device=device)
    rows = torch.arange(len(prompts), device=device)
    with torch.inference_mode(), linear_layout(model):
        for step in range(steps):
            width = int(lengths.max())
            real = torch.arange(width, device=device) < lengths[:, None]
            resid = run_to_layer(
                model, tokens[:, :width], model.cfg.n_layers, attention_mask=real.long()
            )
            chosen = unembed(model, resid[rows, lengths - 1]).argmax(-1)
            writing = step < budget
            tokens[rows[writing], lengths[writing]] = chosen[writing]
            lengths = lengths + writing.long()
    found = to_host(tokens)  # one move, after the last step
    starts = [len(p) for p in prompts]
    return [
        found[i, s : s + b].tolist() for i, (s, b) in enumerate(zip(starts, budgets, strict=True))
    ]
