"""Keys and values of an MLP memory: what ROME and MEMIT both compute for a fact.

Both editors read ``blocks.{L}.mlp.W_out`` as a key-value memory, and for each
fact they write (an :class:`EditRequest`) they need the same three things:

* **contexts**: the bare prompt ``"{}"`` and short prefixes the model writes
  itself (:func:`context_templates`), so that an edit holds whatever precedes
  the prompt;
* **keys**: ``blocks.{L}.mlp.hook_post`` at the subject's last token, averaged
  over the contexts (:func:`compute_keys`);
* **a target**: the vector δ that, added after layer ``L``'s MLP at the
  subject's last token, makes the model say ``target_new``
  (:func:`optimize_deltas`). ROME adds it to ``blocks.{L}.hook_mlp_out`` and
  calls ``v* = v_init + δ``; MEMIT calls it ``z = h + δ`` at
  ``blocks.{L}.hook_resid_post``. That is the same place, since
  ``hook_resid_post = hook_resid_mid + hook_mlp_out``, except in families that
  normalise the MLP's output before adding it (Gemma 2): there ROME's δ goes on
  ``W_out``'s own output (:func:`~rome_lens.core.backend.mlp_output_hook`),
  which is what its new ``W_out`` changes, and MEMIT's on ``hook_mlp_out``.

The loss of δ is the NLL of ``target_new`` after every context prompt, plus a
KL term that keeps "{subject} is a" predicting what it did, plus a weight decay
``‖δ‖ / ‖init‖²``, with ‖δ‖ clamped to ``clamp_norm_factor × ‖init‖``.

Many requests are optimised in one batch. The loss is a sum of per-request
terms and Adam updates each entry on its own, so every request gets exactly the
δ it would get alone, while the forward passes are shared; a request leaves
the batch once it meets its early stop: its NLL below ``early_stop_nll``, or,
with ``early_stop="most_probable"``, its target the top prediction on every
context prompt (the δ returned is the one that met it).

>>> import torch
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.editing.memory import compute_keys, optimize_deltas
>>> from rome_lens.editing.requests import EditHyperParams, EditRequest
>>> model = tiny_model()
>>> requests = [EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
...             EditRequest("{} is located in", "The Louvre", "Berlin")]
>>> hparams = EditHyperParams(context_lengths=((3, 2),), v_steps=3)
>>> templates = ["{}", "A cat. {}"]
>>> compute_keys(model, requests, 1, templates).shape  # (request, d_mlp)
torch.Size([2, 256])
>>> deltas, losses = optimize_deltas(model, requests, 1, templates, torch.ones(2), hparams,
...                                  progress=False)
>>> deltas.shape, len(losses)
(torch.Size([2, 64]), 2)
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rome_lens.core.backend import Model, forward, freeze, mlp_output_hook, new_kv_cache
from rome_lens.core.generation import sample_text
from rome_lens.core.hooks import add_at_rows, attached
from rome_lens.core.precision import model_device
from rome_lens.core.runtime import capture, frozen, linear_layout, pad, unembed
from rome_lens.core.tokens import prompt_tokens, subject_range
from rome_lens.editing.requests import EditHyperParams, EditRequest, check_request

__all__ = [
    "ValueObjective",
    "clear_context_templates",
    "compute_keys",
    "context_templates",
    "encode",
    "in_contexts",
    "optimize_deltas",
    "subject_activations",
]

_CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
# model -> {(context_lengths, context_seed): templates}; see context_templates.
_TEMPLATES: weakref.WeakKeyDictionary[Model, dict[object, list[str]]] = weakref.WeakKeyDictionary()
_MAX_ROWS = 256  # sequences per forward pass when reading keys


# --------------------------------------------------------------------------- contexts


def context_templates(model: Model, hparams: EditHyperParams) -> list[str]:
    """``"{}"`` and the sampled prefixes, each ending in ``". {}"`` (ROME's contexts).

    Sampled once per model object and settings, as ROME does, so that a series
    of edits shares one set of contexts even as the weights change. The memo
    holds a weak reference to the model; :func:`clear_context_templates`
    empties it (the next edit then samples the contexts from the model as it is).

    Args:
        model: the model that writes the prefixes.
        hparams: ``context_lengths`` and ``context_seed`` say what to sample.

    Returns:
        The templates, ``"{}"`` first.
    """
    settings = (hparams.context_lengths, hparams.context_seed)
    memo = _TEMPLATES.setdefault(model, {})
    if settings not in memo:
        memo[settings] = _sample_templates(model, hparams)
    return list(memo[settings])


def clear_context_templates(model: Model | None = None) -> None:
    """Forget the context templates of ``model`` (of every model if ``None``).

    Args:
        model: the model whose templates to forget; ``None``: every model's.
    """
    if model is None:
        _TEMPLATES.clear()
    else:
        _TEMPLATES.pop(model, None)


def _sample_templates(model: Model, hparams: EditHyperParams) -> list[str]:
    templates = ["{}"]
    for length, count in hparams.context_lengths:
        starts = [_CONTEXT_STARTS[i % len(_CONTEXT_STARTS)] for i in range(count)]
        seed = hparams.context_seed + length
        for text in sample_text(model, starts, length, seed=seed, top_k=5):
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def in_contexts(request: EditRequest, templates: list[str]) -> list[tuple[str, str, int]]:
    """The request's prompt inside each context template, with the subject's offset.

    Args:
        request: the fact.
        templates: context templates with ``{}`` where the prompt goes.

    Returns:
        ``(text, subject, subject_start)`` for each template.
    """
    out = []
    for template in templates:
        prefix = template[: template.index("{}")]
        out.append((prefix + request.text, request.subject, len(prefix) + request.subject_start))
    return out


def encode(model: Model, texts: list[tuple[str, str, int]]) -> tuple[list[list[int]], list[int]]:
    """Tokens of each ``(text, subject, subject_start)``, and the subject's last token in each.

    Args:
        model: the model.
        texts: ``(text, subject, subject_start)`` triples.

    Returns:
        The token ids of each text, and the position of its last subject token.
    """
    sequences, last = [], []
    for text, subject, start in texts:
        sequences.append(prompt_tokens(model, text)[0].tolist())
        last.append(subject_range(model, text, subject, start=start)[1] - 1)
    return sequences, last


# --------------------------------------------------------------------------- keys


def subject_activations(
    model: Model, texts: list[tuple[str, str, int]], hook_name: str
) -> Float[Tensor, "text d"]:
    """The activation at ``hook_name`` at each ``(text, subject, start)``'s last subject token.

    Args:
        model: the model.
        texts: ``(text, subject, subject_start)`` triples.
        hook_name: the hook point to read.

    Returns:
        ``[text d]`` activations, float64, on the model's device.
    """
    sequences, last = encode(model, texts)
    out = []
    with torch.inference_mode(), linear_layout(model):
        for start in range(0, len(sequences), _MAX_ROWS):
            rows = slice(start, start + _MAX_ROWS)
            tokens, _ = pad([torch.tensor(s) for s in sequences[rows]], 0, "right")
            at = (torch.arange(len(last[rows])), torch.tensor(last[rows]))
            picked = capture(model, tokens, [hook_name], at=at)[hook_name]
            out.append(picked.double())
    return torch.cat(out)


def compute_keys(
    model: Model, requests: Sequence[EditRequest], layer: int, templates: list[str]
) -> Float[Tensor, "request d_mlp"]:
    """``blocks.{layer}.mlp.hook_post`` at each request's last subject token, context-averaged.

    Args:
        model: the model.
        requests: the facts.
        layer: the MLP layer.
        templates: the context templates (from :func:`context_templates`).

    Returns:
        ``[request d_mlp]`` keys k*, float64.
    """
    texts = [text for request in requests for text in in_contexts(request, templates)]
    keys = subject_activations(model, texts, f"blocks.{layer}.mlp.hook_post")
    return keys.view(len(requests), len(templates), -1).mean(1)


# --------------------------------------------------------------------------- values


class ValueObjective:
    """The model's log-probabilities at chosen positions as a function of δ, computed cheaply.

    ``δ[owners[i]]`` is added to ``W_out``'s output (:func:`mlp_output_hook`) at sequence
    ``i``'s last subject token, so nothing before that token, and nothing below
    ``layer``, depends on it. Those parts are computed once: the tokens before
    the subject's last token are left-padded into a common prefix whose keys and
    values go into a frozen TransformerLens KV cache, and the rest of each
    sequence (the "suffix", right-padded) is run up to ``layer``. Each call then
    runs only the suffix through the layers from ``layer`` on, about a quarter
    of the positions and, at early layers, most of the depth.
    """

    def __init__(
        self,
        model: Model,
        layer: int,
        sequences: list[list[int]],
        subject_last: list[int],
        reads: list[tuple[int, int]],
        owners: list[int] | None = None,
        hook: str | None = None,
    ) -> None:
        """``reads`` are the (sequence, position) pairs whose next-token log-probs are returned;
        ``owners`` the row of δ each sequence receives (all row 0 by default); ``hook`` where
        δ is added (``None``: ``W_out``'s output, :func:`mlp_output_hook`)."""
        self.model, self.layer = model, layer
        self.hook = mlp_output_hook(model, layer) if hook is None else hook
        device = model_device(model)
        prefixes = [
            torch.tensor(seq[:last], dtype=torch.long)
            for seq, last in zip(sequences, subject_last, strict=True)
        ]
        suffixes = [
            torch.tensor(seq[last:], dtype=torch.long)
            for seq, last in zip(sequences, subject_last, strict=True)
        ]
        suffix, _ = pad(suffixes, 0, "right")  # causal attention never reads right pads
        self.cache: object | None = None
        self.mask: Tensor | None = None
        with torch.no_grad():
            if max(subject_last) > 0:
                prefix, prefix_mask = pad(prefixes, 0, "left")
                self.cache = new_kv_cache(model, len(sequences))
                forward(
                    model,
                    prefix.to(device),
                    attention_mask=prefix_mask.to(device),
                    past_kv_cache=self.cache,
                    return_type=None,
                )
                freeze(self.cache)
                self.mask = torch.cat([prefix_mask, torch.ones_like(suffix)], dim=1).to(device)
            self.resid = forward(
                model,
                suffix.to(device),
                attention_mask=None if self.cache is None else torch.ones_like(suffix).to(device),
                past_kv_cache=self.cache,
                stop_at_layer=layer,
            )
        self.read_rows = torch.tensor([row for row, _ in reads], device=device)
        self.read_positions = torch.tensor(
            [position - subject_last[row] for row, position in reads], device=device
        )
        self.owners = torch.tensor(owners or [0] * len(sequences), device=device)
        self.hook_rows = torch.arange(len(sequences), device=device)
        self.hook_positions = torch.zeros(len(sequences), dtype=torch.long, device=device)

    def __call__(self, delta: Float[Tensor, "owner d_model"]) -> Float[Tensor, "read vocab"]:
        """Log-probabilities of the next token at every read position, with δ added."""
        model, n_layers = self.model, self.model.cfg.n_layers
        hook = add_at_rows(self.hook_rows, self.hook_positions, delta[self.owners])
        with attached(model, [(self.hook, hook)]):
            final = forward(
                model,
                self.resid,
                start_at_layer=self.layer,
                stop_at_layer=n_layers,
                past_kv_cache=self.cache,
                attention_mask=self.mask,
            )
        logits = unembed(model, final[self.read_rows, self.read_positions])
        return logits.float().log_softmax(-1)


@dataclass
class _ValueProblem:
    """One request's sequences: each context prompt + target (but its last token), then KL."""

    sequences: list[list[int]]
    subject_last: list[int]
    target_ids: list[int]

    @property
    def suffix_lengths(self) -> list[int]:
        """Each sequence's tokens from the subject's last one: what the objective recomputes."""
        return [len(s) - last for s, last in zip(self.sequences, self.subject_last, strict=True)]

    @classmethod
    def build(
        cls,
        model: Model,
        request: EditRequest,
        templates: list[str],
        hparams: EditHyperParams,
    ) -> _ValueProblem:
        target_ids = check_request(model, request)
        kl_text = hparams.kl_prompt.replace("{}", request.subject, 1)
        kl = (kl_text, request.subject, hparams.kl_prompt.index("{}"))
        sequences, subject_last = encode(model, [*in_contexts(request, templates), kl])
        sequences = [seq + target_ids[:-1] for seq in sequences[:-1]] + [sequences[-1]]
        if max(len(s) for s in sequences) > model.cfg.n_ctx:
            raise ValueError(
                f"a context prompt of {request.text!r} is longer than the model's "
                f"n_ctx={model.cfg.n_ctx}"
            )
        return cls(sequences, subject_last, target_ids)


class _ValueBatch:
    """Several requests' problems in one :class:`ValueObjective`: per-request NLL and KL rows."""

    def __init__(
        self,
        model: Model,
        layer: int,
        problems: list[_ValueProblem],
        members: list[int],
        hook: str | None,
    ) -> None:
        self.members = members  # the rows of δ these problems belong to
        sequences: list[list[int]] = []
        reads: list[tuple[int, int]] = []
        subject_last, owners, nll_owner, answers, kl_reads = [], [], [], [], []
        for local, problem in enumerate(problems):
            n_rewrites = len(problem.sequences) - 1  # the last sequence is the KL prompt
            pairs = zip(problem.sequences, problem.subject_last, strict=True)
            for j, (seq, last) in enumerate(pairs):
                row = len(sequences)
                sequences.append(seq)
                subject_last.append(last)
                owners.append(members[local])
                if j == n_rewrites:
                    kl_reads.append(len(reads))
                    reads.append((row, len(seq) - 1))
                    continue
                first = len(seq) - len(problem.target_ids)
                reads += [(row, first + j) for j in range(len(problem.target_ids))]
                nll_owner += [local] * len(problem.target_ids)
                answers += problem.target_ids
        self.objective = ValueObjective(model, layer, sequences, subject_last, reads, owners, hook)
        device = model_device(model)
        is_kl = torch.zeros(len(reads), dtype=torch.bool, device=device)
        is_kl[kl_reads] = True
        self.kl_reads, self.nll_reads = is_kl.nonzero()[:, 0], (~is_kl).nonzero()[:, 0]
        self.nll_owner = torch.tensor(nll_owner, device=device)
        self.answers = torch.tensor(answers, device=device)[:, None]
        self.counts = torch.bincount(self.nll_owner, minlength=len(problems))

    def __call__(
        self, delta: Float[Tensor, "request d_model"]
    ) -> tuple[Float[Tensor, " member"], Float[Tensor, "member vocab"], Tensor]:
        """Each member's mean NLL of its target, its KL prompt's log-probabilities, and
        whether each of its target tokens is the top prediction on every context prompt."""
        log_probs = self.objective(delta)
        target_log_probs = log_probs[self.nll_reads]
        token_nll = -target_log_probs.gather(1, self.answers)[:, 0]
        sums = token_nll.new_zeros(len(self.members)).index_add(0, self.nll_owner, token_nll)
        missed = (target_log_probs.argmax(-1) != self.answers[:, 0]).float()
        misses = missed.new_zeros(len(self.members)).index_add(0, self.nll_owner, missed)
        return sums / self.counts, log_probs[self.kl_reads], misses == 0


def optimize_deltas(
    model: Model,
    requests: Sequence[EditRequest],
    layer: int,
    templates: list[str],
    init_norms: Float[Tensor, " request"],
    hparams: EditHyperParams,
    *,
    batch_size: int = 32,
    hook: str | None = None,
    progress: bool = True,
) -> tuple[Float[Tensor, "request d_model"], list[list[float]]]:
    """δ for each request (see the module docstring) and its loss at every step.

    ``init_norms`` are the norms that scale the decay and the clamp: ‖v_init‖
    for ROME, ‖h‖ for MEMIT. Requests are optimised ``batch_size`` at a time.

    Args:
        model: the model (not changed).
        requests: the facts.
        layer: the layer whose MLP output δ is added to.
        templates: the context templates.
        init_norms: one norm per request: ‖v_init‖ (ROME) or ‖h‖ (MEMIT).
        hparams: the optimisation settings.
        batch_size: requests optimised together.
        hook: the hook point δ is added at (``None``: ``W_out``'s output, where ROME's
            ``v* = v_init + δ`` lives; MEMIT passes ``hook_mlp_out``, what the block adds
            to the residual stream, so that ``z = h + δ``).
        progress: show a progress bar.

    Returns:
        ``[request d_model]`` δ, and each request's loss at every step.
    """
    problems = [_ValueProblem.build(model, r, templates, hparams) for r in requests]
    # Batches of requests with suffixes of like length waste little on right padding.
    order = sorted(range(len(problems)), key=lambda i: max(problems[i].suffix_lengths))
    deltas = torch.empty(len(problems), model.cfg.d_model, device=model_device(model))
    losses: list[list[float]] = [[] for _ in problems]
    bar = tqdm(total=len(requests), desc=f"optimising δ at layer {layer}", disable=not progress)
    with frozen(model), torch.enable_grad(), linear_layout(model):
        for start in range(0, len(problems), batch_size):
            chunk = order[start : start + batch_size]
            delta, chunk_losses = _optimise_batch(
                model, layer, [problems[i] for i in chunk], init_norms[chunk].float(), hparams,
                hook, bar,
            )  # fmt: skip
            deltas[chunk] = delta
            for i, loss in zip(chunk, chunk_losses, strict=True):
                losses[i] = loss
    bar.close()
    return deltas, losses


def _optimise_batch(
    model: Model,
    layer: int,
    problems: list[_ValueProblem],
    init_norms: Tensor,
    hparams: EditHyperParams,
    hook: str | None,
    bar: tqdm,
) -> tuple[Tensor, list[list[float]]]:
    n, device = len(problems), model_device(model)
    delta = torch.zeros(n, model.cfg.d_model, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    init_norms = init_norms.to(device)
    max_norms = hparams.clamp_norm_factor * init_norms
    history: list[tuple[Tensor, Tensor]] = []  # (live requests, their losses) per step
    active = torch.ones(n, dtype=torch.bool, device=device)
    init_kl: Tensor | None = None
    batch: _ValueBatch | None = None
    for _ in range(hparams.v_steps):
        if batch is None or 2 * int(active.sum()) <= len(batch.members):
            # Converged requests leave the batch once they are half of it.
            members = active.nonzero()[:, 0].tolist()
            batch = _ValueBatch(model, layer, [problems[i] for i in members], members, hook)
        members_t = torch.tensor(batch.members, device=device)
        nll, kl_log_probs, on_top = batch(delta)
        if init_kl is None:
            init_kl = kl_log_probs.detach()
        # KL(current ‖ initial) on the essence prompt, as ROME's F.kl_div(init, current).
        kl = (kl_log_probs.exp() * (kl_log_probs - init_kl[members_t])).sum(-1)
        decay = delta[members_t].norm(dim=1) / init_norms[members_t] ** 2
        loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * decay
        live = active[members_t]
        history.append((members_t[live], loss.detach()[live]))
        met = on_top if hparams.early_stop == "most_probable" else nll < hparams.early_stop_nll
        done = live & met.detach()
        active[members_t[done]] = False
        if not bar.disable:  # each of these reads a number back from the device
            bar.update(int(done.sum()))
            bar.set_postfix(nll=f"{nll[live].mean().item():.3f}", active=int(active.sum()))
        if not active.any():
            break
        kept = delta.detach().clone()
        optimizer.zero_grad()
        loss[active[members_t]].sum().backward()
        optimizer.step()
        with torch.no_grad():
            finished = ~active
            delta[finished] = kept[finished]  # finished requests keep the δ that met the target
            norms = delta.norm(dim=1)
            delta.mul_(torch.where(norms > max_norms, max_norms / norms, 1.0)[:, None])
    if not bar.disable:
        bar.update(int(active.sum()))  # those that ran every step without converging
    return delta.detach(), _losses_by_request(history, n)


def _losses_by_request(history: list[tuple[Tensor, Tensor]], n: int) -> list[list[float]]:
    """Each request's loss at every step it was live, read from the device at once."""
    losses: list[list[float]] = [[] for _ in range(n)]
    if not history:
        return losses
    owners = torch.cat([members for members, _ in history]).tolist()
    values = torch.cat([step for _, step in history]).tolist()
    for request, value in zip(owners, values, strict=True):
        losses[request].append(value)
    return losses


optimise_deltas = optimize_deltas  # its name before 0.3 (see the CHANGELOG)
