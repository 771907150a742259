"""What a piece of rome_lens costs, from a model's shape alone: FLOPs, memory and disk.

Before computing GPT-J's key statistics or fitting EK-FAC factors on
Llama-3-8B, :func:`estimate_cost` says how many floating-point operations the
piece does, the most memory it holds at once beyond the weights, and what it
writes to the cache, from the model's config (or a :class:`ModelShape`, or the
name of a built-in one) without loading a weight. The pieces (:data:`WORKS`)
are the heavy ones:

* ``"key_statistics"``: ROME's C = E[k kᵀ] of one layer (:mod:`rome_lens.stats.keys`);
* ``"rome_edit"``: one ROME edit, its layer's key statistics already cached;
* ``"memit_1000"``, ``"memit_10000"`` (and ``"memit"``): a MEMIT batch of that many facts;
* ``"ekfac_factors"``: EK-FAC factors of the MLP weights, ``layers_per_pass`` layers
  per pass over the corpus (:mod:`rome_lens.influence.factors`);
* ``"scan"``: one influence query scored over a corpus (:mod:`rome_lens.influence.scores`).

A :class:`Cost` is a sum of :class:`Step` s that follow the code in order, with
rome_lens's own defaults (20,000 tokens, batches of 64, up to 20 steps of δ,
...) unless a size is overridden (``n_tokens=``, ``n_requests=``, ``layers=``,
``dtype=``: the fields of :class:`CostSettings`). How the steps count:

* **FLOPs.** A matmul of ``m × k`` by ``k × n`` is ``2mkn``. A forward pass of
  ``T`` tokens through a block is ``2T`` times the block's matmul parameters,
  plus ``4 T c · n_heads · d_head`` for attention over ``c`` keys (QKᵀ and the
  weighted values; the whole square is computed and the causal mask hides
  half); the unembedding is ``2 d_model d_vocab`` per row of logits. rome_lens
  never asks for a weight's gradient (the model is frozen; it differentiates δ
  or activations), so a backward pass is one more pass through the weights and
  two through attention, and it stops at the lowest activation it needs.
  ``tests/test_cost.py`` checks these counts against
  ``torch.utils.flop_counter.FlopCounterMode`` on ``tiny_model()``.
* **Precision.** Everything runs on the model's device
  (:mod:`rome_lens.core.precision`): its forward and backward passes in its
  dtype; sums over a corpus in float64 (Kahan-compensated float32 on GPUs
  without full-rate float64: ``accumulator="float32"``); solves and
  eigendecompositions in float64 (LU ``2n³/3``, eigenvalues ``4n³/3``,
  eigenvalues and vectors ``9n³``); EK-FAC's rotations and the scan's dot
  products in float32. :class:`Throughput` gives each precision its own rate.
* **Memory** is the largest set of tensors a step holds at once: accumulators,
  activations kept for a backward pass, logits, KV caches, keys on the model's
  device (:attr:`Step.device_bytes`), and apart from them what waits in host
  memory (:attr:`Step.host_bytes`): the EK-FAC factors of the passes before
  (``layers_per_pass``) and, during a scan, all of them (it brings one weight's
  factors to the device at a time), files being written. It leaves out the
  allocator's slack and Python itself, so a measured peak is somewhat higher
  (``bench/bench_cost.py`` compares them on the default model).

The numbers are as good as the sizes they assume: an edit's prompt, subject
and target lengths (:class:`CostSettings`), and δ optimised for all of its
``v_steps`` (early stopping takes fewer).

>>> from rome_lens.core.cost import (
...     automatic_layers_per_pass, estimate_cost, largest_layers_per_pass)
>>> from rome_lens.core.models import tiny_model
>>> stats = estimate_cost(tiny_model(), "key_statistics", n_tokens=1_000)
>>> [step.name for step in stats.parts]
['sample the corpus', 'forward to layer 1', 'Σ k kᵀ', 'save the moments']
>>> stats.persisted_bytes == (256 * 256 + 256) * 8 + 16 * 64 * 8  # C and Σk; the samples
True

On real sizes the float64 sums are what grows: GPT-J's ``d_mlp = 16,384``
makes C 2 GiB, and EK-FAC's moments of all 28 layers at once do not fit one
80 GB accelerator. ``fit_influence_factors`` then fits a few layers per pass
over the corpus (``layers_per_pass``; by itself, as many as half the free
memory holds), each pass running the model forward and back twice more:

>>> gptj = estimate_cost("gpt-j-6b", "key_statistics", dtype="bfloat16")
>>> round(gptj.persisted_bytes / 2**30, 2), round(gptj.weights_bytes / 2**30, 1)
(2.0, 11.3)
>>> one_pass = estimate_cost("gpt-j-6b", "ekfac_factors", dtype="bfloat16")
>>> one_pass.fits(80e9), one_pass.exceeds(80e9)[0]
(False, 'moments pass (forward + backward)')
>>> automatic_layers_per_pass("gpt-j-6b", 80e9, dtype="bfloat16")  # what the fit picks
7
>>> largest_layers_per_pass("gpt-j-6b", 80e9, dtype="bfloat16")  # the most that fits
8
>>> fit = estimate_cost("gpt-j-6b", "ekfac_factors", dtype="bfloat16", layers_per_pass=7)
>>> fit.fits(80e9), round(fit.flops / one_pass.flops, 2)  # four passes
(True, 1.44)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
from torch import Tensor

from rome_lens.core.backend import Model, named_weights, weight
from rome_lens.core.corpus import DEFAULT_MAX_LENGTH, SAMPLE_LENGTH
from rome_lens.core.layers import default_layers_for
from rome_lens.core.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME, PREPEND_BOS

__all__ = [
    "BUILTIN_SHAPES",
    "CPU",
    "GPU_BYTES",
    "H200",
    "WORKS",
    "Cost",
    "CostSettings",
    "ModelShape",
    "Step",
    "Throughput",
    "automatic_layers_per_pass",
    "estimate_cost",
    "forward_flops",
    "largest_layers_per_pass",
    "model_shape",
]

WORKS = (
    "key_statistics",
    "rome_edit",
    "memit",
    "memit_1000",
    "memit_10000",
    "ekfac_factors",
    "scan",
)
GPU_BYTES = 80 * 10**9  # one 80 GB accelerator (H100, A100 80GB)

Precision = Literal["model", "float32", "float64"]
Kind = Literal["matmul", "lapack", "io"]

# --------------------------------------------------------------------------- defaults

# rome_lens's own defaults, copied here because the core room imports no room above it;
# tests/test_cost.py checks every one against the code it mirrors.
KEY_STATS_N_TOKENS = 20_000  # stats.keys.DEFAULT_N_TOKENS
KEY_STATS_BATCH_SIZE = 64  # key_second_moment(batch_size=)
SAMPLING_BATCH_SIZE = 64  # Corpus.chunks(batch_size=): sequences sampled at once
KEY_ROWS_PER_PASS = 256  # editing.memory._MAX_ROWS: prompts per pass when reading keys
OUTCOME_BATCH_SIZE = 64  # editing.outcomes.measure_outcomes(batch_size=)
V_STEPS = 20  # EditHyperParams.v_steps and MEMITHyperParams.v_steps
ROME_CONTEXTS = ((5, 10), (10, 10))  # ROMEHyperParams.context_lengths: (tokens, how many)
MEMIT_CONTEXTS = ((10, 5),)  # MEMITHyperParams.context_lengths
MEMIT_REQUESTS_PER_BATCH = 32  # MEMITHyperParams.requests_per_batch
EKFAC_N_TOKENS = 20_000  # fit_influence_factors(n_tokens=)
EKFAC_BATCH_SIZE = 16  # fit_influence_factors(batch_size=)
SCAN_BATCH_SIZE = 8  # influence(batch_size=)
SCAN_TOP_K = 20  # influence(top_k=)
TOKEN_FORM_LIMIT = 32  # influence.scan._TOKEN_FORM_LIMIT: positions × queries
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_EIGH = 9  # eigenvalues and eigenvectors of a symmetric n × n matrix: about 9n³ FLOPs
_EIGVALSH = 4 / 3  # eigenvalues only: the tridiagonal reduction, 4n³/3
_LU = 2 / 3  # an LU factorisation, 2n³/3
_SUM_BYTES = 8  # per entry of a running sum: float64, or float32 and its Kahan compensation

# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer that its costs depend on."""

    name: str
    """``model_name``, which picks rome_lens's default layers ("gpt2-xl", "gpt-j-6B", ...)"""
    n_layers: int
    """Transformer blocks."""
    d_model: int
    """Width of the residual stream."""
    d_mlp: int
    """Width of the MLP's hidden layer: ROME's keys."""
    d_vocab: int
    """Vocabulary size."""
    n_heads: int
    """Attention (query) heads."""
    n_key_value_heads: int | None = None
    """Key and value heads (grouped-query attention); None: n_heads."""
    d_head: int | None = None
    """Width of a head; None: d_model // n_heads."""
    n_ctx: int = 2048
    """Longest context; corpus windows and sampled sequences are capped by it."""
    gated_mlp: bool = False
    """SwiGLU-style MLP with W_gate beside W_in (Llama, SmolLM2)"""
    mlp_bias: bool = True
    """W_in and W_out have biases (GPT-2, GPT-J; Llama-family models have none)"""
    prepend_bos: bool = True
    """Prompts and corpus windows start with BOS."""
    tied_embeddings: bool = False
    """The unembedding is the embedding (counted once in the weights)"""
    learned_positions: bool = False
    """An n_ctx × d_model position embedding (GPT-2)"""
    n_parameters: int | None = None
    """Weights in all; None: computed from the sizes above."""
    dtype_bytes: int = 4
    """Bytes per weight and activation (4: float32, as rome_lens runs on the CPU)"""

    @property
    def key_value_heads(self) -> int:
        """Key and value heads."""
        return self.n_heads if self.n_key_value_heads is None else self.n_key_value_heads

    @property
    def head_width(self) -> int:
        """Width of one head."""
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def d_attention(self) -> int:
        """Width of the queries of all heads (``n_heads × d_head``)"""
        return self.n_heads * self.head_width

    @property
    def d_key_value(self) -> int:
        """Width of the keys (or values) of all key-value heads."""
        return self.key_value_heads * self.head_width

    @property
    def block_matmul_parameters(self) -> int:
        """Weights one token multiplies through in a block: attention's four, the MLP's."""
        attention = self.d_model * (2 * self.d_attention + 2 * self.d_key_value)
        return attention + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def parameters(self) -> int:
        """Weights in all: :attr:`n_parameters`, else counted from the sizes."""
        if self.n_parameters is not None:
            return self.n_parameters
        embeddings = self.d_vocab * self.d_model * (1 if self.tied_embeddings else 2)
        positions = self.n_ctx * self.d_model if self.learned_positions else 0
        biases = self.d_mlp + self.d_model if self.mlp_bias else 0
        block = self.block_matmul_parameters + 4 * self.d_model + biases  # and two norms
        return embeddings + positions + self.n_layers * block + 2 * self.d_model

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weights."""
        return self.parameters * self.dtype_bytes

    @classmethod
    def from_model(cls, model: Model) -> ModelShape:
        """The shape of a TransformerLens model (``HookedTransformer`` or ``TransformerBridge``).

        Args:
            model: the model; its config gives the sizes, its weights the parameter count.

        Returns:
            The shape, with the model's dtype and whether it prepends BOS.
        """
        cfg = model.cfg
        mlp = model.blocks[0].mlp
        gated = isinstance(getattr(mlp, "W_gate", None), Tensor)  # as influence.weights sees it
        biases = ("b_out",) if gated else ("b_in", "b_out")
        return cls(
            name=str(cfg.model_name),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_mlp=cfg.d_mlp,
            d_vocab=cfg.d_vocab,
            n_heads=cfg.n_heads,
            n_key_value_heads=getattr(cfg, "n_key_value_heads", None),
            d_head=cfg.d_head,
            n_ctx=cfg.n_ctx,
            gated_mlp=gated,
            mlp_bias=any(
                bool(weight(model, f"blocks.0.mlp.{b}").detach().ne(0).any()) for b in biases
            ),
            prepend_bos=bool(getattr(cfg, "default_prepend_bos", True)),
            n_parameters=sum(tensor.numel() for _, tensor in named_weights(model)),
            dtype_bytes=cfg.dtype.itemsize,
        )


# From the public Hugging Face configs of each model. GPT-J runs attention and the MLP in
# parallel from one norm, which changes neither FLOPs nor memory; SmolLM2 is read without
# BOS, as load_model() reads it.
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "gpt2-xl": ModelShape(
        "gpt2-xl", 48, 1600, 6400, 50257, 25, n_ctx=1024, tied_embeddings=True,
        learned_positions=True,
    ),
    "gpt-j-6b": ModelShape("gpt-j-6B", 28, 4096, 16384, 50400, 16, n_ctx=2048),
    "llama-3-8b": ModelShape(
        "Meta-Llama-3-8B", 32, 4096, 14336, 128256, 32, n_key_value_heads=8, n_ctx=8192,
        gated_mlp=True, mlp_bias=False,
    ),
    DEFAULT_MODEL: ModelShape(
        DEFAULT_MODEL_NAME, 30, 576, 1536, 49152, 9, n_key_value_heads=3, n_ctx=8192,
        gated_mlp=True, mlp_bias=False, prepend_bos=PREPEND_BOS[DEFAULT_MODEL],
        tied_embeddings=True,
    ),
}  # fmt: skip


def model_shape(model_or_config: Model | ModelShape | str) -> ModelShape:
    """The :class:`ModelShape` of a model, a shape, or the name of a built-in shape.

    Args:
        model_or_config: a TransformerLens model, a :class:`ModelShape`, or one of
            :data:`BUILTIN_SHAPES` ("gpt2-xl", "gpt-j-6b", "llama-3-8b", "smollm2-135m").

    Returns:
        The shape.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(model_or_config, ModelShape):
        return model_or_config
    if isinstance(model_or_config, str):
        found = BUILTIN_SHAPES.get(model_or_config.lower())
        if found is None:
            raise ValueError(
                f"unknown model shape {model_or_config!r}: choose one of "
                f"{', '.join(BUILTIN_SHAPES)}, or pass a model or a ModelShape"
            )
        return found
    return ModelShape.from_model(model_or_config)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CostSettings:
    """The sizes a piece of work is estimated for; None takes rome_lens's default for it."""

    layer: int | None = None
    """key_statistics, rome_edit: the MLP layer (None: ROME's default layer)"""
    layers: tuple[int, ...] | None = None
    """Memit: the edited layers; ekfac_factors, scan: the layers fitted (None: every layer)"""
    layers_per_pass: int | None = None
    """ekfac_factors: layers fitted per pass over the corpus (None: all in one pass, as on a
    device with room; ``fit_influence_factors`` picks what fits, see
    :func:`automatic_layers_per_pass`)"""
    n_tokens: int | None = None
    """key_statistics, ekfac_factors: tokens averaged over (20,000)"""
    batch_size: int | None = None
    """Sequences per pass (64, EK-FAC 16, scan 8); memit: requests per δ batch (32)"""
    sampled_corpus: bool = True
    """The corpus is sampled from the model first (the default); False: text is given."""
    sequence_tokens: int | None = None
    """Tokens per corpus window, BOS excluded (None: 64 sampled, 127 given)"""
    n_requests: int | None = None
    """Memit: facts written (1,000 or 10,000, from the work's name)"""
    v_steps: float | None = None
    """Steps of δ per request (None: all 20; early stopping takes fewer)"""
    context_lengths: tuple[tuple[int, int], ...] | None = None
    """Context prefixes as (tokens, how many) (None: ROME's or MEMIT's)"""
    prompt_tokens: int = 10
    """Tokens of an edit's prompt with its subject, BOS excluded."""
    subject_tokens: int = 3
    """Tokens of the subject, which starts the prompt."""
    target_tokens: int = 2
    """Tokens of the new target."""
    n_documents: int = 1_000
    """Scan: texts scored."""
    document_tokens: int = 128
    """Scan: tokens per text, BOS excluded."""
    n_queries: int = 1
    """Scan: (prompt, completion) queries scored together."""
    query_tokens: int = 12
    """Scan: tokens of a query's prompt and completion, BOS excluded."""
    top_k: int | None = None
    """Scan: top texts split by token (20)"""
    dtype: str | None = None
    """Weights and activations: "float32", "bfloat16", ... (None: the model's)"""
    accumulator: Literal["float64", "float32"] = "float64"
    """Sums over a corpus: float64 (CPU, P100 to B200) or Kahan float32 (other GPUs)"""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Step:
    """One step of a piece of work: its FLOPs, their precision, and the memory it holds."""

    name: str
    """What the step does, e.g. "forward to layer 2"."""
    flops: float
    """Floating-point operations (a multiply-add is two)"""
    precision: Precision
    """"model" (the model's dtype), "float32" or "float64", all on the model's device."""
    kind: Kind
    """"matmul" (counted by torch's FlopCounterMode), "lapack" (solve, eigh) or "io"."""
    device_bytes: int
    """Largest held at once on the model's device, weights excluded."""
    host_bytes: int = 0
    """Largest held at once in host memory besides: EK-FAC factors waiting there, files
    being written or read."""
    block_calls: int = 0
    """Transformer blocks run, one call each (for a per-call overhead)"""
    once: bool = False
    """Cached after the first time: corpus sampling, context prefixes."""

    @property
    def memory_bytes(self) -> int:
        """Device and host bytes together: what the step holds when the model is on the CPU."""
        return self.device_bytes + self.host_bytes


