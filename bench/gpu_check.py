"""GPU check: every heavy piece of rome_lens on a device and dtype, against the CPU in float32.

    make gpu-check                                         # python bench/gpu_check.py
    python bench/gpu_check.py                              # CUDA, float32 and bfloat16
    python bench/gpu_check.py --device cpu --model tiny    # the test command's run, < 1 min
    python bench/gpu_check.py --pieces rome,memit --reference bench/results/ref.safetensors

Each piece runs first on the CPU in float32 (the reference), then with the model
moved to ``--device`` and cast to each of ``--dtypes`` (``model.to(...)``, from
the float32 weights each time), with the same seeds and the same text:

* ``trace``: ``trace_fact`` on the demo fact ("The Eiffel Tower is located in
  the city of", answer "Paris"): every restored probability;
* ``sample``: 16 seeded top-5 continuations of "The" (how ROME samples its
  context prefixes): the share of sequences that differ;
* ``key_stats``: the key statistics C of ROME's layer;
* ``rome``: the demo edit (→ "Rome"): its ΔW, P(new) on the edited model,
  whether it took where the reference took, and that ``apply``/``revert``
  gives back every parameter bit for bit;
* ``memit``, ``alphaedit``: one batch of ``--requests`` CounterFact requests
  (the sample shipped with rome_lens; AlphaEdit reads the targets z MEMIT cached
  when both run): ΔW of every layer and each request's P(new);
* ``factors``, ``scan``: EK-FAC factors of a few MLP layers (the eigenvalues of
  both Kronecker factors, and the corrected ones as a sorted spectrum), fitted
  with empirical labels, then an influence scan of CounterFact texts for the
  demo fact (every text's score);
* ``linearity``, ``nonlinearity``, ``contextualization``, ``predictions``: the
  LLM-Microscope metrics (layer linearity on the corpus, then token
  nonlinearity, contextualization and the logit lens's losses on one text).

No compared result depends on what a model samples. The corpus (key
statistics, factors, linear maps, the context adapter) is the CounterFact
sample's prompts, one document per case. The editors' context prefixes are
sampled once, from the CPU float32 model, before any piece: rome_lens samples
them once per model object, and the check moves that one object through every
setting, so every edit averages over the reference's contexts.

For each piece and setting it prints the wall time (synchronised on CUDA), the
peak memory (on CUDA the peak allocated by torch; on the CPU the process's peak
resident memory, VmHWM, reset before each piece), and the difference from the
reference for each quantity, measured as :data:`TOLERANCES` says (the reasons
are beside it). It exits 1 when a difference is beyond its tolerance or a piece
raised (each is caught, its traceback printed, and the rest go on), and 2 when
``--device`` is not there.

Every setting computes into its own folder of ``--cache-dir`` (default: a new
temporary folder), so none reads what another computed. ``--reference FILE``
keeps the CPU results between runs: loaded when the file matches the model and
the plan, else computed and written there. The table goes to ``--out`` as CSV
(default: ``bench/results/gpu_check_<device>_<model>.csv``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tables import peak_mib, reset_peak
from torch import Tensor

import rome_lens
from rome_lens.analysis import (
    ContextHyperParams,
    contextualization,
    fit_linear_maps,
    intermediate_predictions,
    token_nonlinearity,
    train_context_adapter,
)
from rome_lens.core.backend import Model
from rome_lens.core.generation import sample_tokens
from rome_lens.editing import (
    AlphaEditHyperParams,
    EditMissWarning,
    EditRequest,
    MEMITHyperParams,
    ROMEHyperParams,
    context_templates,
    default_layer,
    get_editor,
    rome_edit,
)
from rome_lens.evaluation import load_counterfact_sample, without_conflicts
from rome_lens.influence import fit_influence_factors, influence
from rome_lens.stats import KeyStats, key_second_moment
from rome_lens.tracing import UnreliableTraceWarning, trace_fact

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
SAMPLED_SEQUENCES = 16  # the "sample" piece: continuations of "The", top-5, as ROME's contexts
SAMPLED_TOKENS = 10

# The demo fact of `rome-lens demo` (rome_lens/cli.py), with its answer named so that
# every setting scores the same token.
DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_SUBJECT = "The Eiffel Tower"
DEMO_TRUE = "Paris"
DEMO_NEW = "Rome"
DEMO_REQUEST = EditRequest(
    DEMO_PROMPT.replace(DEMO_SUBJECT, "{}"), DEMO_SUBJECT, DEMO_NEW, DEMO_TRUE
)

# The text the per-token Microscope metrics read (118 tokens on the default model).
MICROSCOPE_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
    "France. It is named after the engineer Gustave Eiffel, whose company designed and "
    "built the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was built as "
    "the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of "
    "the French Revolution. It was criticised by some of France's leading artists and "
    "intellectuals for its design, but it has since become a global cultural icon of France."
)

# quantity: (measure, {dtype: tolerance}); each measure is defined in MEASURES below.
# Why these numbers:
# * float32 on another device changes only the order of the sums (blocked matrix
#   products, atomics): ~1e-7 relative per operation, ~1e-6 after 30 layers, so 1e-4
#   relative (probabilities: 1e-4 absolute) for what is computed in one pass. What is
#   optimised, solved or eigendecomposed (an edit's 20 Adam steps, a context adapter's
#   training, eigenvectors of near-equal eigenvalues, which eigh on another device
#   picks differently) gets 1e-3. A sampled sequence flips only where a uniform draw
#   falls within ~1e-6 of a boundary of the top-5 CDF: 1 sequence in 16 at most.
# * bfloat16 keeps 8 bits of mantissa: each weight and activation is rounded by up to
#   2^-9 ≈ 2e-3, and 30 layers compound it to a few 1e-2 relative on activations,
#   hence on what is summed from them (key statistics, linear maps, lens losses) and
#   on probabilities (absolute): 5e-2. The factors' eigenvalues (squared gradients
#   through every layer) get 0.1. What is optimised or solved through the model moves
#   more: an edit's ΔW (20 Adam steps, which may stop one step sooner or later), a
#   trained context adapter, influence scores (gradients divided by small
#   eigenvalues): 0.25; each edit's P(new) by up to 0.1 (mean over MEMIT's requests:
#   5e-2). Sampled text is not compared in bfloat16 (tolerance 1: any share of the
#   sequences may differ): a 1% change in the top-5 probabilities moves every draw near
#   a boundary, and the sequence differs from there on; the piece checks that sampling
#   runs. A ROME edit that took in float32 must take in bfloat16 ("rome took"); in
#   every dtype, apply changes exactly one parameter ("rome applied": 1 if not) and
#   revert restores all bit for bit ("rome revert": parameters not restored).
# float16 (not run by default) gets bfloat16's tolerances: 3 more bits of mantissa,
# but a narrower range.
EXACT = {"float32": 0.0, "bfloat16": 0.0}
TOLERANCES: dict[str, tuple[str, dict[str, float]]] = {
    "trace p": ("max abs", {"float32": 1e-4, "bfloat16": 5e-2}),
    "sampled text": ("rows differ", {"float32": 1 / SAMPLED_SEQUENCES, "bfloat16": 1.0}),
    "key stats C": ("relative", {"float32": 1e-4, "bfloat16": 5e-2}),
    "rome ΔW": ("relative", {"float32": 1e-3, "bfloat16": 0.25}),
    "rome p(new)": ("max abs", {"float32": 1e-4, "bfloat16": 0.1}),
    "rome took": ("lost", dict(EXACT)),
    "rome applied": ("count", dict(EXACT)),
    "rome revert": ("count", dict(EXACT)),
    "memit ΔW": ("relative", {"float32": 1e-3, "bfloat16": 0.25}),
    "memit p(new)": ("mean abs", {"float32": 1e-4, "bfloat16": 5e-2}),
    "alphaedit ΔW": ("relative", {"float32": 1e-3, "bfloat16": 0.25}),
    "alphaedit p(new)": ("mean abs", {"float32": 1e-4, "bfloat16": 5e-2}),
    "factor eigenvalues": ("relative", {"float32": 1e-3, "bfloat16": 0.1}),
    "scan scores": ("relative", {"float32": 1e-3, "bfloat16": 0.25}),
    "layer linearity": ("max abs", {"float32": 1e-4, "bfloat16": 5e-2}),
    "token nonlinearity": ("relative", {"float32": 1e-4, "bfloat16": 5e-2}),
    "contextualization": ("relative", {"float32": 1e-3, "bfloat16": 0.25}),
    "predictions loss": ("relative", {"float32": 1e-4, "bfloat16": 5e-2}),
}
for _measure, _by_dtype in TOLERANCES.values():
    _by_dtype.setdefault("float16", _by_dtype["bfloat16"])

Outputs = dict[str, dict[str, Tensor]]  # quantity -> named parts (compared together)


@dataclass(frozen=True)
class Plan:
    """How much work each piece does: the default model's workload, or a small one."""

    requests: int
    """MEMIT's and AlphaEdit's batch."""
    stats_tokens: int
    """Tokens of the key statistics (so of the edits' C too)."""
    factor_layers: tuple[int, ...]
    """MLP layers of the influence factors."""
    factor_tokens: int
    """Tokens the factors average over."""
    scan_texts: int
    """CounterFact documents the influence scan scores."""
    reference_tokens: int
    """Tokens of the Microscope's linear maps (at least 2 × d_model)."""
    context: ContextHyperParams = field(default_factory=ContextHyperParams)
    """The contextualization adapter."""
    trace_samples: int = 10
    """Noise draws of the causal trace."""


