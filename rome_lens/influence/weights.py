"""The MLP weights influence functions see, and where their inputs and output gradients are.

A ``HookedTransformer`` applies its MLP weights as raw parameters, so no
``nn.Linear`` marks them; TransformerLens's hook points do. For layer ``L``:

* ``blocks.{L}.mlp.W_in``: input ``ln2.hook_normalized`` (times ln2's weight,
  plus its bias, where the model keeps them); output ``mlp.hook_pre_linear``
  (gated MLPs) or ``mlp.hook_pre``;
* ``blocks.{L}.mlp.W_gate``: the same input; output ``mlp.hook_pre``;
* ``blocks.{L}.mlp.W_out``: input ``mlp.hook_post`` (ROME's keys); output
  ``hook_mlp_out``.

A ``TransformerBridge`` wraps each of those matrices in a component with hook
points of its own, which see exactly the matrix's input and output whatever
the family does around them (GPT-J's MLP reads ``ln_1``, Gemma scales by
``1 + weight``, Gemma 2 normalises after the MLP): ``mlp.in``, ``mlp.gate``
and ``mlp.out``'s ``hook_in`` and ``hook_out``.

A weight's gradient over a sequence is ``Σ_t ā_t g_tᵀ``, with ``ā = [a; 1]``
when the weight has a bias. TransformerLens gives every MLP a ``b_in`` and a
``b_out``, zero for models that have none (Llama); a bias counts only when its
parameter is not all zeros, and a gated MLP's ``b_in`` is added after the
gate, so it is no bias of ``W_in``.

>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.influence.weights import mlp_weights
>>> weights = mlp_weights(tiny_model(), [1])
>>> [(w.name, w.bias, w.d_in, w.d_out) for w in weights]
[('blocks.1.mlp.W_in', True, 64, 256), ('blocks.1.mlp.W_out', True, 256, 64)]
>>> weights[1].input_hook  # ROME's keys, on either TransformerLens
'blocks.1.mlp.hook_post'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from rome_lens.core.backend import Model, is_bridge, mlp_output_hook
from rome_lens.core.fingerprint import check_layer

__all__ = ["WEIGHT_KINDS", "MLPWeight", "check_layers", "mlp_weights"]

WEIGHT_KINDS = (
    "W_in",
    "W_gate",
    "W_out",
)  # an MLP's weight matrices, as TransformerLens names them


@dataclass(frozen=True)
class MLPWeight:
    """One MLP weight matrix and the hook points that carry its input and output gradient."""

    layer: int
    """The block."""
    name: str
    """The parameter, e.g. ``blocks.3.mlp.W_out``."""
    input_hook: str
    """The hook point its input is read from."""
    output_hook: str
    """The hook point of its output, whose gradient is read."""
    bias: bool
    """Whether the input gets a ones column for a bias."""
    d_in: int
    """The input width (without the bias column)."""
    d_out: int
    """The output width."""

    @property
    def ln2_affine(self) -> bool:
        """Whether the input hook is ``ln2.hook_normalized``, before ln2's weight and bias
        (a ``HookedTransformer``'s W_in and W_gate)."""
        return self.input_hook.endswith(".ln2.hook_normalized")

    @property
    def short(self) -> str:
        """``W_in``, ``W_gate`` or ``W_out``."""
        return self.name.rsplit(".", 1)[-1]

    def inputs(
        self, model: Model, activation: Float[Tensor, "... d"]
    ) -> Float[Tensor, "... d_in_plus"]:
        """The weight's input ``ā`` from its input hook's activation (with ln2's affine map
        applied for W_in and W_gate, and a ones column when it has a bias).

        Args:
            model: the model.
            activation: the input hook's activation.

        Returns:
            ``ā``, with ``d_in`` or ``d_in + 1`` columns.
        """
        x = activation
        if self.ln2_affine:
            ln = model.blocks[self.layer].ln2
            weight, bias = getattr(ln, "w", None), getattr(ln, "b", None)
            if isinstance(weight, Tensor):
                x = x * weight.detach()
            if isinstance(bias, Tensor):
                x = x + bias.detach()
        if self.bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return x


def check_layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as an ascending list of MLP layers (``None``: every layer).

    Args:
        model: the model.
        layers: the layers asked for.

    Returns:
        The layers, ascending and without repeats.

    Raises:
        ValueError: a layer out of range, or no layer at all.
    """
    if layers is None:
        return list(range(model.cfg.n_layers))
    checked = sorted({check_layer(model, layer) for layer in layers})
    if not checked:
        raise ValueError("layers must name at least one MLP layer, got none")
    return checked


def mlp_weights(
    model: Model,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
) -> list[MLPWeight]:
    """The MLP weights of ``layers``: W_in, W_gate (gated MLPs) and W_out of each.

    Args:
        model: any TransformerLens model with dense MLPs.
        layers: the layers (``None``: every layer).
        kinds: keep these of ``"W_in"``, ``"W_gate"``, ``"W_out"`` (``None``: all the model has).

    Returns:
        The weights, layer by layer.

    Raises:
        ValueError: an unknown kind, or none the model has.
    """
    if kinds is not None:
        unknown = [kind for kind in kinds if kind not in WEIGHT_KINDS]
        if unknown or not kinds:
            raise ValueError(f"weights must name some of {WEIGHT_KINDS}, got {list(kinds)}")
    weights = []
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    assert d_mlp is not None
    for layer in check_layers(model, layers):
        mlp = model.blocks[layer].mlp
        gated = isinstance(getattr(mlp, "W_gate", None), Tensor)
        in_bias = not gated and _nonzero(getattr(mlp, "b_in", None))  # gated: b_in is added later
        out_bias = _nonzero(getattr(mlp, "b_out", None))
        hooks = (_bridge_hooks if is_bridge(model) else _tl3_hooks)(model, layer, gated)
        w_in, w_gate, w_out = (f"blocks.{layer}.mlp.{kind}" for kind in WEIGHT_KINDS)
        weights.append(MLPWeight(layer, w_in, *hooks["W_in"], in_bias, d_model, d_mlp))
        if gated:
            weights.append(MLPWeight(layer, w_gate, *hooks["W_gate"], False, d_model, d_mlp))
        weights.append(MLPWeight(layer, w_out, *hooks["W_out"], out_bias, d_mlp, d_model))
    if kinds is not None:
        weights = [w for w in weights if w.short in kinds]
        if not weights:
            raise ValueError(f"the model's MLPs have no {list(kinds)} (a W_gate needs a gated MLP)")
    return weights


def _nonzero(param: object) -> bool:
    return isinstance(param, Tensor) and bool((param.detach() != 0).any())


def _tl3_hooks(model: Model, layer: int, gated: bool) -> dict[str, tuple[str, str]]:
    """(input, output) hook of each MLP matrix of a ``HookedTransformer``."""
    block = f"blocks.{layer}"
    normalized = f"{block}.ln2.hook_normalized"
    return {
        "W_in": (normalized, f"{block}.mlp.hook_pre_linear" if gated else f"{block}.mlp.hook_pre"),
        "W_gate": (normalized, f"{block}.mlp.hook_pre"),
        "W_out": (f"{block}.mlp.hook_post", mlp_output_hook(model, layer)),
    }


def _bridge_hooks(model: Model, layer: int, gated: bool) -> dict[str, tuple[str, str]]:
    """(input, output) hook of each MLP matrix of a bridge: its own linear component's.

    Raises:
        ValueError: the bridge does not split this MLP into ``in``/``gate``/``out`` linears.
    """
    mlp = f"blocks.{layer}.mlp"
    hooks = {
        "W_in": (f"{mlp}.in.hook_in", f"{mlp}.in.hook_out"),
        "W_gate": (f"{mlp}.gate.hook_in", f"{mlp}.gate.hook_out"),
        "W_out": (f"{mlp}.hook_post", mlp_output_hook(model, layer)),
    }
    needed = [hook for kind, pair in hooks.items() if gated or kind != "W_gate" for hook in pair]
    missing = [hook for hook in needed if hook not in model.hook_dict]
    if missing:
        raise ValueError(
            f"influence functions need the hook points {missing} of "
            f"{getattr(model.cfg, 'architecture', 'this model')}'s MLP, which its "
            "TransformerBridge does not have"
        )
    return hooks