@dataclass(frozen=True)
class Throughput:
    """Sustained rates, in FLOP/s, of the device the model runs on."""

    model: float
    """Matmuls in the model's dtype."""
    float32: float | None = None
    """Matmuls in float32 (None: ``model``, as for a float32 model)."""
    float64: float | None = None
    """Matmuls in float64 (None: half of ``float32``, as on CPUs)."""
    lapack: float | None = None
    """Solves and eigendecompositions in float64, slower than matmuls (None: ``float64``)."""
    seconds_per_block_call: float = 0.0
    """The fixed cost of calling one transformer block (Python, hooks, dispatch)."""

    def rate(self, step: Step) -> float:
        """The rate ``step`` runs at, from its precision and kind, in FLOP/s.

        Args:
            step: the step.

        Returns:
            FLOP/s.
        """
        float32 = self.model if self.float32 is None else self.float32
        float64 = float32 / 2 if self.float64 is None else self.float64
        if step.kind == "lapack" and self.lapack is not None:
            return self.lapack
        return {"model": self.model, "float32": float32, "float64": float64}[step.precision]


CPU = Throughput(200e9)  # a CPU doing 200 GFLOP/s in float32 and half that in float64
# An H200 with a bfloat16 model: about 400 TFLOP/s sustained in bfloat16, 60 TFLOP/s in
# float32 (without TF32) and float64, and an assumed 2 TFLOP/s for cuSOLVER's eigh and LU
# at these sizes (their tridiagonal reduction is bound by memory, not arithmetic).
H200 = Throughput(400e12, float32=60e12, float64=60e12, lapack=2e12)