def default_plan(requests: int) -> Plan:
    """The default model (SmolLM2-135M, 30 layers): the library's defaults, fewer tokens."""
    return Plan(
        requests=requests,
        stats_tokens=10_000,
        factor_layers=(3, 4, 5),
        factor_tokens=4_000,
        scan_texts=300,
        reference_tokens=5_000,
        context=ContextHyperParams(n_tokens=4_096),
    )


# A random model answers nothing, so a few requests exercise MEMIT as well as a hundred.
TINY_REQUESTS = 8


def tiny_plan(requests: int) -> Plan:
    """The tiny model (3 layers, d_model 64): each piece in a second or two."""
    return Plan(
        requests=min(requests, TINY_REQUESTS),
        stats_tokens=2_000,
        factor_layers=(1, 2),
        factor_tokens=1_000,
        scan_texts=40,
        reference_tokens=1_000,
        context=ContextHyperParams(prefix_length=4, steps=30, n_tokens=1_000),
        trace_samples=4,
    )


@dataclass
class Setting:
    """One model on one device in one dtype, with what its pieces share."""

    model: Model
    device: torch.device
    dtype: torch.dtype
    plan: Plan
    corpus: tuple[str, ...]
    requests: list[EditRequest]
    cache_dir: Path
    reference: bool = False
    """The CPU float32 run the others are compared with."""
    shared: dict[str, object] = field(default_factory=dict)
    """Results later pieces reuse (key statistics, factors, linear maps)."""

    @property
    def name(self) -> str:
        return f"{self.device.type} {dtype_label(self.dtype)}{' (reference)' * self.reference}"

    def key_stats(self, layer: int) -> KeyStats:
        """The key statistics of ``layer`` over the corpus, computed once per setting."""
        key = f"key stats {layer}"
        if key not in self.shared:
            self.shared[key] = key_second_moment(
                self.model, layer, corpus=self.corpus, n_tokens=self.plan.stats_tokens,
                seed=SEED, cache_dir=self.cache_dir, progress=False,
            )  # fmt: skip
        stats = self.shared[key]
        assert isinstance(stats, KeyStats)
        return stats

    def needs(self, key: str) -> object:
        """What an earlier piece left in :attr:`shared`, or an error naming that piece."""
        if key not in self.shared:
            raise RuntimeError(
                f"needs the result of the {key!r} piece, which did not run or failed"
            )
        return self.shared[key]


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def one(tensor: Tensor) -> dict[str, Tensor]:
    return {"": tensor}


