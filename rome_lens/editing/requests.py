"""What to write into a model: edit requests, and the root of every editor's settings.

An :class:`EditRequest` is one fact: a prompt template with ``{}`` where the
subject goes, the subject, and the new answer (and, if known, the current
one). :func:`check_request` checks a request against a model before any work
starts, so that a bad request fails in milliseconds with a message naming it.

Every editor's settings form one tree of frozen dataclasses, in which each
class holds only fields that its editors read::

    EditorSettings                  (the root: no field)
    ├── FTHyperParams               FT+L: learning rate, steps, the L∞ bound
    └── EditHyperParams             the optimised value δ: contexts, steps, KL, clamp
        ├── ROMEHyperParams         + key statistics, ridge, C = I or not, key_match
        └── MultiLayerHyperParams   + key statistics, requests per batch, key_match
            ├── MEMITHyperParams    + ridge, λ (mom2_update_weight)
            └── AlphaEditHyperParams + null-space energy, l2

An editor takes settings of exactly its own class (:func:`check_hparams`), so
MEMIT refuses AlphaEdit's settings instead of ignoring their fields. The
settings that change δ, and so the cached targets, are named by the settings
object itself (:meth:`EditHyperParams.value_settings`).

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.requests import EditHyperParams, EditRequest, check_request
>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
>>> request.text
'The Eiffel Tower is located in the city of'
>>> len(check_request(tiny_model(), request))  # the tokens of " Rome"
1
>>> sorted(EditHyperParams().value_settings())[:3]
['clamp_norm_factor', 'context_lengths', 'context_seed']
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

from rome_lens.core.backend import Model
from rome_lens.core.results import register_type
from rome_lens.core.tokens import prompt_tokens, subject_range, target_token_ids

__all__ = ["EditHyperParams", "EditRequest", "EditorSettings", "check_hparams", "check_request"]


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
class EditorSettings:
    """The root of every editor's settings: an editor's ``settings_type`` derives from it."""


@dataclass(frozen=True)
class EditHyperParams(EditorSettings):
    """How the value δ a fact should recall is optimised: the settings ROME, MEMIT and
    AlphaEdit share (ROME's defaults for GPT-2 XL unless noted)."""

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
    """With ``early_stop="nll"``, a request stops once the NLL of target_new is below this."""
    early_stop: Literal["nll", "most_probable"] = "nll"
    """When a request's δ stops changing: ``"nll"``, once the mean NLL of target_new falls
    below ``early_stop_nll`` (ROME's rule); ``"most_probable"``, once every token of
    target_new is the model's top prediction on every context prompt (ENCORE's
    most-probable early stopping: the value is not pushed past what the fact needs,
    which keeps ‖δ‖, and the update, small over many edits)."""

    def __post_init__(self) -> None:
        if self.early_stop not in ("nll", "most_probable"):
            raise ValueError(
                f"early_stop must be 'nll' or 'most_probable', got {self.early_stop!r}"
            )
        if "{}" not in self.kl_prompt:
            raise ValueError(
                f'kl_prompt must contain "{{}}" for the subject, got {self.kl_prompt!r}'
            )

    def value_settings(self) -> dict[str, Any]:
        """The settings that change the optimised δ (and so a cached target z), by name.

        These are the fields of :class:`EditHyperParams`; what subclasses add (the
        solve's settings, batch sizes) leaves δ alone. A subclass adding a field
        that changes δ extends this method.

        Returns:
            ``{field name: value}``.
        """
        chosen = {f.name: getattr(self, f.name) for f in fields(EditHyperParams)}
        if chosen["early_stop"] == "nll":
            del chosen["early_stop"]  # ROME's rule: targets cached before the choice existed
        else:
            del chosen["early_stop_nll"]  # unread
        return chosen


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
    """Raise ``TypeError`` unless ``hparams`` is of exactly the class ``expected``.

    Not ``isinstance``: settings of a subclass belong to another editor
    (AlphaEdit's derive from the multi-layer settings MEMIT's do), whose fields
    this editor would silently ignore.

    Args:
        hparams: the settings given.
        expected: the settings class the editor takes.
        name: the argument's name, for the message.
    """
    if type(hparams) is not expected:
        raise TypeError(
            f"{name} must be {expected.__name__}, got {type(hparams).__name__}: {hparams!r}"
        )
