"""The cost model: FLOPs against torch's own count, memory and disk, shapes, defaults, errors."""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rome_lens
from rome_lens.core import cost
from rome_lens.core.corpus import Corpus
from rome_lens.core.cost import (
    BUILTIN_SHAPES,
    CPU,
    Cost,
    ModelShape,
    Throughput,
    automatic_layers_per_pass,
    estimate_cost,
    forward_flops,
    largest_layers_per_pass,
    model_shape,
)
from rome_lens.core.tokens import target_token_ids
from rome_lens.editing import (
    EditRequest,
    MEMITHyperParams,
    ROMEHyperParams,
    defaults,
    memit_edit,
    memory,
    outcomes,
    rome_edit,
)
from rome_lens.editing.requests import EditHyperParams
from rome_lens.influence import factors as factors_module
from rome_lens.influence import fit_influence_factors, influence, mlp_weights
from rome_lens.influence import scan as scan_module
from rome_lens.stats import DEFAULT_N_TOKENS, key_second_moment

FACT = "The Eiffel Tower is in Paris."
PARAGRAPH = " ".join([FACT] * 8)  # long enough that attention weighs in the tiny model's FLOPs
PROMPT = "{} is located in the city of"
SUBJECTS = ["The Eiffel Tower", "The Space Needle"]  # three tokens each in the tiny tokenizer


def counted_flops(fn):
    """``fn()``'s FLOPs as torch counts them (matmuls, attention), and its result."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def request_sizes(model, request: EditRequest) -> dict[str, int]:
    """The prompt, subject and target lengths of ``request`` in ``model``'s tokens."""
    return {
        "prompt_tokens": len(model.to_tokens(request.text, prepend_bos=False)[0]),
        "subject_tokens": len(model.to_tokens(request.subject, prepend_bos=False)[0]),
        "target_tokens": len(target_token_ids(model, request.text, request.target_new)),
    }


def default_of(function, name: str):
    """The default value of ``function``'s parameter ``name``."""
    return inspect.signature(function).parameters[name].default


# The cost model's copies of rome_lens's defaults, and the values the code uses.
MIRRORED = {
    "KEY_STATS_N_TOKENS": DEFAULT_N_TOKENS,
    "KEY_STATS_BATCH_SIZE": default_of(key_second_moment, "batch_size"),
    "SAMPLING_BATCH_SIZE": default_of(Corpus.chunks, "batch_size"),
    "KEY_ROWS_PER_PASS": memory._MAX_ROWS,
    "OUTCOME_BATCH_SIZE": default_of(outcomes.measure_outcomes, "batch_size"),
    "V_STEPS": EditHyperParams().v_steps,
    "ROME_CONTEXTS": ROMEHyperParams().context_lengths,
    "MEMIT_CONTEXTS": MEMITHyperParams().context_lengths,
    "MEMIT_REQUESTS_PER_BATCH": MEMITHyperParams().requests_per_batch,
    "EKFAC_N_TOKENS": default_of(fit_influence_factors, "n_tokens"),
    "EKFAC_BATCH_SIZE": default_of(fit_influence_factors, "batch_size"),
    "SCAN_BATCH_SIZE": default_of(influence, "batch_size"),
    "SCAN_TOP_K": default_of(influence, "top_k"),
    "TOKEN_FORM_LIMIT": scan_module._TOKEN_FORM_LIMIT,
}