# ---------------------------------------------------------------- pieces


def run_trace(setting: Setting) -> Outputs:
    trace = trace_fact(
        setting.model, DEMO_PROMPT, DEMO_SUBJECT, target=DEMO_TRUE,
        samples=setting.plan.trace_samples, seed=SEED, progress=False,
    )  # fmt: skip
    ends = torch.tensor([trace.clean_prob, trace.corrupted_prob])
    return {"trace p": {"scores": trace.scores, "clean and corrupted": ends}}


def run_sample(setting: Setting) -> Outputs:
    prompts = setting.model.to_tokens(["The"] * SAMPLED_SEQUENCES)
    generator = torch.Generator().manual_seed(SEED)
    tokens = sample_tokens(setting.model, prompts, SAMPLED_TOKENS, generator=generator, top_k=5)
    return {"sampled text": one(tokens)}


def run_key_stats(setting: Setting) -> Outputs:
    stats = setting.key_stats(default_layer(setting.model))
    return {"key stats C": one(stats.moment)}


def run_rome(setting: Setting) -> Outputs:
    model = setting.model
    layer = default_layer(model)
    edit = rome_edit(
        model, DEMO_REQUEST, layer=layer, stats=setting.key_stats(layer),
        cache_dir=setting.cache_dir, progress=False,
    )  # fmt: skip
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    applied = edit.apply(model)
    unchanged = [
        name for name, param in model.named_parameters() if torch.equal(param, before[name])
    ]
    applied.revert()
    not_restored = [
        name for name, param in model.named_parameters() if not torch.equal(param, before[name])
    ]
    if not_restored:
        print(f"  {setting.name}: revert left {not_restored} changed", file=sys.stderr)
    return {
        "rome ΔW": one(edit.deltas()[edit.parameter]),
        "rome p(new)": one(torch.tensor([edit.outcomes[0].p_new])),
        "rome took": one(torch.tensor([float(edit.took)])),
        # the edit changes exactly one parameter, and revert puts every one back
        "rome applied": one(torch.tensor([float(len(before) - len(unchanged) != 1)])),
        "rome revert": one(torch.tensor([float(len(not_restored))])),
    }