@dataclass(frozen=True)
class Cost:
    """What a piece of work costs: FLOPs, peak memory, weights, and what it writes to disk."""

    work: str
    """The piece, one of WORKS."""
    model: str
    """The model shape's name."""
    flops: float
    """All steps' FLOPs."""
    peak_memory_bytes: int
    """Most held at once beyond the weights, device and host together (a CPU run)"""
    peak_device_bytes: int
    """Most held at once on the model's device beyond the weights (a GPU run)"""
    weights_bytes: int
    """The model's weights."""
    persisted_bytes: int
    """Written to the rome_lens cache."""
    parts: tuple[Step, ...]
    """The steps, in the order the code runs them."""
    settings: CostSettings
    """The sizes assumed, defaults filled in."""

    @classmethod
    def of(
        cls,
        work: str,
        shape: ModelShape,
        parts: Sequence[Step],
        persisted_bytes: int,
        settings: CostSettings,
    ) -> Cost:
        """Sum ``parts`` into a cost.

        Args:
            work: the piece.
            shape: the model's shape, in the dtype the piece runs in.
            parts: the steps.
            persisted_bytes: what the piece writes to the cache.
            settings: the sizes assumed.

        Returns:
            The cost.
        """
        return cls(
            work=work,
            model=shape.name,
            flops=float(sum(step.flops for step in parts)),
            peak_memory_bytes=max(step.memory_bytes for step in parts),
            peak_device_bytes=max(step.device_bytes for step in parts),
            weights_bytes=shape.weights_bytes,
            persisted_bytes=persisted_bytes,
            parts=tuple(parts),
            settings=settings,
        )

    @property
    def matmul_flops(self) -> float:
        """The FLOPs of the matmul steps: what ``torch.utils.flop_counter`` counts (it
        leaves LAPACK's solves and eigendecompositions out)."""
        return float(sum(step.flops for step in self.parts if step.kind == "matmul"))

    def __repr__(self) -> str:
        return (
            f"Cost({self.work} on {self.model}: {self.flops:.3g} FLOPs, peak "
            f"{_gib(self.peak_memory_bytes)} beyond {_gib(self.weights_bytes)} of weights, "
            f"writes {_gib(self.persisted_bytes)})"
        )

    def seconds(self, flops_per_second: float | Throughput) -> float:
        """Predicted seconds at the given rate(s).

        Args:
            flops_per_second: one rate for the model's dtype (float64 at half of it,
                as on CPUs), or a :class:`Throughput` with a rate per precision.

        Returns:
            The seconds, every step included (those done ``once`` too).
        """
        rates = (
            flops_per_second
            if isinstance(flops_per_second, Throughput)
            else Throughput(flops_per_second)
        )
        return sum(
            step.flops / rates.rate(step) + step.block_calls * rates.seconds_per_block_call
            for step in self.parts
        )

    def exceeds(self, bytes_available: float = GPU_BYTES) -> tuple[str, ...]:
        """The steps that, with the weights, need more device memory than ``bytes_available``.

        Args:
            bytes_available: the accelerator's memory (default: one 80 GB GPU).

        Returns:
            The steps' names, in order; empty when the piece fits.
        """
        return tuple(
            step.name
            for step in self.parts
            if step.device_bytes + self.weights_bytes > bytes_available
        )

    def fits(self, bytes_available: float, *, one_memory: bool = False) -> bool:
        """Whether the weights and the most the piece holds at once fit in ``bytes_available``.

        Args:
            bytes_available: the memory, in bytes.
            one_memory: count the host's bytes too, as when the model runs on the CPU;
                False checks the accelerator's memory only.

        Returns:
            Whether it fits.
        """
        peak = self.peak_memory_bytes if one_memory else self.peak_device_bytes
        return self.weights_bytes + peak <= bytes_available

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: its FLOPs, their precision, and the memory it holds."""
        rows = [
            {"work": self.work, "model": self.model, **dataclasses.asdict(step)}
            | {"memory_bytes": step.memory_bytes}
            for step in self.parts
        ]
        return pd.DataFrame(rows)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB"


# --------------------------------------------------------------------------- FLOPs


def forward_flops(
    model_or_config: Model | ModelShape | str,
    tokens: int,
    *,
    context: int,
    blocks: int | None = None,
    unembedded: int = 0,
) -> float:
    """FLOPs of a forward pass: the blocks' matmuls, attention, and the unembedding.

    Args:
        model_or_config: a model, a :class:`ModelShape` or a built-in shape's name.
        tokens: tokens run (batch × positions).
        context: keys each token attends to (its sequence's length: the whole square
            is computed).
        blocks: blocks run (None: all).
        unembedded: rows of logits computed.

    Returns:
        ``2 · tokens · blocks · matmul parameters + 4 · tokens · context · blocks · n_heads
        · d_head + 2 · unembedded · d_model · d_vocab``.
    """
    shape = model_shape(model_or_config)
    return _pass_flops(shape, tokens, tokens * context, blocks, unembedded)


def _pass_flops(
    shape: ModelShape, tokens: int, attended: int, blocks: int | None, unembedded: int
) -> float:
    """Forward FLOPs when ``attended`` (keys summed over tokens) is not tokens × context."""
    blocks = shape.n_layers if blocks is None else blocks
    matmuls = 2 * tokens * blocks * shape.block_matmul_parameters
    attention = 4 * attended * blocks * shape.d_attention
    return float(matmuls + attention + 2 * unembedded * shape.d_model * shape.d_vocab)


def _backward_flops(
    shape: ModelShape, tokens: int, context: int, blocks: int, unembedded: int
) -> float:
    """Backward FLOPs without weight gradients: once through the weights, twice through
    attention (queries and keys both need gradients), once through the unembedding."""
    blocks = max(blocks, 0)
    matmuls = 2 * tokens * blocks * shape.block_matmul_parameters
    attention = 8 * tokens * context * blocks * shape.d_attention
    return float(matmuls + attention + 2 * unembedded * shape.d_model * shape.d_vocab)


def _sampling_flops(shape: ModelShape, rows: int, prompt: int, new: int) -> float:
    """FLOPs of sampling ``new`` tokens after ``prompt`` ones with a KV cache: the prompt
    at once, then one token per step, each attending to the cache so far."""
    tokens = rows * (prompt + new - 1)
    attended = rows * (prompt * prompt + (new - 1) * prompt + (new - 1) * new // 2)
    return _pass_flops(shape, tokens, attended, None, tokens)


# --------------------------------------------------------------------------- memory


def _inference_bytes(shape: ModelShape, tokens: int, context: int, dtype: int) -> int:
    """The most a forward pass without gradients holds at once inside a block: the
    residual stream and its norm, then queries, keys, values, scores and probabilities,
    or the MLP's three hidden-width tensors."""
    attention = tokens * (3 * shape.d_attention + 2 * context * shape.n_heads)
    mlp = 3 * tokens * shape.d_mlp
    return dtype * (2 * tokens * shape.d_model + max(attention, mlp))