@pytest.fixture
def quiet_edits():
    """A random model takes few edits; its misses are not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TestFlopsMatchTorch:
    def test_forward_pass(self, tiny):
        """A forward pass's FLOPs match FlopCounterMode on tiny_model() within 2%."""
        tokens = torch.randint(0, 300, (2, 60))
        with torch.no_grad():
            measured, _ = counted_flops(lambda: tiny(tokens))
        predicted = forward_flops(tiny, 120, context=60, unembedded=120)
        assert predicted == pytest.approx(measured, rel=0.02)

    def test_forward_pass_grows_with_the_square_of_the_context(self, tiny):
        """Attention's share makes a twice longer sequence cost more than twice as much."""
        shape = model_shape(tiny)
        short = forward_flops(shape, 32, context=32) - forward_flops(shape, 32, context=0)
        long = forward_flops(shape, 64, context=64) - forward_flops(shape, 64, context=0)
        assert long == pytest.approx(4 * short)

    def test_key_statistics(self, tiny, tmp_path):
        """Sampling the corpus, the forward passes to the layer and Σ k kᵀ, as counted."""
        measured, _ = counted_flops(
            lambda: key_second_moment(tiny, 1, n_tokens=256, cache_dir=tmp_path, progress=False)
        )
        predicted = estimate_cost(tiny, "key_statistics", layer=1, n_tokens=256)
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)

    def test_rome_edit(self, tiny, tmp_path, quiet_edits):
        """k*, every step of δ's optimisation and the read-back, as counted."""
        request = EditRequest(PROMPT, SUBJECTS[0], "Rome", "Paris")
        stats = key_second_moment(tiny, 1, n_tokens=256, cache_dir=tmp_path, progress=False)
        hparams = ROMEHyperParams(context_lengths=())
        measured, edit = counted_flops(
            lambda: rome_edit(tiny, request, layer=1, hparams=hparams, stats=stats, progress=False)
        )
        predicted = estimate_cost(
            tiny, "rome_edit", layer=1, context_lengths=(), v_steps=len(edit.losses),
            **request_sizes(tiny, request),
        )  # fmt: skip
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)

    def test_memit(self, tiny, tmp_path, quiet_edits):
        """z's optimisation, each layer's keys and residuals, the solve's products, as counted."""
        requests = [EditRequest(PROMPT, subject, "Rome", "Paris") for subject in SUBJECTS]
        stats = {
            layer: key_second_moment(tiny, layer, n_tokens=256, cache_dir=tmp_path, progress=False)
            for layer in (0, 1)
        }
        hparams = MEMITHyperParams(context_lengths=(), v_steps=5)
        measured, _ = counted_flops(
            lambda: memit_edit(
                tiny, requests, layers=[0, 1], hparams=hparams, stats=stats,
                cache_dir=tmp_path, progress=False,
            )
        )  # fmt: skip
        predicted = estimate_cost(
            tiny, "memit", layers=[0, 1], n_requests=2, context_lengths=(), v_steps=5,
            **request_sizes(tiny, requests[0]),
        )  # fmt: skip
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)

    def test_ekfac_factors(self, tiny, tmp_path):
        """Both gradient passes, the moments and the rotated per-sequence gradients, as counted."""
        tokens = len(tiny.to_tokens(PARAGRAPH, prepend_bos=False)[0])
        measured, _ = counted_flops(
            lambda: fit_influence_factors(
                tiny, [PARAGRAPH] * 6, layers=[0, 2], n_tokens=6 * tokens, cache_dir=tmp_path,
                progress=False,
            )
        )  # fmt: skip
        predicted = estimate_cost(
            tiny, "ekfac_factors", layers=[0, 2], n_tokens=6 * tokens, sampled_corpus=False,
            sequence_tokens=tokens,
        )  # fmt: skip
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)

    def test_ekfac_factors_in_passes(self, tiny, tmp_path):
        """One layer per pass: each pass's forward and backward passes, as counted."""
        tokens = len(tiny.to_tokens(PARAGRAPH, prepend_bos=False)[0])
        measured, _ = counted_flops(
            lambda: fit_influence_factors(
                tiny, [PARAGRAPH] * 6, layers=[0, 2], n_tokens=6 * tokens, cache_dir=tmp_path,
                progress=False, layers_per_pass=1,
            )
        )  # fmt: skip
        predicted = estimate_cost(
            tiny, "ekfac_factors", layers=[0, 2], n_tokens=6 * tokens, sampled_corpus=False,
            sequence_tokens=tokens, layers_per_pass=1,
        )  # fmt: skip
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)

    def test_scan(self, tiny, tmp_path):
        """The query's gradient and preconditioning, the scan and the top texts, as counted."""
        factors = fit_influence_factors(
            tiny, [FACT] * 4, layers=[0], n_tokens=100, cache_dir=tmp_path, progress=False
        )
        prompt, completion = "The Eiffel Tower is in", " Paris"
        query_tokens = len(tiny.to_tokens(prompt, prepend_bos=False)[0])
        query_tokens += len(target_token_ids(tiny, prompt, completion))
        measured, _ = counted_flops(
            lambda: influence(tiny, factors, prompt, completion, [PARAGRAPH] * 8, top_k=2,
                              progress=False)
        )  # fmt: skip
        predicted = estimate_cost(
            tiny, "scan", layers=[0], n_documents=8, top_k=2, query_tokens=query_tokens,
            document_tokens=len(tiny.to_tokens(PARAGRAPH, prepend_bos=False)[0]),
        )  # fmt: skip
        assert predicted.matmul_flops == pytest.approx(measured, rel=0.02)