def run_multilayer(setting: Setting, method: str) -> Outputs:
    """A batch of MEMIT or AlphaEdit over the editor's default layers."""
    editor = get_editor(method)
    layers = editor.default_layers(setting.model)
    edit = editor.edit(
        setting.model, setting.requests, layers=layers,
        stats={layer: setting.key_stats(layer) for layer in layers},
        cache_dir=setting.cache_dir, progress=False,
    )  # fmt: skip
    return edit_outputs(method, edit.deltas(), edit.outcomes)


def edit_outputs(method: str, deltas: dict[str, Tensor], outcomes: list) -> Outputs:
    return {
        f"{method} ΔW": one(torch.cat([delta.flatten() for delta in deltas.values()])),
        f"{method} p(new)": one(torch.tensor([outcome.p_new for outcome in outcomes])),
    }


def run_factors(setting: Setting) -> Outputs:
    # Empirical labels (the corpus's next tokens): labels the model samples (the true
    # Fisher, the default) change with its dtype, and the difference would measure that.
    factors = fit_influence_factors(
        setting.model, setting.corpus, layers=list(setting.plan.factor_layers),
        n_tokens=setting.plan.factor_tokens, fisher="empirical", seed=SEED,
        cache_dir=setting.cache_dir, progress=False,
    )  # fmt: skip
    setting.shared["factors"] = factors
    parts = {}
    for name in factors.names:
        parts[f"{name} A"] = factors.input_values[name]
        parts[f"{name} S"] = factors.output_values[name]
        if name in factors.eigen_lambda:  # measured in the eigenbases: compared as a spectrum
            parts[f"{name} Λ"] = factors.eigen_lambda[name].flatten().sort().values
    return {"factor eigenvalues": parts}


