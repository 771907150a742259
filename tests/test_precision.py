"""Device and precision: the policy, no CPU copies per batch, bfloat16 against float32."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import rome_lens
from rome_lens.analysis.states import residual_states
from rome_lens.core.backend import weight
from rome_lens.core.generation import sample_text
from rome_lens.core.precision import RunningSum, accumulator_dtype, compute_dtype, dtype_name
from rome_lens.editing.memory import optimize_deltas
from rome_lens.editing.rome import ROMEHyperParams
from rome_lens.stats import moments as moments_module
from rome_lens.stats.moments import accumulate_moments

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
REQUEST = rome_lens.EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"
)
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
    "The Colosseum is an amphitheatre in the city of Rome.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
] * 4

# bfloat16 keeps 8 bits of mantissa (relative rounding 2⁻⁹ ≈ 0.002); through three blocks
# and a corpus sum the tiny model's results drift by up to about 1%. Each bound is about
# three times the drift measured, so a real error (a sum in bfloat16, a lost promotion)
# fails, and rounding does not.
BF16_TOLERANCE = {
    "trace": 0.02,  # relative, every cell of the trace
    "key": 0.02,  # ROME's k* and MEMIT's keys
    "left": 0.05,  # ROME's ℓ = C⁻¹k*/(k*·C⁻¹k*): a solve amplifies the keys' error
    "stats": 0.02,  # key statistics C
    "factors": 0.05,  # the Kronecker factors' eigenvalues
    "scan": 0.9,  # the correlation of the scan's scores must be at least this
    "linearity": 0.01,  # absolute, layer linearity scores (in [0, 1])
    "nonlinearity": 0.05,  # relative, token nonlinearity errors
    "predictions": 0.02,  # relative, intermediate predictions' losses
}

# Each model samples its own context prefixes; without them both precisions read the same
# prompts, so their keys differ by rounding alone.
BARE_ROME = ROMEHyperParams(context_lengths=())
BARE_MEMIT = rome_lens.MEMITHyperParams(context_lengths=())


def relative(found: torch.Tensor, expected: torch.Tensor) -> float:
    """‖found − expected‖ / ‖expected‖, in float64."""
    found, expected = found.double().cpu(), expected.double().cpu()
    return float((found - expected).norm() / expected.norm())


@contextmanager
def cpu_copies() -> Iterator[list[str]]:
    """Record every ``Tensor.cpu()``: the one way rome_lens moves a tensor to the host.

    (A ``.to(device)`` names the model's device, which on this machine is the CPU too,
    so it cannot be told apart from a move to the host here; rome_lens never writes
    ``.to("cpu")``.)
    """
    calls: list[str] = []
    real_cpu = torch.Tensor.cpu

    def cpu(tensor, *args, **kwargs):
        calls.append("cpu")
        return real_cpu(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cpu", cpu)
        yield calls


def copies_for(run: Callable[[int], object], sizes: tuple[int, int]) -> list[int]:
    """CPU copies made by ``run(size)`` for each size (batches, steps, tokens)."""
    counts = []
    for size in sizes:
        with cpu_copies() as calls:
            run(size)
        counts.append(len(calls))
    return counts


@pytest.fixture(scope="module")
def pair():
    """The tiny model in float32, and the same model in bfloat16."""
    return rome_lens.tiny_model(), rome_lens.tiny_model().to(torch.bfloat16)


@pytest.fixture(scope="module")
def corpus(tiny):
    """Text sampled once from the float32 model: the same corpus for both precisions."""
    return sample_text(tiny, ["The", "A", "In", "It"] * 12, 40, seed=0)


class TestPolicy:
    def test_cpu_sums_in_float64_and_half_precision_computes_in_float32(self):
        """The CPU accumulates in float64; bfloat16 and float16 work is promoted to float32."""
        assert accumulator_dtype("cpu") == torch.float64
        assert accumulator_dtype("mps") == torch.float32
        assert [compute_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [
            torch.float32
        ] * 3
        assert dtype_name(torch.bfloat16) == "bfloat16"

    def test_kahan_sum_keeps_float32_precision(self):
        """A compensated float32 sum of 20,000 rows stays within 1e-6 of float64; a plain one
        drifts."""
        rows = torch.rand(20_000, 64, generator=torch.Generator().manual_seed(0)) + 1.0
        exact = rows.double().sum(0)
        kahan, plain = RunningSum(torch.float32), torch.zeros(64)
        for row in rows:
            kahan.add(row)
            plain += row
        assert kahan.value.dtype == torch.float32
        assert relative(kahan.value, exact) < 1e-6 < relative(plain, exact)

    def test_float32_moments_match_float64(self, tiny, tmp_path, monkeypatch):
        """Where the device sums in float32, the moments say so and match float64 to 1e-6."""
        hook = "blocks.1.mlp.hook_post"
        kwargs = dict(forward=[hook], corpus=TEXTS, n_tokens=10_000, batch_size=1,
                      use_cache=False, cache_dir=tmp_path, progress=False)  # fmt: skip
        wide = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        monkeypatch.setattr(moments_module, "accumulator_dtype", lambda device: torch.float32)
        narrow = accumulate_moments(tiny, **kwargs)[hook, "forward"]
        assert (wide.outer.dtype, narrow.outer.dtype) == (torch.float64, torch.float32)
        assert relative(narrow.outer, wide.outer) < 1e-6

    def test_edit_records_the_dtypes(self, tiny, tmp_path):
        """An edit records ΔW's dtype (float64) and the weights' dtype it is written in."""
        edit = rome_lens.rome_edit(tiny, REQUEST, layer=1, cache_dir=tmp_path, progress=False)
        row = edit.parameter_dataframe().iloc[0]
        assert (row["delta_dtype"], row["weight_dtype"]) == ("float64", "float32")
        loaded = type(edit).load(edit.save(tmp_path / "edit.st"))
        assert loaded.weight_dtype == "float32"


class TestNoCopiesPerBatch:
    """CPU copies are a constant of the call, not a cost per batch, step or token."""

    def test_moments_forward_and_backward(self, tiny, tmp_path):
        """Key statistics and gradient moments (sampled labels) copy nothing per batch."""

        def run(batch_size: int) -> None:
            accumulate_moments(
                tiny, forward=["blocks.1.mlp.hook_post"], backward=["blocks.1.hook_mlp_out"],
                corpus=TEXTS, n_tokens=10_000, batch_size=batch_size, use_cache=False,
                cache_dir=tmp_path, progress=False,
            )  # fmt: skip

        one, many = copies_for(run, (len(TEXTS), 1))
        assert one == many

    def test_factor_fit_and_scan(self, tiny, tmp_path):
        """An EK-FAC fit (both passes) and a scan copy nothing per batch."""

        def run(batch_size: int) -> None:
            factors = rome_lens.fit_influence_factors(
                tiny, TEXTS, layers=[1], n_tokens=10_000, batch_size=batch_size,
                use_cache=False, cache_dir=tmp_path, progress=False,
            )  # fmt: skip
            rome_lens.influence(
                tiny, factors, PROMPT, " Paris", TEXTS, batch_size=batch_size, progress=False
            )

        one, many = copies_for(run, (len(TEXTS), 1))
        assert one == many

    def test_residual_states(self, tiny):
        """The Microscope's states are gathered on the device, whatever the batches."""

        def run(batch_size: int) -> None:
            residual_states(tiny, TEXTS, batch_size=batch_size, progress=False)

        one, many = copies_for(run, (len(TEXTS), 1))
        assert one == many

    def test_trace_tokens(self, tiny):
        """A trace's cells come back in one copy, however many tokens the prompt has."""

        def run(extra: int) -> None:
            prompt = PROMPT + " the" * extra
            rome_lens.trace_fact(tiny, prompt, SUBJECT, target=" Paris", samples=2,
                                 progress=False)  # fmt: skip

        short, long = copies_for(run, (0, 6))
        assert short == long

    def test_delta_optimisation_steps(self, tiny):
        """ROME's δ optimisation copies nothing per step (its losses come back at the end)."""
        templates = ["{}"]

        def run(steps: int) -> None:
            hparams = ROMEHyperParams(v_steps=steps, early_stop_nll=0.0)
            optimize_deltas(tiny, [REQUEST], 1, templates, torch.ones(1), hparams, progress=False)

        few, more = copies_for(run, (2, 8))
        assert few == more