class TestMemoryAndDisk:
    def test_key_statistics_accumulator_is_d_mlp_squared_float64(self):
        """C's running sum holds d_mlp² float64 entries (and Σk), and is what is saved."""
        found = estimate_cost("gpt-j-6b", "key_statistics", sampled_corpus=False)
        (save,) = [step for step in found.parts if step.kind == "io"]
        assert save.device_bytes == (16384**2 + 16384) * 8
        assert found.persisted_bytes == (16384**2 + 16384) * 8

    def test_kahan_float32_sums_save_half(self):
        """Sums kept in float32 (with compensation) hold as much but write half to disk."""
        wide = estimate_cost("gpt-j-6b", "key_statistics", sampled_corpus=False)
        narrow = estimate_cost(
            "gpt-j-6b", "key_statistics", sampled_corpus=False, accumulator="float32"
        )
        assert narrow.persisted_bytes * 2 == wide.persisted_bytes
        assert narrow.peak_device_bytes < wide.peak_device_bytes
        assert [s.precision for s in narrow.parts if "Σ" in s.name] == ["float32"]

    def test_more_tokens_cost_flops_not_memory(self):
        """Key statistics over twice the tokens: twice the FLOPs, the same peak memory."""
        given = {"sampled_corpus": False, "sequence_tokens": 128}  # 160 and 320 whole windows
        one = estimate_cost("gpt2-xl", "key_statistics", n_tokens=20_480, **given)
        two = estimate_cost("gpt2-xl", "key_statistics", n_tokens=40_960, **given)
        assert two.flops == pytest.approx(2 * one.flops)
        assert two.peak_memory_bytes == one.peak_memory_bytes

    def test_sampled_corpus_is_written_to_the_cache(self):
        """The tokens sampled for the statistics are cached too: 8 bytes each, BOS included."""
        given = estimate_cost("gpt2-xl", "key_statistics", n_tokens=6_400, sampled_corpus=False)
        sampled = estimate_cost("gpt2-xl", "key_statistics", n_tokens=6_400)
        assert sampled.persisted_bytes - given.persisted_bytes == 100 * 65 * 8

    def test_bigger_batches_hold_more(self):
        """Memory grows with the batch, FLOPs do not."""
        small = estimate_cost("llama-3-8b", "ekfac_factors", layers=[0], batch_size=4)
        large = estimate_cost("llama-3-8b", "ekfac_factors", layers=[0], batch_size=32)
        assert large.peak_device_bytes > small.peak_device_bytes
        assert large.flops == small.flops

    def test_memit_memory_grows_with_the_requests(self):
        """MEMIT keeps every request's keys: ten times the requests hold more than before."""
        thousand = estimate_cost("gpt-j-6b", "memit_1000")
        ten_thousand = estimate_cost("gpt-j-6b", "memit_10000")
        assert ten_thousand.settings.n_requests == 10 * thousand.settings.n_requests
        assert ten_thousand.peak_device_bytes > thousand.peak_device_bytes + 10 * 2**30

    def test_scan_brings_one_weights_factors_to_the_device(self):
        """Preconditioning 28 layers instead of one adds 27 layers' dense queries to the
        device and their factors to the host; the device holds one weight's factors."""

        def precondition(layers) -> cost.Step:
            found = estimate_cost("gpt-j-6b", "scan", layers=layers, n_queries=2)
            (step,) = [s for s in found.parts if s.name == "precondition the queries (EK-FAC)"]
            return step

        one, every = precondition([0]), precondition(range(28))
        weights = [(4096 + 1, 16384), (16384 + 1, 4096)]  # W_in and W_out, with their biases
        queries = 2 * sum(d_in * d_out * 4 for d_in, d_out in weights)
        factors = sum(
            (d_in**2 + d_out**2 + d_in + d_out + d_in * d_out) * 4 for d_in, d_out in weights
        )
        assert every.device_bytes - one.device_bytes == 27 * queries
        assert every.host_bytes - one.host_bytes == 27 * factors

    def test_weights_follow_the_dtype(self):
        """bfloat16 weights take half the bytes of float32 ones."""
        full = estimate_cost("llama-3-8b", "rome_edit")
        half = estimate_cost("llama-3-8b", "rome_edit", dtype="bfloat16")
        assert half.weights_bytes * 2 == full.weights_bytes