def run_scan(setting: Setting) -> Outputs:
    factors = setting.needs("factors")
    texts = list(setting.corpus[: setting.plan.scan_texts])
    result = influence(
        setting.model, factors, DEMO_PROMPT, DEMO_TRUE, texts, top_k=5, progress=False
    )
    return {"scan scores": one(result.all_scores)}


def run_linearity(setting: Setting) -> Outputs:
    maps = fit_linear_maps(
        setting.model, setting.corpus, n_tokens=setting.plan.reference_tokens, seed=SEED,
        cache_dir=setting.cache_dir, progress=False,
    )  # fmt: skip
    setting.shared["linearity"] = maps
    scores = maps.layer_linearity()
    return {
        "layer linearity": {
            "with residual": scores.linearity,
            "without residual": scores.linearity_without_residual,
        }
    }


def run_nonlinearity(setting: Setting) -> Outputs:
    maps = setting.needs("linearity")
    found = token_nonlinearity(setting.model, MICROSCOPE_TEXT, maps=maps, progress=False)
    return {"token nonlinearity": one(found.errors)}


def run_contextualization(setting: Setting) -> Outputs:
    adapter = train_context_adapter(
        setting.model, setting.corpus, hparams=setting.plan.context,
        cache_dir=setting.cache_dir, progress=False,
    )  # fmt: skip
    found = contextualization(setting.model, MICROSCOPE_TEXT, adapter, progress=False)
    return {"contextualization": {"scores": found.scores, "depth weights": found.depth_weights}}


def run_predictions(setting: Setting) -> Outputs:
    found = intermediate_predictions(setting.model, MICROSCOPE_TEXT, progress=False)
    return {"predictions loss": one(found.losses)}


PIECES: dict[str, Callable[[Setting], Outputs]] = {
    "trace": run_trace,
    "sample": run_sample,
    "key_stats": run_key_stats,
    "rome": run_rome,
    "memit": functools.partial(run_multilayer, method="memit"),
    "alphaedit": functools.partial(run_multilayer, method="alphaedit"),
    "factors": run_factors,
    "scan": run_scan,
    "linearity": run_linearity,
    "nonlinearity": run_nonlinearity,
    "contextualization": run_contextualization,
    "predictions": run_predictions,
}
NEEDS = {"scan": "factors", "nonlinearity": "linearity"}  # pieces that read another's result

# ---------------------------------------------------------------- measuring


@dataclass
class Run:
    """One piece in one setting: its outputs (on the CPU, float64), time, memory, error."""

    piece: str
    setting: str
    outputs: Outputs
    seconds: float = math.nan
    peak_mib: float = math.nan
    error: str = ""


def run_piece(piece: str, setting: Setting) -> Run:
    """Run ``piece`` in ``setting``, timed and with its peak memory, catching any error."""
    torch.manual_seed(SEED)
    start_window(setting.device)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():  # a random model knows no fact and takes few edits
            warnings.simplefilter("ignore", UnreliableTraceWarning)
            warnings.simplefilter("ignore", EditMissWarning)
            outputs = PIECES[piece](setting)
        synchronize(setting.device)
    except Exception as err:  # reported per piece; the others still run
        print(f"\n{piece} failed in {setting.name}:", file=sys.stderr)
        traceback.print_exc()
        return Run(piece, setting.name, {}, error=f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - started
    return Run(piece, setting.name, to_host(outputs), seconds, window_peak_mib(setting.device))


def to_host(outputs: Outputs) -> Outputs:
    return {
        quantity: {part: t.detach().to("cpu", torch.float64) for part, t in parts.items()}
        for quantity, parts in outputs.items()
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_window(device: torch.device) -> None:
    """Start a new peak-memory window (and let the previous piece's work finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak()


def window_peak_mib(device: torch.device) -> float:
    """Peak memory since :func:`start_window`: allocated on CUDA, resident (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float(peak_mib())


def relative(found: Tensor, reference: Tensor) -> float:
    """‖found − reference‖ / ‖reference‖ over the finite entries (inf if nan/inf differ)."""
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(found)):
        return math.inf
    scale = float(reference[finite].norm())
    gap = float((found[finite] - reference[finite]).norm())
    return gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)


def absolute(found: Tensor, reference: Tensor, reduce: Callable[[Tensor], Tensor]) -> float:
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(found)):
        return math.inf
    gaps = (found[finite] - reference[finite]).abs()
    return float(reduce(gaps)) if len(gaps) else 0.0