def _saved_bytes(shape: ModelShape, tokens: int, context: int, blocks: int, dtype: int) -> int:
    """Activations a forward pass keeps for a backward pass through ``blocks`` frozen blocks:
    the norms' inputs, queries, keys and values, the attention probabilities (also in
    float32) and the MLP's activation inputs (three tensors gated, four for GELU's terms)."""
    mlp = (3 if shape.gated_mlp else 4) * shape.d_mlp
    per_token = dtype * (2 * shape.d_model + 3 * shape.d_attention + mlp)
    per_token += (4 + dtype) * shape.n_heads * context
    return tokens * max(blocks, 0) * per_token


def _logit_bytes(shape: ModelShape, rows: int, dtype: int, *, sampled: bool) -> int:
    """Logits of a next-token loss: the logits and the rows counted, their float32
    log-probabilities and gradient, and for sampled labels a float64 CDF over the vocabulary."""
    return rows * shape.d_vocab * (2 * dtype + (20 if sampled else 12))


def _kv_cache_bytes(shape: ModelShape, rows: int, positions: int, dtype: int) -> int:
    return rows * positions * shape.n_layers * 2 * shape.d_key_value * dtype


# --------------------------------------------------------------------------- shared steps


@dataclass(frozen=True)
class _Corpus:
    """A corpus as the passes over it see it."""

    n_sequences: int  # windows (sequences) run
    length: int  # tokens per window, BOS included
    counted: int  # tokens counted (BOS excluded)


def _corpus(shape: ModelShape, s: CostSettings) -> _Corpus:
    assert s.n_tokens is not None and s.sequence_tokens is not None
    n_sequences = math.ceil(s.n_tokens / s.sequence_tokens)
    return _Corpus(n_sequences, s.sequence_tokens + int(shape.prepend_bos), s.n_tokens)


def _sampling_step(shape: ModelShape, corpus: _Corpus, dtype: int) -> Step:
    """Sampling the corpus from the model: one token per step for 64 sequences at a time
    (cached per model; every layer's statistics and the EK-FAC fit read it)."""
    length = corpus.length - int(shape.prepend_bos)
    batch = min(SAMPLING_BATCH_SIZE, corpus.n_sequences)
    batches = math.ceil(corpus.n_sequences / SAMPLING_BATCH_SIZE)
    device = _kv_cache_bytes(shape, batch, length + 1, dtype)
    device += _inference_bytes(shape, batch, length + 1, dtype)
    device += batch * shape.d_vocab * (dtype + 3 * 4)  # logits; float32 copy, softmax, CDF
    return Step(
        "sample the corpus",
        _sampling_flops(shape, corpus.n_sequences, 1, length),
        "model",
        "matmul",
        device,
        host_bytes=corpus.n_sequences * corpus.length * 8,  # the tokens sampled
        block_calls=batches * length * shape.n_layers,
        once=True,
    )


def _context_step(shape: ModelShape, contexts: tuple[tuple[int, int], ...], dtype: int) -> Step:
    """Sampling an editor's context prefixes (top-5), once per model object and settings."""
    prompt = 1 + int(shape.prepend_bos)
    flops = sum(_sampling_flops(shape, count, prompt, length) for length, count in contexts)
    rows = max(count for _, count in contexts)
    longest = max(length for length, _ in contexts)
    device = _kv_cache_bytes(shape, rows, prompt + longest, dtype)
    device += _inference_bytes(shape, rows * prompt, prompt, dtype)
    device += rows * prompt * shape.d_vocab * dtype
    calls = sum(length for length, _ in contexts) * shape.n_layers
    return Step("sample context prefixes", flops, "model", "matmul", device, 0, calls, True)


def _gradient_pass(
    shape: ModelShape,
    sequences: int,
    length: int,
    batch: int,
    lowest: int,
    dtype: int,
    *,
    sampled: bool,
) -> tuple[float, int]:
    """FLOPs and device bytes of ``capture_with_gradients`` over ``sequences``: the whole
    model forward, then back from the logits to the MLP weights' outputs at ``lowest``
    (the blocks above it, and W_out of block ``lowest`` on the way to W_in's output)."""
    tokens = sequences * length
    forward = forward_flops(shape, tokens, context=length, unembedded=tokens)
    backward = _backward_flops(shape, tokens, length, shape.n_layers - lowest - 1, tokens)
    backward += 2 * tokens * shape.d_model * shape.d_mlp
    rows = min(batch, sequences) * length
    held = _saved_bytes(shape, rows, length, shape.n_layers, dtype)
    held += _logit_bytes(shape, rows, dtype, sampled=sampled)
    return forward + backward, held