class TestFits:
    def test_ekfac_of_every_gpt_j_layer_exceeds_one_gpu(self):
        """All 28 layers' float64 moments in one pass do not fit 80 GB; in the passes the
        fit picks by itself, they do."""
        every = estimate_cost("gpt-j-6b", "ekfac_factors", dtype="bfloat16")
        assert not every.fits(80e9)
        assert "moments pass (forward + backward)" in every.exceeds(80e9)
        per_pass = automatic_layers_per_pass("gpt-j-6b", 80e9, dtype="bfloat16")
        assert 1 < per_pass < 28
        passes = estimate_cost(
            "gpt-j-6b", "ekfac_factors", dtype="bfloat16", layers_per_pass=per_pass
        )
        assert passes.fits(80e9)

    def test_scan_of_every_gpt_j_layer_fits_one_gpu(self):
        """The scan keeps its factors on the host: every GPT-J layer fits 80 GB."""
        found = estimate_cost("gpt-j-6b", "scan", dtype="bfloat16")
        assert found.fits(80e9)
        assert found.peak_memory_bytes > 80e9  # on the CPU, the factors count too

    def test_one_memory_counts_the_host_too(self):
        """On the CPU the cache's copies share the memory: the check with them is stricter."""
        found = estimate_cost("smollm2-135m", "key_statistics")
        total = found.weights_bytes + found.peak_memory_bytes
        assert found.fits(total, one_memory=True) and not found.fits(total - 1, one_memory=True)