MEASURES: dict[str, Callable[[Tensor, Tensor], float]] = {
    "relative": relative,
    "max abs": lambda found, reference: absolute(found, reference, torch.max),
    "mean abs": lambda found, reference: absolute(found, reference, torch.mean),
    # a flag (1.0: yes) set in the reference and lost here: 1, else 0
    "lost": lambda found, reference: float(bool(reference.min() > 0.5 and found.min() < 0.5)),
    # the share of rows (sampled sequences) that are not the reference's
    "rows differ": lambda found, reference: float(
        (found != reference).reshape(len(reference), -1).any(-1).double().mean()
    ),
    # a count of failures in this setting; the reference does not matter
    "count": lambda found, reference: float(found.sum()),
}


def difference(quantity: str, found: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """The largest difference over the parts of ``quantity`` (inf if the parts or shapes differ)."""
    if found.keys() != reference.keys():
        return math.inf
    measure = MEASURES[TOLERANCES[quantity][0]]
    gaps = [
        measure(found[part], reference[part])
        if found[part].shape == reference[part].shape
        else math.inf
        for part in found
    ]
    return max(gaps, default=0.0)


def rows_of(run: Run, reference: Run | None, dtype: str) -> list[dict[str, object]]:
    """One table row per quantity of ``run`` (or one row saying why there is none)."""
    base = {"piece": run.piece, "setting": run.setting, "seconds": run.seconds,
            "peak_MiB": run.peak_mib, "measure": "", "error": ""}  # fmt: skip
    if run.error:
        return [base | {"quantity": "(raised)", "error": run.error, "ok": False}]
    if reference is None:
        return [base | {"quantity": q, "difference": math.nan, "ok": True} for q in run.outputs]
    if reference.error:
        return [base | {"quantity": "(no reference)", "error": "the reference raised", "ok": False}]
    rows = []
    for quantity, parts in run.outputs.items():
        tolerance = TOLERANCES[quantity][1][dtype]
        gap = difference(quantity, parts, reference.outputs.get(quantity, {}))
        rows.append(
            base | {"quantity": quantity, "measure": TOLERANCES[quantity][0], "difference": gap,
                    "tolerance": tolerance, "ok": gap <= tolerance}
        )  # fmt: skip
    return rows


# ---------------------------------------------------------------- settings


def corpus_documents() -> tuple[str, ...]:
    """One document per CounterFact sample case: its prompts, paraphrases and neighbours."""
    return tuple(
        " ".join(
            [
                case.request.text,
                *case.paraphrase_prompts,
                *case.neighborhood_prompts,
                *case.generation_prompts,
            ]
        )  # fmt: skip
        for case in load_counterfact_sample()
    )


def edit_requests(count: int) -> list[EditRequest]:
    cases = without_conflicts(load_counterfact_sample())
    if count > len(cases):
        raise SystemExit(f"--requests {count}: the CounterFact sample holds {len(cases)} cases")
    return [case.request for case in cases[:count]]


def float32_weights(model: Model) -> dict[str, Tensor]:
    """Copies of the model's floating-point parameters and buffers, as loaded (CPU, float32)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.detach().clone() for name, t in named if t.is_floating_point()}


def move(
    model: Model, weights: dict[str, Tensor], device: torch.device, dtype: torch.dtype
) -> None:
    """Put ``model`` on ``device`` in ``dtype`` as a user does (``.to``), from its float32 weights.

    The same model object goes through every setting, so the editors' context
    prefixes, sampled once per model object, are the reference's everywhere. Each
    move starts from the loaded float32 weights, never from an earlier cast.
    """
    model.to(device, print_details=False)
    model.to(torch.float32, print_details=False)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in weights:
                t.copy_(weights[name])
    model.to(dtype, print_details=False)


def sample_contexts(model: Model) -> None:
    """Sample the editors' context prefixes now, on the CPU float32 model, for every setting."""
    for hparams in (ROMEHyperParams(), MEMITHyperParams(), AlphaEditHyperParams()):
        context_templates(model, hparams)


def warm_up(setting: Setting) -> None:
    """One forward pass before the clock starts: CUDA's libraries load on their first call."""
    if setting.device.type == "cuda":
        with torch.no_grad():
            setting.model(setting.model.to_tokens(DEMO_PROMPT))
        torch.cuda.synchronize(setting.device)


def run_setting(
    base: Model,
    device: torch.device,
    dtype: torch.dtype,
    pieces: list[str],
    context: Context,
    *,
    reference: bool = False,
) -> list[Run]:
    """Every piece on ``base`` moved to ``device`` and ``dtype``."""
    move(base, context.weights, device, dtype)
    setting = Setting(
        model=base,
        device=device,
        dtype=dtype,
        plan=context.plan,
        corpus=context.corpus,
        requests=context.requests,
        cache_dir=context.cache_dir / f"{device.type}-{dtype_label(dtype)}{'-ref' * reference}",
        reference=reference,
    )
    print(f"\n== {setting.name} ==", flush=True)
    warm_up(setting)
    runs = []
    for piece in pieces:
        run = run_piece(piece, setting)
        state = run.error or f"{run.seconds:.1f} s"
        print(f"  {piece:18s} {state}", flush=True)
        runs.append(run)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


@dataclass(frozen=True)
class Context:
    """What every setting of one check shares."""

    model_name: str
    plan: Plan
    corpus: tuple[str, ...]
    requests: list[EditRequest]
    cache_dir: Path
    weights: dict[str, Tensor]
    """The model's float32 weights as loaded: every setting is cast from them."""

    def fingerprint(self) -> str:
        """What a saved reference must match: the model and the plan."""
        return json.dumps({"model": self.model_name, "plan": asdict(self.plan)}, sort_keys=True)


def reference_runs(
    base: Model, pieces: list[str], context: Context, path: Path | None
) -> dict[str, Run]:
    """The CPU float32 runs: loaded from ``path`` when it matches, else computed (and saved)."""
    saved = load_reference(path, context) if path is not None else {}
    missing = [piece for piece in pieces if piece not in saved]
    if saved:
        print(f"reference: {sorted(saved)} loaded from {path}", flush=True)
    computed = []
    if missing:
        cpu = torch.device("cpu")
        computed = run_setting(base, cpu, torch.float32, missing, context, reference=True)
    runs = saved | {run.piece: run for run in computed}
    if path is not None and computed:
        save_reference(path, context, runs)
    return {piece: runs[piece] for piece in pieces}


def save_reference(path: Path, context: Context, runs: dict[str, Run]) -> None:
    tensors = {
        f"{run.piece}|{quantity}|{part}": t.contiguous()
        for run in runs.values()
        if not run.error
        for quantity, parts in run.outputs.items()
        for part, t in parts.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"context": context.fingerprint()})