@dataclass(frozen=True)
class _Weight:
    """One MLP weight influence functions see: its input (bias column included) and output."""

    d_in: int
    d_out: int


def _mlp_weights(shape: ModelShape) -> list[_Weight]:
    """W_in, W_gate (gated MLPs) and W_out of one layer, as influence.weights.mlp_weights."""
    in_bias = int(shape.mlp_bias and not shape.gated_mlp)
    weights = [_Weight(shape.d_model + in_bias, shape.d_mlp)]
    if shape.gated_mlp:
        weights.append(_Weight(shape.d_model, shape.d_mlp))
    weights.append(_Weight(shape.d_mlp + int(shape.mlp_bias), shape.d_model))
    return weights


def _moment_widths(shape: ModelShape) -> list[int]:
    """The hooks whose moments EK-FAC sums in one layer: an input and an output per weight
    (as on a TransformerBridge; a HookedTransformer's W_in and W_gate share their input)."""
    widths = [shape.d_model, shape.d_mlp]
    if shape.gated_mlp:
        widths += [shape.d_model, shape.d_mlp]
    return widths + [shape.d_mlp, shape.d_model]


# --------------------------------------------------------------------------- the pieces


def _key_statistics(shape: ModelShape, s: CostSettings, dtype: int) -> tuple[list[Step], int]:
    """Sample the corpus; run it to the layer 64 sequences at a time; sum k kᵀ; save."""
    assert s.layer is not None and s.batch_size is not None
    f, corpus = shape.d_mlp, _corpus(shape, s)
    steps = [_sampling_step(shape, corpus, dtype)] if s.sampled_corpus else []
    rows = min(s.batch_size, corpus.n_sequences)
    accumulator = (f * f + f) * _SUM_BYTES
    captured = rows * corpus.length * f * dtype
    forward = _inference_bytes(shape, rows * corpus.length, corpus.length, dtype)
    steps.append(
        Step(
            f"forward to layer {s.layer}",
            forward_flops(
                shape, corpus.n_sequences * corpus.length, context=corpus.length, blocks=s.layer + 1
            ),
            "model",
            "matmul",
            accumulator + captured + forward,
            block_calls=math.ceil(corpus.n_sequences / s.batch_size) * (s.layer + 1),
        )
    )
    summed = _accumulator_bytes(s)
    counted = rows * (corpus.length - int(shape.prepend_bos))
    steps.append(
        Step(
            "Σ k kᵀ",
            2.0 * corpus.counted * f * f + corpus.counted * f,
            s.accumulator,
            "matmul",
            accumulator + f * f * summed + captured + counted * f * (dtype + summed),
        )
    )
    saved = (f * f + f) * summed
    steps.append(Step("save the moments", 0.0, "model", "io", accumulator, host_bytes=saved))
    samples = corpus.n_sequences * corpus.length * 8 if s.sampled_corpus else 0
    return steps, saved + samples


def _accumulator_bytes(s: CostSettings) -> int:
    """Bytes of a summed value: float64, or float32 (with its compensation held apart)"""
    return 8 if s.accumulator == "float64" else 4


@dataclass(frozen=True)
class _Requests:
    """Edit requests as the δ optimisation lays them out (the subject starts each prompt)."""

    templates: int  # context templates, "{}" included
    prefix: int  # longest left-padded prefix: the tokens before the subject's last one
    suffix: int  # longest suffix: the subject's last token to the target's second last
    reads: int  # rows of logits read per request: each target token in each context, KL
    key_width: int  # longest context prompt, for the keys


def _requests(shape: ModelShape, s: CostSettings) -> _Requests:
    assert s.context_lengths is not None
    bos = int(shape.prepend_bos)
    context = max((length + 2 for length, _ in s.context_lengths), default=0)  # start, "."
    templates = 1 + sum(count for _, count in s.context_lengths)
    return _Requests(
        templates=templates,
        prefix=bos + context + s.subject_tokens - 1,
        suffix=max(s.prompt_tokens + s.target_tokens - s.subject_tokens, 3),  # KL: "{} is a"
        reads=templates * s.target_tokens + 1,
        key_width=bos + context + s.prompt_tokens,
    )


def _delta_step(
    shape: ModelShape, s: CostSettings, layer: int, requests: int, batch: int, dtype: int
) -> Step:
    """δ's optimisation at ``layer`` for ``requests`` requests, ``batch`` at a time: the
    prefixes into a KV cache and the suffixes up to ``layer`` once per batch, then at each
    step the suffixes from ``layer`` on, the logits read, and back to δ."""
    assert s.v_steps is not None
    r = _requests(shape, s)
    rows = requests * (r.templates + 1)
    context = r.prefix + r.suffix
    setup = forward_flops(shape, rows * r.prefix, context=r.prefix) if r.prefix else 0.0
    setup += forward_flops(shape, rows * r.suffix, context=context, blocks=layer)
    above, reads = shape.n_layers - layer, requests * r.reads
    step = forward_flops(shape, rows * r.suffix, context=context, blocks=above, unembedded=reads)
    step += _backward_flops(shape, rows * r.suffix, context, above - 1, reads)
    in_batch = min(batch, requests)
    batch_rows = in_batch * (r.templates + 1)
    device = _kv_cache_bytes(shape, batch_rows, r.prefix, dtype)
    device += _saved_bytes(shape, batch_rows * r.suffix, context, above, dtype)
    device += in_batch * r.reads * shape.d_vocab * (dtype + 12)  # logits, log-probs, gradients
    batches = math.ceil(requests / batch)
    return Step(
        f"optimise δ at layer {layer} ({s.v_steps:g} steps)",
        setup + s.v_steps * step,
        "model",
        "matmul",
        device,
        block_calls=batches * (shape.n_layers + layer + math.ceil(s.v_steps) * above),
    )


def _key_step(shape: ModelShape, s: CostSettings, layer: int, requests: int, dtype: int) -> Step:
    """Keys at ``layer`` of each request in every context, and on its bare prompt."""
    r = _requests(shape, s)
    bare = int(shape.prepend_bos) + s.prompt_tokens
    rows = requests * r.templates
    flops = forward_flops(shape, rows * r.key_width, context=r.key_width, blocks=layer + 1)
    flops += forward_flops(shape, requests * bare, context=bare, blocks=layer + 1)
    passes = math.ceil(rows / KEY_ROWS_PER_PASS) + math.ceil(requests / KEY_ROWS_PER_PASS)
    chunk = min(rows, KEY_ROWS_PER_PASS) * r.key_width
    device = _inference_bytes(shape, chunk, r.key_width, dtype)
    device += 2 * (rows + requests) * shape.d_mlp * 8  # float64 keys, gathered then averaged
    return Step(
        f"keys at layer {layer}", flops, "model", "matmul", device, block_calls=passes * (layer + 1)
    )


def _read_back_step(shape: ModelShape, s: CostSettings, requests: int, dtype: int) -> Step:
    """``measure_outcomes``: P(new) before and after, P(true) after, the new answer's rank."""
    prompt = int(shape.prepend_bos) + s.prompt_tokens
    width = prompt + s.target_tokens
    flops = 3 * forward_flops(shape, requests * width, context=width)
    flops += forward_flops(shape, requests * prompt, context=prompt)
    flops += 2 * (3 * requests * s.target_tokens + requests) * shape.d_model * shape.d_vocab
    rows = min(requests, OUTCOME_BATCH_SIZE)
    device = _inference_bytes(shape, rows * width, width, dtype) + rows * shape.d_vocab * dtype
    calls = 4 * math.ceil(requests / OUTCOME_BATCH_SIZE) * shape.n_layers
    return Step("read the requests back", flops, "model", "matmul", device, block_calls=calls)