class TestPasses:
    """EK-FAC's factors fitted ``layers_per_pass`` layers at a time."""

    def test_one_pass_of_every_layer_is_the_default(self):
        """layers_per_pass=None is one pass of every layer, as is any group that large."""
        default = estimate_cost("gpt-j-6b", "ekfac_factors")
        for per_pass in (28, 100):
            found = estimate_cost("gpt-j-6b", "ekfac_factors", layers_per_pass=per_pass)
            assert found.parts == default.parts
        assert all("layers" not in step.name for step in default.parts)

    def test_each_pass_adds_two_gradient_passes(self):
        """Passes cost more FLOPs than one pass by two gradient passes each, the model
        forward and back to the group's lowest layer; the rest is the same work."""
        one = estimate_cost("gpt-j-6b", "ekfac_factors")
        passes = estimate_cost("gpt-j-6b", "ekfac_factors", layers_per_pass=8)

        def gradient_pass(lowest: int) -> float:
            fit = estimate_cost("gpt-j-6b", "ekfac_factors", layers=[lowest])
            (step,) = [s for s in fit.parts if s.name == "moments pass (forward + backward)"]
            return step.flops

        extra = 2 * sum(gradient_pass(lowest) for lowest in (8, 16, 24))
        assert passes.flops > one.flops
        assert passes.flops == pytest.approx(one.flops + extra)
        names = [step.name for step in passes.parts]
        assert "EK-FAC pass, layers 24-27 (forward + backward)" in names

    def test_peak_device_memory_is_the_largest_groups(self):
        """In passes of 8 the device holds what a fit of 8 layers alone holds; the factors
        of the passes before wait on the host."""
        passes = estimate_cost("llama-3-8b", "ekfac_factors", layers_per_pass=8)
        eight = estimate_cost("llama-3-8b", "ekfac_factors", layers=range(8))
        assert passes.peak_device_bytes == eight.peak_device_bytes
        assert passes.peak_memory_bytes > eight.peak_memory_bytes
        last = [step for step in passes.parts if step.name.startswith("eigendecompositions")][-1]
        assert last.host_bytes == 3 * eight.parts[-1].device_bytes  # three groups' factors
        one_pass = estimate_cost("llama-3-8b", "ekfac_factors")
        assert passes.persisted_bytes == one_pass.persisted_bytes

    def test_largest_layers_per_pass_is_the_most_that_fits(self):
        """The group it finds fits 80 GB; one more layer per pass does not."""
        sizes = {"dtype": "bfloat16"}
        found = largest_layers_per_pass("llama-3-8b", 80e9, **sizes)
        fitting = estimate_cost("llama-3-8b", "ekfac_factors", layers_per_pass=found, **sizes)
        more = estimate_cost("llama-3-8b", "ekfac_factors", layers_per_pass=found + 1, **sizes)
        assert fitting.fits(80e9) and not more.fits(80e9)
        with pytest.raises(ValueError, match="not even one layer per pass fits"):
            largest_layers_per_pass("llama-3-8b", 20e9, **sizes)

    def test_automatic_layers_per_pass_is_what_the_fit_picks(self, tiny, monkeypatch):
        """As fit_influence_factors picks: half the free memory over one layer's moments."""
        weights = mlp_weights(tiny, [0, 1, 2])
        one_layer = factors_module.moment_bytes(tiny, [w for w in weights if w.layer == 0])
        free = 5 * one_layer  # half of it holds two layers' moments
        monkeypatch.setattr(factors_module, "available_memory", lambda device: free)
        groups = factors_module.layer_passes(tiny, weights)
        bytes_available = free + model_shape(tiny).weights_bytes
        assert automatic_layers_per_pass(tiny, bytes_available) == len(groups[0]) == 2


class TestSeconds:
    def test_one_rate_for_every_precision(self):
        """With every precision at one rate, seconds are FLOPs over it."""
        found = estimate_cost("smollm2-135m", "rome_edit")
        rate = Throughput(1e11, float32=1e11, float64=1e11)
        assert found.seconds(rate) == pytest.approx(found.flops / 1e11)

    def test_float64_runs_at_half_rate_by_default(self):
        """A plain number is the model's rate; float64 steps take twice as long."""
        found = estimate_cost("gpt-j-6b", "key_statistics", sampled_corpus=False)
        wide = sum(s.flops for s in found.parts if s.precision == "float64")
        assert wide > 0
        assert found.seconds(1e12) == pytest.approx((found.flops + wide) / 1e12)
        assert found.seconds(CPU) == pytest.approx((found.flops + wide) / 200e9)

    def test_block_calls_add_a_fixed_cost(self):
        """A per-block overhead adds block_calls × its seconds."""
        found = estimate_cost("smollm2-135m", "key_statistics")
        calls = sum(step.block_calls for step in found.parts)
        slow = Throughput(1e11, seconds_per_block_call=1e-3)
        assert found.seconds(slow) == pytest.approx(found.seconds(1e11) + calls * 1e-3)


class TestResults:
    def test_dataframe_has_a_row_per_step(self):
        """to_dataframe: one row per step, whose FLOPs sum to the cost's."""
        found = estimate_cost("llama-3-8b", "scan")
        table = found.to_dataframe()
        assert list(table["name"]) == [step.name for step in found.parts]
        assert table["flops"].sum() == pytest.approx(found.flops)

    def test_repr_says_what_and_where(self):
        """The repr names the work and the model, with FLOPs and GiB."""
        text = repr(estimate_cost("gpt2-xl", "memit_1000"))
        assert text.startswith("Cost(memit_1000 on gpt2-xl:") and "GiB" in text

    def test_exported_from_the_package(self):
        """rome_lens.estimate_cost and rome_lens.Cost resolve through the package root."""
        assert rome_lens.estimate_cost is estimate_cost
        assert rome_lens.Cost is Cost


