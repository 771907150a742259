"""What to write into a model: edit requests, and the settings every editor shares.

An :class:`EditRequest` is one fact: a prompt template with ``{}`` where the
subject goes, the subject, and the new answer (and, if known, the current
one). :class:`EditHyperParams` holds the settings ROME and MEMIT share: the
context prefixes an edit is averaged over and the optimisation of the value
the subject should recall. :func:`check_request` checks a request against a
model before any work starts, so that a bad request fails in milliseconds
with a message naming it.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.requests import EditRequest, check_request
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> request.text
'The Eiffel Tower is located in the city of'
>>> len(check_request(tiny_model(), request))  # the tokens of " Rome"
1
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from rome_lens.core.backend import Model
from rome_lens.core.results import register_type
from rome_lens.core.tokens import prompt_tokens, subject_range, target_token_ids
from rome_lens.stats.keys import DEFAULT_N_TOKENS

__all__ = ["EditHyperParams", "EditRequest", "check_hparams", "check_request"]


@register_type("edit_request")
@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` with ``{}`` where the subject goes."""

    prompt: str
    """E.g. "{} is located in the city of"."""
    subject: str
    """E.g. "The Eiffel Tower"."""
    target_new: str
    """The new answer, e.g. "Rome"."""
    target_true: str | None = None
    """The current answer, if known, e.g. "Paris"."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or "{}" not in self.prompt:
            raise ValueError(
                f'prompt must contain "{{}}" where the subject goes, got {self.prompt!r}'
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError(f"subject must be a non-empty string, got {self.subject!r}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"target_new must be a non-empty string, got {self.target_new!r}")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            warnings.warn(
                f"target_new {self.target_new!r} equals the true answer: the edit changes nothing",
                stacklevel=3,
            )

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_start(self) -> int:
        """Character offset of the subject in :attr:`text`."""
        return self.prompt.index("{}")


@dataclass(frozen=True)
class EditHyperParams:
    """Settings shared by ROME and MEMIT (ROME's defaults for GPT-2 XL unless noted)."""

    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    """Context prefixes to sample, as (tokens in each, how many)."""
    context_seed: int = 0
    """Seed of the sampled context prefixes."""
    kl_prompt: str = "{} is a"
    """Essence prompt whose prediction the KL term preserves."""
    v_lr: float = 0.5
    """Adam learning rate for δ."""
    v_steps: int = 20
    """Most optimisation steps for δ."""
    v_weight_decay: float = 0.5
    """Weight of ‖δ‖ / ‖init‖² in the loss (ROME's form)"""
    clamp_norm_factor: float = 4.0
    """‖δ‖ is clamped to this × ‖init‖."""
    kl_factor: float = 0.0625
    """Weight of the KL term."""
    early_stop_nll: float = 5e-2
    """A request stops once the NLL of target_new is below this."""
    mom2_n_tokens: int = DEFAULT_N_TOKENS
    """Tokens of key statistics when stats=None."""
    max_condition: float = 1e10
    """C above this condition number gets a ridge (and a warning)"""

    def __post_init__(self) -> None:
        if "{}" not in self.kl_prompt:
            raise ValueError(
                f'kl_prompt must contain "{{}}" for the subject, got {self.kl_prompt!r}'
            )


def check_request(model: Model, request: EditRequest) -> list[int]:
    """The tokens of ``target_new``, after checking the prompt fits and spells the subject.

    Args:
        model: the model to edit.
        request: the fact to write.

    Returns:
        The token ids of ``target_new`` as it follows the prompt.

    Raises:
        TypeError: ``request`` is not an :class:`EditRequest`.
        ValueError: the prompt is too long, or its tokens do not spell the subject.
    """
    if not isinstance(request, EditRequest):
        raise TypeError(f"requests must be EditRequest objects, got {request!r}")
    prompt_tokens(model, request.text)
    subject_range(model, request.text, request.subject, start=request.subject_start)
    return target_token_ids(model, request.text, request.target_new)


def check_hparams(hparams: object, expected: type, name: str = "hparams") -> None:
    """Raise ``TypeError`` unless ``hparams`` is an instance of ``expected``.

    Args:
        hparams: the settings given.
        expected: the settings class the editor takes.
        name: the argument's name, for the message.
    """
    if not isinstance(hparams, expected):
        raise TypeError(
            f"{name} must be {expected.__name__}, got {type(hparams).__name__}: {hparams!r}"
        )