def _rome_edit(shape: ModelShape, s: CostSettings, dtype: int) -> tuple[list[Step], int]:
    """Context prefixes; k*; v* by optimising δ; ΔW from C; the request read back."""
    assert s.layer is not None and s.context_lengths is not None
    f, d = shape.d_mlp, shape.d_model
    c_bytes = f * f * 8
    steps = [_context_step(shape, s.context_lengths, dtype)] if s.context_lengths else []
    steps.append(_key_step(shape, s, s.layer, 1, dtype))
    delta = _delta_step(shape, s, s.layer, 1, 1, dtype)
    steps.append(dataclasses.replace(delta, device_bytes=delta.device_bytes + c_bytes))
    # C's eigenvalues (its condition number), C⁻¹k* and C⁻¹[k* k_bare]; C, its mean,
    # C + ridge·I and an LU factor are held at once
    steps.append(
        Step(
            "solve for ΔW (eigenvalues of C, two LU solves)",
            (_EIGVALSH + 2 * _LU) * f**3 + 9.0 * f * f,
            "float64",
            "lapack",
            4 * c_bytes,
        )
    )
    read = _read_back_step(shape, s, 1, dtype)  # W_out's original is kept to revert the edit
    steps.append(dataclasses.replace(read, device_bytes=read.device_bytes + f * d * dtype))
    return steps, 0


def _memit(shape: ModelShape, s: CostSettings, dtype: int) -> tuple[list[Step], int]:
    """Context prefixes; h and z at the last layer; then for each layer its keys, the
    residual left, and ΔW from λC + KᵀK; the requests read back."""
    assert s.layers and s.n_requests and s.batch_size and s.context_lengths is not None
    f, d, n, m = shape.d_mlp, shape.d_model, s.n_requests, len(s.layers)
    layers, last = s.layers, s.layers[-1]
    bare = int(shape.prepend_bos) + s.prompt_tokens
    targets = 2 * n * d * 8  # h and z, float64
    residual_flops = forward_flops(shape, n * bare, context=bare, blocks=last + 1)
    residual_calls = math.ceil(n / KEY_ROWS_PER_PASS) * (last + 1)
    residual_bytes = _inference_bytes(shape, min(n, KEY_ROWS_PER_PASS) * bare, bare, dtype)
    steps = [_context_step(shape, s.context_lengths, dtype)] if s.context_lengths else []
    steps.append(
        Step(
            f"residuals h at layer {last}", residual_flops, "model", "matmul",
            residual_bytes + targets, block_calls=residual_calls,
        )
    )  # fmt: skip
    delta = _delta_step(shape, s, last, n, s.batch_size, dtype)
    steps.append(dataclasses.replace(delta, device_bytes=delta.device_bytes + targets))
    keys = [_key_step(shape, s, layer, n, dtype) for layer in layers]
    c_bytes, keys_bytes, delta_bytes = f * f * 8, 2 * n * f * 8, f * d * 8
    # Held at the last layer: every layer's C (and its mean, once the layer is solved), the
    # keys and ΔW of the layers before, the weights they replace while applied, h and z.
    held = (2 * m - 1) * c_bytes + (m - 1) * (keys_bytes + delta_bytes + f * d * dtype) + targets
    transient = max(step.device_bytes for step in keys)
    steps.append(
        Step(
            f"keys and residuals at layers {_span(layers)}",
            sum(step.flops for step in keys) + m * residual_flops,
            "model",
            "matmul",
            held + transient + keys_bytes,
            block_calls=sum(step.block_calls for step in keys) + m * residual_calls,
        )
    )
    held += c_bytes + keys_bytes  # this layer's mean of C, and its keys
    steps.append(
        Step(
            "λC + KᵀK and KᵀR",
            m * (2.0 * (2 * n) * f * f + 2.0 * (2 * n) * f * d + 4.0 * f * f),
            "float64",
            "matmul",
            held + 4 * c_bytes + delta_bytes,
        )
    )
    steps.append(
        Step(
            "solve for each ΔW (eigenvalues of C, LU)",
            m * ((_EIGVALSH + _LU) * f**3 + 2.0 * f * f * d),
            "float64",
            "lapack",
            held + 3 * c_bytes + delta_bytes,
        )
    )
    read = _read_back_step(shape, s, n, dtype)  # with every ΔW applied, the originals kept
    extra = m * (f * d * dtype + delta_bytes)
    steps.append(dataclasses.replace(read, device_bytes=read.device_bytes + extra))
    return steps, n * d * 8


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _layer_groups(layers: tuple[int, ...], per_pass: int | None) -> list[tuple[int, ...]]:
    """The layers in groups of ``per_pass`` (None: one group), as influence.factors.layer_passes."""
    size = len(layers) if per_pass is None else per_pass
    return [layers[i : i + size] for i in range(0, len(layers), size)]


def _factor_bytes(weights: Sequence[_Weight]) -> int:
    """The float32 factors of ``weights``: Q_A, Q_S, their eigenvalues, and EK-FAC's Λ."""
    return sum((w.d_in**2 + w.d_out**2 + w.d_in + w.d_out + w.d_in * w.d_out) * 4 for w in weights)


def _ekfac_factors(shape: ModelShape, s: CostSettings, dtype: int) -> tuple[list[Step], int]:
    """Sample the corpus; then for each group of ``layers_per_pass`` layers: sum the
    Kronecker factors' moments, eigendecompose them, refit the eigenvalues from
    per-sequence gradients in a second pass, and (with several groups) move the group's
    factors to the host; save."""
    assert s.layers and s.batch_size is not None
    corpus, groups = _corpus(shape, s), _layer_groups(s.layers, s.layers_per_pass)
    several = len(groups) > 1
    steps = [_sampling_step(shape, corpus, dtype)] if s.sampled_corpus else []
    waiting = 0  # the factors of the groups before, on the host
    for group in groups:
        for step in _ekfac_group(shape, s, corpus, group, dtype, several=several):
            steps.append(dataclasses.replace(step, host_bytes=step.host_bytes + waiting))
        if several:
            waiting += _factor_bytes(_mlp_weights(shape) * len(group))
    factors = _factor_bytes(_mlp_weights(shape) * len(s.layers))
    steps.append(
        Step(
            "save the factors", 0.0, "model", "io", 0 if several else factors,
            host_bytes=waiting + factors,  # and the file's bytes
        )
    )  # fmt: skip
    keys = len(s.layers) * (shape.d_mlp**2 + shape.d_mlp) * _accumulator_bytes(s)  # ROME's C
    samples = corpus.n_sequences * corpus.length * 8 if s.sampled_corpus else 0
    return steps, factors + keys + samples