class TestShapes:
    def test_tiny_model_config_equals_its_shape(self, tiny):
        """A tiny model's config gives the shape built by hand from its sizes."""
        expected = ModelShape(
            name=tiny.cfg.model_name, n_layers=3, d_model=64, d_mlp=256,
            d_vocab=len(tiny.tokenizer), n_heads=4, d_head=16, n_ctx=64, gated_mlp=False,
            mlp_bias=True, prepend_bos=True,
            n_parameters=sum(t.numel() for _, t in rome_lens.core.backend.named_weights(tiny)),
            dtype_bytes=4,
        )  # fmt: skip
        assert model_shape(tiny) == expected

    @pytest.mark.parametrize(
        ("name", "published"),
        [("gpt2-xl", 1.5576e9), ("gpt-j-6b", 6.0535e9), ("llama-3-8b", 8.0306e9),
         ("smollm2-135m", 134.5e6)],
    )  # fmt: skip
    def test_builtin_parameter_counts(self, name, published):
        """The built-in shapes count their weights within 1% of the published sizes."""
        assert BUILTIN_SHAPES[name].parameters == pytest.approx(published, rel=0.01)

    def test_names_ignore_case(self):
        """ "GPT-J-6B" is the built-in "gpt-j-6b"."""
        assert model_shape("GPT-J-6B") is BUILTIN_SHAPES["gpt-j-6b"]


class TestDefaults:
    @pytest.mark.parametrize(("name", "in_code"), list(MIRRORED.items()))
    def test_mirrored_constant_matches_the_code(self, name, in_code):
        """Each default the cost model copies equals the one the code uses."""
        assert in_code == getattr(cost, name)

    @pytest.mark.parametrize("name", list(BUILTIN_SHAPES))
    def test_default_layers_are_the_editors(self, name):
        """The layers assumed are those default_layer and default_memit_layers pick."""
        shape = BUILTIN_SHAPES[name]
        stub = SimpleNamespace(cfg=SimpleNamespace(model_name=shape.name, n_layers=shape.n_layers))
        assert estimate_cost(shape, "rome_edit").settings.layer == defaults.default_layer(stub)
        memit_layers = estimate_cost(shape, "memit").settings.layers
        assert memit_layers == tuple(defaults.default_memit_layers(stub))

    def test_tiny_model_defaults(self, tiny):
        """On tiny_model(), the layers are those the editors pick for it."""
        assert estimate_cost(tiny, "key_statistics").settings.layer == defaults.default_layer(tiny)
        assert estimate_cost(tiny, "memit").settings.layers == tuple(
            defaults.default_memit_layers(tiny)
        )


class TestErrors:
    def test_unknown_work_names_it_and_the_choices(self):
        """A bad work name raises ValueError naming it and listing every piece."""
        with pytest.raises(ValueError, match="unknown work 'rome'") as raised:
            estimate_cost("gpt2-xl", "rome")
        for work in cost.WORKS:
            assert work in str(raised.value)

    def test_unknown_size(self):
        """A size that CostSettings lacks raises ValueError naming it."""
        with pytest.raises(ValueError, match="unknown size 'n_token'"):
            estimate_cost("gpt2-xl", "key_statistics", n_token=10)

    def test_unknown_dtype(self):
        """An unknown dtype raises ValueError listing the known ones."""
        with pytest.raises(ValueError, match="unknown dtype 'int8'.*bfloat16"):
            estimate_cost("gpt2-xl", "rome_edit", dtype="int8")

    def test_layers_per_pass_below_one(self):
        """layers_per_pass=0 raises ValueError, as fit_influence_factors does."""
        with pytest.raises(ValueError, match="layers_per_pass must be >= 1, got 0"):
            estimate_cost("gpt2-xl", "ekfac_factors", layers_per_pass=0)

    def test_layer_outside_the_model(self):
        """A layer past the last raises ValueError."""
        with pytest.raises(ValueError, match="layer 48 is outside the model's 48 layers"):
            estimate_cost("gpt2-xl", "key_statistics", layer=48)

    def test_unknown_shape_lists_the_builtins(self):
        """An unknown model name raises ValueError listing the built-in shapes."""
        with pytest.raises(ValueError, match="unknown model shape 'gpt-5'.*llama-3-8b"):
            model_shape("gpt-5")