def load_reference(path: Path, context: Context) -> dict[str, Run]:
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("context") != context.fingerprint():
        print(f"reference {path} is for another model or plan: computing it again")
        return {}
    runs: dict[str, Run] = {}
    for key, tensor in load_file(str(path)).items():
        piece, quantity, part = key.split("|")
        run = runs.setdefault(piece, Run(piece, "cpu float32 (reference, loaded)", {}))
        run.outputs.setdefault(quantity, {})[part] = tensor
    return runs


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument(
        "--model", choices=["default", "tiny"], default="default",
        help="default: SmolLM2-135M (load_model); tiny: tiny_model(), a random 3-layer model",
    )  # fmt: skip
    parser.add_argument(
        "--requests", type=int, default=100,
        help=f"MEMIT/AlphaEdit batch (the tiny model takes at most {TINY_REQUESTS})",
    )  # fmt: skip
    parser.add_argument("--pieces", default=",".join(PIECES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, help="table as CSV (default: bench/results/...)")
    parser.add_argument("--cache-dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--reference", type=Path, help="keep the CPU float32 results here")
    args = parser.parse_args(argv)
    unknown = [p for p in split(args.pieces) if p not in PIECES]
    bad_dtypes = [d for d in split(args.dtypes) if d not in DTYPES]
    if unknown or bad_dtypes:
        parser.error(f"unknown pieces {unknown} or dtypes {bad_dtypes}")
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def split(listed: str) -> list[str]:
    return [item.strip() for item in listed.split(",") if item.strip()]


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: pass --device cpu to run the check on the CPU")
        return 2
    chosen = set(split(args.pieces))
    chosen |= {NEEDS[piece] for piece in chosen if piece in NEEDS}
    pieces = [piece for piece in PIECES if piece in chosen]
    dtypes = split(args.dtypes)
    out = args.out or HERE / "results" / f"gpu_check_{device_slug(device)}_{args.model}.csv"
    started = time.perf_counter()
    base = rome_lens.tiny_model() if args.model == "tiny" else rome_lens.load_model()
    plan = (tiny_plan if args.model == "tiny" else default_plan)(args.requests)
    print(f"model {base.cfg.model_name} loaded in {time.perf_counter() - started:.1f} s; {plan}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        context = Context(
            model_name=args.model,
            plan=plan,
            corpus=corpus_documents(),
            requests=edit_requests(plan.requests),
            cache_dir=args.cache_dir or Path(scratch),
            weights=float32_weights(base),
        )
        sample_contexts(base)
        reference = reference_runs(base, pieces, context, args.reference)
        rows = [row for run in reference.values() for row in rows_of(run, None, "float32")]
        for name in dtypes:
            for run in run_setting(base, device, DTYPES[name], pieces, context):
                rows += rows_of(run, reference.get(run.piece), name)
    table = report(rows, out)
    failures = table[~table["ok"].astype(bool)]
    if len(failures):
        print(f"\nFAILED: {len(failures)} of {len(table)} rows")
        for row in failures.itertuples():
            why = row.error or f"{row.measure} {row.difference:.3g} > {row.tolerance:.2g}"
            print(f"  {row.piece} / {row.quantity} in {row.setting}: {why}")
        return 1
    print(f"\nall {len(table)} rows within tolerance")
    return 0


def report(rows: list[dict[str, object]], out: Path) -> pd.DataFrame:
    """Print the table and write it to ``out`` as CSV."""
    columns = ["piece", "quantity", "setting", "seconds", "peak_MiB", "measure", "difference",
               "tolerance", "ok", "error"]  # fmt: skip
    table = pd.DataFrame(rows).reindex(columns=columns)
    shown = table.drop(columns="error")
    shown["seconds"] = shown["seconds"].map(lambda s: "" if math.isnan(s) else f"{s:.2f}")
    shown["peak_MiB"] = shown["peak_MiB"].map(lambda m: "n/a" if math.isnan(m) else f"{m:,.0f}")
    shown["difference"] = [
        "ERROR" if error else ("ref" if pd.isna(d) else f"{d:.2e}")
        for d, error in zip(table["difference"], table["error"], strict=True)
    ]
    shown["tolerance"] = shown["tolerance"].map(lambda t: "" if pd.isna(t) else f"{t:.2g}")
    print()
    print(shown.to_string(index=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"\nwritten to {out}")
    return table


if __name__ == "__main__":
    sys.exit(main())