def _ekfac_group(
    shape: ModelShape,
    s: CostSettings,
    corpus: _Corpus,
    group: tuple[int, ...],
    dtype: int,
    *,
    several: bool,
) -> list[Step]:
    """One group's fit: its moments pass (the whole model forward, back to the group's
    lowest layer), Σ x xᵀ, the eigendecompositions, and its EK-FAC pass. The moments are
    dropped before the second pass; only this group's factors are on the device."""
    assert s.batch_size is not None
    weights = _mlp_weights(shape) * len(group)
    widths = _moment_widths(shape) * len(group)
    moments = sum((w * w + w) * _SUM_BYTES for w in widths)
    vectors = sum((w.d_in**2 + w.d_out**2 + w.d_in + w.d_out) * 4 for w in weights)
    squares = sum(w.d_in * w.d_out * 4 for w in weights)
    pass_flops, pass_bytes = _gradient_pass(
        shape, corpus.n_sequences, corpus.length, s.batch_size, group[0], dtype, sampled=True
    )
    rows = min(s.batch_size, corpus.n_sequences) * corpus.length
    captured = rows * sum(widths) * dtype
    calls = math.ceil(corpus.n_sequences / s.batch_size) * shape.n_layers
    summed = _accumulator_bytes(s)
    largest = max(max(w.d_in, w.d_out) for w in weights)
    # every weight's masked ā and g of a batch, and one weight's rotated copies
    rotated = rows * (sum(w.d_in + w.d_out for w in weights) + largest * 2) * 4

    def named(name: str, last: str = "") -> str:
        return f"{name}, layers {_listed(group)}{last}" if several else f"{name}{last}"

    return [
        Step(
            named("moments pass", " (forward + backward)"), pass_flops, "model", "matmul",
            pass_bytes + moments + captured, block_calls=calls,
        ),
        Step(
            named("Σ x xᵀ of inputs and gradients"),
            2.0 * corpus.counted * sum(w * w for w in widths), s.accumulator, "matmul",
            moments + captured + max(widths) ** 2 * summed + rows * max(widths) * summed,
        ),
        Step(
            named("eigendecompositions"),
            float(sum(_EIGH * (w.d_in**3 + w.d_out**3) for w in weights)), "float64", "lapack",
            moments + vectors + 4 * largest**2 * 8,
        ),
        Step(
            named("EK-FAC pass", " (forward + backward)"), pass_flops, "model", "matmul",
            pass_bytes + vectors + squares + captured, block_calls=calls,
        ),
        Step(
            named("rotate and square per-sequence gradients"),
            sum(
                2.0 * corpus.n_sequences * corpus.length * (w.d_in**2 + w.d_out**2)
                + (2.0 * corpus.length + 2) * corpus.n_sequences * w.d_in * w.d_out
                for w in weights
            ),
            "float32", "matmul",
            vectors + squares + rotated + max(w.d_in * w.d_out for w in weights) * 4,
        ),
    ]  # fmt: skip


def _listed(layers: Sequence[int]) -> str:
    """``3-6`` for consecutive layers, else ``0, 2``."""
    consecutive = list(layers) == list(range(layers[0], layers[-1] + 1))
    return _span(layers) if consecutive else ", ".join(map(str, layers))


@dataclass(frozen=True)
class _Texts:
    """The scanned corpus as the passes see it: each text cut into windows of n_ctx."""

    windows: int  # windows in all
    per_text: int  # windows per text
    length: int  # tokens per window, BOS included


def _texts(shape: ModelShape, s: CostSettings) -> _Texts:
    bos = int(shape.prepend_bos)
    window = shape.n_ctx - bos
    per_text = math.ceil(s.document_tokens / window)
    return _Texts(s.n_documents * per_text, per_text, min(s.document_tokens, window) + bos)


def _scan(shape: ModelShape, s: CostSettings, dtype: int) -> tuple[list[Step], int]:
    """Each query's gradient, preconditioned by EK-FAC one weight at a time (its factors
    brought from the host and dropped); every text's gradient pass and its dot products
    with the queries; the top texts again, token by token. The factors wait on the host,
    the dense preconditioned queries of every weight stay on the device."""
    assert s.layers and s.batch_size is not None and s.top_k is not None
    q, lowest, texts = s.n_queries, s.layers[0], _texts(shape, s)
    weights = _mlp_weights(shape) * len(s.layers)
    factors = _factor_bytes(weights)  # on the host
    one = max((w.d_in**2 + w.d_out**2 + w.d_in * w.d_out) * 4 for w in weights)  # Q_A, Q_S, Λ
    queries = q * sum(w.d_in * w.d_out * 4 for w in weights)  # gradients, then P
    largest = max(w.d_in * w.d_out for w in weights)
    query_length = int(shape.prepend_bos) + s.query_tokens
    query_flops, query_bytes = _gradient_pass(
        shape, q, query_length, q, lowest, dtype, sampled=False
    )
    scan_flops, scan_bytes = _gradient_pass(
        shape, texts.windows, texts.length, s.batch_size, lowest, dtype, sampled=False
    )
    rows = min(s.batch_size, texts.windows)
    activations = rows * texts.length * sum(w.d_in + w.d_out for w in weights) * 4  # ā and g
    widest = rows * texts.length * max(w.d_in + w.d_out for w in weights)
    grams = 2 * rows * texts.length**2 * 8  # ā āᵀ and g gᵀ of each text, float64
    top = min(s.top_k, s.n_documents) * texts.per_text
    top_flops, top_bytes = _gradient_pass(shape, top, texts.length, 1, lowest, dtype, sampled=False)
    if texts.length * q <= TOKEN_FORM_LIMIT:  # Σ_t g_tᵀ Pᵀ ā_t, token by token
        dots = sum(2.0 * texts.windows * texts.length * q * w.d_out * (w.d_in + 1) for w in weights)
        transient = rows * texts.length * q * max(w.d_out for w in weights) * 4
    else:  # each text's gradient Σ_t ā_t g_tᵀ, dotted with every P
        dots = sum(2.0 * texts.windows * w.d_in * w.d_out * (texts.length + q) for w in weights)
        transient = rows * largest * 4
    norms = sum(2.0 * texts.windows * texts.length**2 * (w.d_in + w.d_out + 1) for w in weights)
    held = queries + texts.windows * (q * len(s.layers) + 1) * 8  # and the float64 scores
    # preconditioning one weight: its factors, brought to the device (the host counts the
    # others: on the CPU the move copies nothing), its gradient's rotations, their quotient
    # by the damped Λ, and the products back
    precondition = queries + one + (4 * q + 1) * largest * 4
    steps = [
        Step(
            "query gradients (forward + backward)", query_flops, "model", "matmul",
            query_bytes + queries, factors, block_calls=shape.n_layers,
        ),
        Step(
            "query gradients' outer products",
            sum(2.0 * q * query_length * w.d_in * w.d_out for w in weights),
            "float32", "matmul", queries, factors,
        ),
        Step(
            "precondition the queries (EK-FAC)",
            sum(4.0 * q * w.d_in * w.d_out * (w.d_in + w.d_out) for w in weights),
            "float32", "matmul", precondition, factors - one,
        ),
        Step(
            "scan the texts (forward + backward)", scan_flops, "model", "matmul",
            scan_bytes + held, factors,
            block_calls=math.ceil(texts.windows / s.batch_size) * shape.n_layers,
        ),
        Step(
            "dot products with P", dots, "float32", "matmul", held + activations + transient,
            factors,
        ),
        Step(
            "texts' gradient norms", norms, "float64", "matmul",
            held + activations + widest * 8 + grams, factors,
        ),
        Step(
            "top texts again (forward + backward)", top_flops, "model", "matmul",
            top_bytes + queries, factors, block_calls=top * shape.n_layers,
        ),
        Step(
            "token scores of the top texts",
            sum(2.0 * top * texts.length * w.d_out * (w.d_in + 1) for w in weights),
            "float32", "matmul", queries, factors,
        ),
    ]  # fmt: skip
    return steps, 0


_PIECES = {
    "key_statistics": _key_statistics,
    "rome_edit": _rome_edit,
    "memit": _memit,
    "memit_1000": _memit,
    "memit_10000": _memit,
    "ekfac_factors": _ekfac_factors,
    "scan": _scan,
}
_MEMIT_REQUESTS = {"memit": 1_000, "memit_1000": 1_000, "memit_10000": 10_000}

# --------------------------------------------------------------------------- entry point


