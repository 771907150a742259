"""From strings to token positions: prompts, subjects and targets.

Causal tracing and editing both need the same three answers about a prompt:
its tokens (with BOS, as the model sees it), which of them spell the subject,
and which token the answer starts with. This module gives them, and raises a
``ValueError`` that shows the tokenisation when the question has no answer.

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.core.tokens import prompt_tokens, subject_range, target_token_ids
>>> model = tiny_model()
>>> prompt = "The Eiffel Tower is located in the city of"
>>> model.to_str_tokens(prompt_tokens(model, prompt)[0])[:4]
['<|endoftext|>', 'The', ' Eiffel', ' Tower']
>>> subject_range(model, prompt, "The Eiffel Tower")  # tokens 1 to 3
(1, 4)
>>> model.to_str_tokens(torch.tensor(target_token_ids(model, prompt, "Paris")))
[' Paris']
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from rome_lens.core.backend import Model

__all__ = ["prompt_tokens", "subject_range", "target_token_ids"]


def prompt_tokens(
    model: Model, prompt: str, prepend_bos: bool | None = None
) -> Int[Tensor, "1 pos"]:
    """The prompt's tokens as the model reads them, checked against the context length.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text.
        prepend_bos: as in TransformerLens (``None``: the model's default).

    Returns:
        ``[1 pos]`` token ids.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"prompt has {tokens.shape[1]} tokens but the model's context (n_ctx) "
            f"holds {model.cfg.n_ctx}: shorten the prompt"
        )
    return tokens


def subject_range(
    model: Model,
    prompt: str,
    subject: str,
    prepend_bos: bool | None = None,
    *,
    start: int | None = None,
) -> tuple[int, int]:
    """The half-open range ``[first, last + 1)`` of the tokens that spell ``subject`` in ``prompt``.

    The first occurrence of ``subject`` counts, or the one at character
    ``start`` when given. A token counts when any of its characters falls
    inside the subject, so a subject that ends mid-token still covers that token.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text.
        subject: a substring of ``prompt``.
        prepend_bos: as in TransformerLens (``None``: the model's default).
        start: the subject's character offset, if not its first occurrence.

    Returns:
        ``(first, last + 1)`` token positions.
    """
    tokens = prompt_tokens(model, prompt, prepend_bos)[0].tolist()
    if start is None:
        start = prompt.find(subject) if subject else -1
    elif not subject or prompt[start : start + len(subject)] != subject:
        start = -1
    if start < 0:
        raise ValueError(
            f"subject {subject!r} is not in the prompt {prompt!r}, "
            f"tokenised as {model.to_str_tokens(prompt, prepend_bos=prepend_bos)}"
        )
    spans = _token_char_spans(model, prompt, tokens)
    end = start + len(subject)
    inside = [i for i, (a, b) in enumerate(spans) if a < end and b > start]
    if not inside:
        raise ValueError(
            f"subject {subject!r} covers no token of the prompt {prompt!r}, "
            f"tokenised as {model.to_str_tokens(prompt, prepend_bos=prepend_bos)}"
        )
    return inside[0], inside[-1] + 1


def _token_char_spans(model: Model, prompt: str, tokens: list[int]) -> list[tuple[int, int]]:
    """Character span of each prompt token; special tokens added by the model get (0, 0)."""
    assert model.tokenizer is not None, "the model needs a tokenizer to read strings"
    tokenizer = model.tokenizer
    if tokenizer.is_fast:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        skip = len(tokens) - len(ids)
        if skip >= 0 and tokens[skip:] == ids:
            return [(0, 0)] * skip + [tuple(span) for span in offsets]
    # Slow tokenizers: grow the decoded text token by token.
    spans, text = [], ""
    for i in range(len(tokens)):
        decoded = model.to_string(torch.tensor(tokens[: i + 1]))
        assert isinstance(decoded, str)
        spans.append((len(text), len(decoded)))
        text = decoded
    prefix = len(text) - len(prompt)  # characters of special tokens before the prompt
    return [(a - prefix, b - prefix) if b > prefix else (0, 0) for a, b in spans]


def target_token_ids(model: Model, prompt: str, target: str) -> list[int]:
    """The tokens of ``target`` as they follow ``prompt``, leading space included.

    ``"Paris"`` after ``"... the city of"`` becomes the tokens of ``" Paris"`` in
    the model's own convention (``Ġ`` for byte-level BPE, ``▁`` for
    SentencePiece), read off the tokenisation of ``prompt + " Paris"``.

    Args:
        model: any TransformerLens model with a tokenizer.
        prompt: the text the target follows.
        target: the answer (a leading space is added unless it has one).

    Returns:
        The answer's token ids.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    text = target if target[0].isspace() else " " + target
    head = model.to_tokens(prompt, prepend_bos=False, truncate=False)[0].tolist()
    full = model.to_tokens(prompt + text, prepend_bos=False, truncate=False)[0].tolist()
    if full[: len(head)] == head and len(full) > len(head):
        ids = full[len(head) :]
    else:  # the target merged with the prompt's last token: encode it on its own
        ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
    assert model.tokenizer is not None
    unk = model.tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"target {target!r} cannot be encoded by the tokenizer (got tokens {ids}, "
            f"unknown-token id {unk})"
        )
    return ids