class TestBfloat16:
    """The whole pipeline on a bfloat16 model, against the same model in float32."""

    def test_trace(self, pair):
        """Every cell of the trace is within rounding of float32's."""
        scores = [
            rome_lens.trace_fact(
                m, PROMPT, SUBJECT, target=" Paris", samples=4, progress=False
            ).scores  # fmt: skip
            for m in pair
        ]
        assert scores[1].dtype == torch.float32
        assert relative(scores[1], scores[0]) < BF16_TOLERANCE["trace"]

    def test_rome_computes_in_float64_writes_bfloat16_and_reverts_bit_exactly(
        self, pair, corpus, tmp_path
    ):
        """ROME's k* and ℓ match float32's; ΔW is float64, the weight stays bfloat16 and
        revert restores every bit."""
        edits = []
        for i, model in enumerate(pair):
            stats = rome_lens.key_second_moment(
                model, 1, corpus=corpus, n_tokens=2_000, cache_dir=tmp_path / str(i),
                progress=False,
            )  # fmt: skip
            edits.append(
                rome_lens.rome_edit(
                    model, REQUEST, layer=1, stats=stats, hparams=BARE_ROME, progress=False
                )
            )
        assert relative(edits[1].key, edits[0].key) < BF16_TOLERANCE["key"]
        assert relative(edits[1].left, edits[0].left) < BF16_TOLERANCE["left"]
        model, edit = pair[1], edits[1]
        assert edit.weight_dtype == "bfloat16" and edit.right.dtype == torch.float64
        before = {k: v.clone() for k, v in model.state_dict().items()}
        original = weight(model, "blocks.1.mlp.W_out").clone()
        handle = edit.apply(model)
        w_out = weight(model, "blocks.1.mlp.W_out")
        assert w_out.dtype == torch.bfloat16 and not torch.equal(w_out, original)
        handle.revert()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def test_memit_keys(self, pair, corpus, tmp_path):
        """A MEMIT batch over two layers solves with keys within rounding of float32's."""
        requests = [REQUEST, rome_lens.EditRequest(
            prompt="{} is a museum in", subject="The Louvre", target_new="Berlin"
        )]  # fmt: skip
        edits = []
        for i, model in enumerate(pair):
            stats = {
                layer: rome_lens.key_second_moment(
                    model, layer, corpus=corpus, n_tokens=2_000, cache_dir=tmp_path / str(i),
                    progress=False,
                )
                for layer in (0, 1)
            }  # fmt: skip
            edits.append(
                rome_lens.memit_edit(
                    model,
                    requests,
                    layers=[0, 1],
                    stats=stats,
                    hparams=BARE_MEMIT,
                    cache_dir=tmp_path / str(i),
                    progress=False,
                )  # fmt: skip
            )
        for layer in (0, 1):
            assert relative(edits[1].keys[layer], edits[0].keys[layer]) < BF16_TOLERANCE["key"]
        assert edits[1].weight_dtype == "bfloat16"
        assert all(d.dtype == torch.float64 for d in edits[1].deltas().values())

    def test_key_statistics(self, pair, corpus, tmp_path):
        """Key statistics are summed in float64 from promoted activations."""
        found = [
            rome_lens.key_second_moment(m, 1, corpus=corpus, n_tokens=2_000,
                                        cache_dir=tmp_path / str(i), progress=False).moment
            for i, m in enumerate(pair)
        ]  # fmt: skip
        assert found[1].dtype == torch.float64
        assert relative(found[1], found[0]) < BF16_TOLERANCE["stats"]

    def test_factors_and_scan(self, pair, corpus, tmp_path):
        """Kronecker factors match float32's; the scan ranks texts as float32 does."""
        factors, scores = [], []
        for i, model in enumerate(pair):
            fitted = rome_lens.fit_influence_factors(
                model, corpus, layers=[1], n_tokens=1_000, fisher="empirical",
                cache_dir=tmp_path / str(i), progress=False,
            )  # fmt: skip
            factors.append(fitted)
            found = rome_lens.influence(model, fitted, PROMPT, " Paris", TEXTS, progress=False)
            scores.append(found.all_scores.flatten().double())
        for table in ("input_values", "output_values"):
            for name in factors[0].names:
                a, b = getattr(factors[1], table)[name], getattr(factors[0], table)[name]
                assert relative(a, b) < BF16_TOLERANCE["factors"], (table, name)
        correlation = torch.corrcoef(torch.stack(scores))[0, 1]
        assert correlation > BF16_TOLERANCE["scan"]

    def test_microscope(self, pair, corpus, tmp_path):
        """Layer linearity, token nonlinearity and intermediate predictions match float32's."""
        found = []
        for i, model in enumerate(pair):
            folder = tmp_path / str(i)
            found.append((
                rome_lens.layer_linearity(model, corpus, n_tokens=600, cache_dir=folder,
                                          progress=False).linearity,
                rome_lens.token_nonlinearity(model, TEXTS[0], reference=corpus,
                                             n_reference_tokens=600, cache_dir=folder,
                                             progress=False).errors,
                rome_lens.intermediate_predictions(model, TEXTS[0], progress=False).losses,
            ))  # fmt: skip
        (lin, nonlin, pred), (lin_bf, nonlin_bf, pred_bf) = found
        assert float((lin_bf - lin).abs().max()) < BF16_TOLERANCE["linearity"]
        assert relative(nonlin_bf, nonlin) < BF16_TOLERANCE["nonlinearity"]
        assert relative(pred_bf, pred) < BF16_TOLERANCE["predictions"]