def estimate_cost(model_or_config: Model | ModelShape | str, work: str, **sizes: Any) -> Cost:
    """FLOPs, peak memory and disk of a piece of rome_lens on a model, from its shape alone.

    Args:
        model_or_config: a TransformerLens model (``HookedTransformer`` or
            ``TransformerBridge``), a :class:`ModelShape`, or a built-in shape's name
            ("gpt2-xl", "gpt-j-6b", "llama-3-8b", "smollm2-135m").
        work: the piece, one of :data:`WORKS`: "key_statistics", "rome_edit", "memit",
            "memit_1000", "memit_10000", "ekfac_factors" or "scan".
        **sizes: overrides of :class:`CostSettings`' fields (``n_tokens``, ``n_requests``,
            ``batch_size``, ``layer``, ``layers``, ``layers_per_pass``, ``dtype``, ...); the
            rest are rome_lens's defaults for the piece.

    Returns:
        The :class:`Cost`, step by step.

    Raises:
        ValueError: an unknown work, size or dtype, or a layer outside the model.
    """
    if work not in _PIECES:
        raise ValueError(f"unknown work {work!r}: choose one of {', '.join(WORKS)}")
    shape = model_shape(model_or_config)
    settings = _settings(shape, work, sizes)
    dtype = _dtype_bytes(settings.dtype)
    shape = dataclasses.replace(shape, dtype_bytes=dtype)
    steps, persisted = _PIECES[work](shape, settings, dtype)
    return Cost.of(work, shape, steps, persisted, settings)


def largest_layers_per_pass(
    model_or_config: Model | ModelShape | str, bytes_available: float = GPU_BYTES, **sizes: Any
) -> int:
    """The most layers an EK-FAC fit can sum per pass over the corpus and still fit the device.

    Pass it to ``fit_influence_factors(layers_per_pass=)``, which then makes
    ``ceil(len(layers) / it)`` passes; each pass's device memory is that of a fit of
    its layers alone.

    Args:
        model_or_config: a model, a :class:`ModelShape` or a built-in shape's name.
        bytes_available: the device's memory, weights included (default: one 80 GB GPU).
        **sizes: the fit's other sizes (``dtype``, ``layers``, ``batch_size``, ...), as for
            :func:`estimate_cost`.

    Returns:
        The largest ``layers_per_pass`` whose ``"ekfac_factors"`` :class:`Cost` fits.

    Raises:
        ValueError: not even one layer per pass fits, or ``sizes`` sets ``layers_per_pass``.
    """
    if "layers_per_pass" in sizes:
        raise ValueError("largest_layers_per_pass finds layers_per_pass: do not pass it")
    shape = model_shape(model_or_config)
    layers = estimate_cost(shape, "ekfac_factors", **sizes).settings.layers or ()
    fitting = 0
    for per_pass in range(1, len(layers) + 1):  # a pass's memory grows with its layers
        if not estimate_cost(shape, "ekfac_factors", layers_per_pass=per_pass, **sizes).fits(
            bytes_available
        ):
            break
        fitting = per_pass
    if not fitting:
        raise ValueError(
            f"not even one layer per pass fits {bytes_available / 1e9:.3g} GB: "
            "try a smaller batch_size or dtype"
        )
    return fitting


def automatic_layers_per_pass(
    model_or_config: Model | ModelShape | str, bytes_available: float = GPU_BYTES, **sizes: Any
) -> int:
    """The layers per pass ``fit_influence_factors(layers_per_pass=None)`` picks on a device.

    It sums as many layers' moments per pass as fit half the device's free memory,
    at least one (``influence.factors.layer_passes``); here the free memory is
    ``bytes_available`` less the weights.

    Args:
        model_or_config: a model, a :class:`ModelShape` or a built-in shape's name.
        bytes_available: the device's memory, weights included (default: one 80 GB GPU).
        **sizes: the fit's other sizes (``dtype``, ``layers``, ...), as for
            :func:`estimate_cost`.

    Returns:
        The group size, at most the number of layers fitted; give it to
        :func:`estimate_cost` as ``layers_per_pass=`` to cost the fit as it runs.
    """
    shape = model_shape(model_or_config)
    fit = estimate_cost(shape, "ekfac_factors", **sizes)
    layers = fit.settings.layers or ()
    one_layer = sum((w * w + w) * _SUM_BYTES for w in _moment_widths(shape))
    free = bytes_available - fit.weights_bytes
    return max(1, min(len(layers), int(free // 2 // one_layer)))


def _settings(shape: ModelShape, work: str, sizes: dict[str, Any]) -> CostSettings:
    """The sizes given, checked, with the piece's defaults for the rest."""
    known = {field.name for field in dataclasses.fields(CostSettings)}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(
            f"unknown size {unknown[0]!r} for estimate_cost: choose from {', '.join(sorted(known))}"
        )
    given = dict(sizes)
    if given.get("layers") is not None:
        given["layers"] = tuple(sorted(set(given["layers"])))
    if given.get("context_lengths") is not None:
        given["context_lengths"] = tuple(tuple(pair) for pair in given["context_lengths"])
    s = CostSettings(**given)
    if s.accumulator not in ("float64", "float32"):
        raise ValueError(f"accumulator must be 'float64' or 'float32', got {s.accumulator!r}")
    if s.layers_per_pass is not None and s.layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {s.layers_per_pass}")
    layer = (
        default_layers_for("rome", shape.name, shape.n_layers)[0] if s.layer is None else s.layer
    )
    layers = s.layers or _default_layers(shape, work)
    for checked in (layer, *layers):
        if not 0 <= checked < shape.n_layers:
            raise ValueError(f"layer {checked} is outside the model's {shape.n_layers} layers")
    window = min(SAMPLE_LENGTH, shape.n_ctx - 1)
    if not s.sampled_corpus:
        window = min(DEFAULT_MAX_LENGTH, shape.n_ctx) - int(shape.prepend_bos)
    return dataclasses.replace(
        s,
        layer=layer,
        layers=layers,
        n_tokens=s.n_tokens or (EKFAC_N_TOKENS if work == "ekfac_factors" else KEY_STATS_N_TOKENS),
        batch_size=s.batch_size or _default_batch_size(work),
        sequence_tokens=s.sequence_tokens or window,
        n_requests=s.n_requests or _MEMIT_REQUESTS.get(work, 1),
        v_steps=V_STEPS if s.v_steps is None else s.v_steps,
        context_lengths=_default_contexts(work) if s.context_lengths is None else s.context_lengths,
        top_k=SCAN_TOP_K if s.top_k is None else s.top_k,
        dtype=_dtype_name(shape.dtype_bytes) if s.dtype is None else _checked_dtype(s.dtype),
    )


def _default_layers(shape: ModelShape, work: str) -> tuple[int, ...]:
    """MEMIT's default layers, or every layer for influence functions."""
    if not work.startswith("memit"):
        return tuple(range(shape.n_layers))
    return tuple(default_layers_for("memit", shape.name, shape.n_layers))


def _default_batch_size(work: str) -> int:
    if work.startswith("memit"):
        return MEMIT_REQUESTS_PER_BATCH
    return {"ekfac_factors": EKFAC_BATCH_SIZE, "scan": SCAN_BATCH_SIZE}.get(
        work, KEY_STATS_BATCH_SIZE
    )


def _default_contexts(work: str) -> tuple[tuple[int, int], ...]:
    return MEMIT_CONTEXTS if work.startswith("memit") else ROME_CONTEXTS


def _dtype_name(n_bytes: int) -> str:
    """The name of a dtype of ``n_bytes`` bytes (2: bfloat16, whose size float16 shares)"""
    names = {size: name for name, size in reversed(_DTYPE_BYTES.items())}
    if n_bytes not in names:
        raise ValueError(f"no floating-point dtype has {n_bytes} bytes")
    return names[n_bytes]


def _checked_dtype(dtype: object) -> str:
    """The name of ``dtype``, a name such as "bfloat16" or a torch dtype, once checked."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(_DTYPE_BYTES)}")
    return name


def _dtype_bytes(dtype: object) -> int:
    """Bytes per element of ``dtype``: a name such as "bfloat16", or a torch dtype."""
    return _DTYPE_BYTES[_checked_dtype(dtype)]
