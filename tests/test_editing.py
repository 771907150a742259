"""ROME editing on the tiny model: the update's algebra, exact undo, saving, statistics, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import rome_lens
from rome_lens import memory, rome
from rome_lens.finetune import FTHyperParams, ft_edit
from rome_lens.hooks import add_at_rows, attached
from rome_lens.models import _hooked_transformer
from rome_lens.patches import WeightEdit, WeightPatch, edited
from rome_lens.predict import pad, target_nll
from rome_lens.rome import EditRequest, RankOneEdit, ROMEHyperParams, rome_edit
from rome_lens.stats import KeyStats, key_second_moment

from .conftest import hooks_left

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
    "The Colosseum is an amphitheatre in the city of Rome.",
    "Berlin is the capital of Germany and Rome is the capital of Italy.",
] * 8
FAST = ROMEHyperParams(context_lengths=((3, 2),), v_steps=5)
LAYER = 1


@pytest.fixture(scope="module")
def stats(tiny: HookedTransformer, tmp_path_factory: pytest.TempPathFactory) -> KeyStats:
    """Key statistics of the tiny model's layer 1 over a few hundred sampled tokens."""
    folder = tmp_path_factory.mktemp("cache")
    return key_second_moment(tiny, LAYER, n_tokens=1000, cache_dir=folder, progress=False)


@pytest.fixture(scope="module")
def edit(tiny: HookedTransformer, stats: KeyStats) -> RankOneEdit:
    """The Eiffel Tower moved to Rome, at layer 1 of the tiny model."""
    return rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)


def weights(model: HookedTransformer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(model: HookedTransformer, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


class TestRankOneUpdate:
    def test_key_maps_to_value_after_apply(self, tiny, edit):
        """After the edit, W_outᵀ k* + b_out equals v*."""
        mlp = tiny.blocks[LAYER].mlp
        with edit.apply(tiny):
            value = mlp.W_out.T.double() @ edit.key + mlp.b_out.double()
        torch.testing.assert_close(value, edit.value, atol=1e-4, rtol=1e-4)

    def test_update_is_rank_one_with_inverse_moment(self, edit, stats):
        """ΔW = C⁻¹k* ⊗ (v* − W_outᵀk* − b_out) / (k*ᵀC⁻¹k*)."""
        u = torch.linalg.solve(stats.moment, edit.key)
        torch.testing.assert_close(edit.left, u / (u @ edit.key))
        assert torch.linalg.matrix_rank(edit.deltas()[edit.parameter]) == 1

    def test_other_keys_move_least(self, tiny, edit, stats):
        """The update is the C-weighted least-squares change: any other rank-one fix costs more."""
        delta = edit.deltas()[edit.parameter]
        cost = torch.trace(delta.T @ stats.moment @ delta)
        plain = torch.outer(edit.key / (edit.key @ edit.key), edit.right)  # C = I solution
        assert cost < torch.trace(plain.T @ stats.moment @ plain)

    def test_edit_raises_target_probability(self, tiny, edit):
        """The new target becomes more likely after the edit."""
        before = target_nll(tiny, [REQUEST.text], ["Rome"])
        with edit.apply(tiny):
            after = target_nll(tiny, [REQUEST.text], ["Rome"])
        assert after < before

    def test_identity_moment_is_explicit(self, tiny):
        """mom2_adjustment=False uses C = I, so u is k* itself."""
        hparams = ROMEHyperParams(context_lengths=(), v_steps=2, mom2_adjustment=False)
        edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, progress=False)
        torch.testing.assert_close(edit.left, edit.key / (edit.key @ edit.key))

    def test_value_objective_matches_plain_forward(self, tiny):
        """The prefix-cached objective gives the log-probs of a full forward pass."""
        templates = memory.context_templates(tiny, FAST)
        texts = memory.in_contexts(REQUEST, templates)
        sequences, last = memory.encode(tiny, texts)
        reads = [(row, len(seq) - 1) for row, seq in enumerate(sequences)]
        reads += [(row, last[row]) for row in range(len(sequences))]
        delta = torch.randn(1, tiny.cfg.d_model)
        fast = memory.ValueObjective(tiny, LAYER, sequences, last, reads)(delta)
        tokens, _ = pad([torch.tensor(s) for s in sequences], 0, "right")
        hook = add_at_rows(torch.arange(len(sequences)), torch.tensor(last), delta)
        with torch.no_grad(), attached(tiny, [(f"blocks.{LAYER}.hook_mlp_out", hook)]):
            logits = tiny(tokens)
        rows, positions = zip(*reads, strict=True)
        expected = logits[list(rows), list(positions)].log_softmax(-1)
        torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)

    def test_context_templates_hold_the_prompt_slot(self, tiny):
        """Templates are "{}" and sampled prefixes ending in ". {}", as many as asked."""
        hparams = ROMEHyperParams(context_lengths=((2, 3), (4, 2)))
        templates = memory.context_templates(tiny, hparams)
        assert templates[0] == "{}" and len(templates) == 6
        assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])


class TestUndo:
    def test_revert_is_bit_exact(self, tiny, edit):
        """Reverting restores every weight bit for bit."""
        before = weights(tiny)
        handle = edit.apply(tiny)
        assert not torch.equal(tiny.blocks[LAYER].mlp.W_out, before[edit.parameter])
        handle.revert()
        assert_same_weights(tiny, before)

    def test_edited_reverts_on_exception(self, tiny, edit):
        """The context manager reverts even when its body raises."""
        before = weights(tiny)
        with pytest.raises(KeyError), edited(tiny, [edit]):
            raise KeyError("boom")
        assert_same_weights(tiny, before)

    def test_sequential_edits_revert_in_reverse_order(self, tiny, edit, stats):
        """Two stacked edits revert exactly in reverse order, and out of order is refused."""
        before = weights(tiny)
        first = edit.apply(tiny)
        request = EditRequest("{} is in", "The Louvre", "Berlin")
        second_edit = rome_edit(
            tiny, request, layer=LAYER, hparams=FAST, stats=stats, progress=False
        )
        second = second_edit.apply(tiny)
        with pytest.raises(RuntimeError, match="reverse order"):
            first.revert()
        second.revert()
        first.revert()
        assert_same_weights(tiny, before)
        with pytest.raises(RuntimeError, match="already been reverted"):
            first.revert()

    def test_rome_edit_leaves_model_untouched(self, tiny, stats):
        """Computing an edit changes no weight, leaves no hook and restores requires_grad."""
        before = weights(tiny)
        flags = [p.requires_grad for p in tiny.parameters()]
        rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert [p.requires_grad for p in tiny.parameters()] == flags

    def test_failure_mid_optimisation_leaves_model_clean(self, tiny, stats, monkeypatch):
        """An exception inside the v* loop leaves weights, hooks and grad flags as they were."""
        before = weights(tiny)
        calls = []
        original = memory.ValueObjective.__call__

        def failing(self, delta):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return original(self, delta)

        monkeypatch.setattr(memory.ValueObjective, "__call__", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert all(p.requires_grad for p in tiny.parameters())

    def test_non_finite_apply_is_refused_untouched(self, tiny):
        """An edit that would make a weight non-finite raises and writes nothing."""
        before = weights(tiny)
        delta = torch.zeros(tiny.cfg.d_mlp, tiny.cfg.d_model)
        delta[0, 0] = float("inf")
        patch = WeightPatch.for_model(
            tiny, {"blocks.0.mlp.W_out": torch.zeros_like(delta), "blocks.1.mlp.W_out": delta}
        )
        with pytest.raises(ValueError, match="non-finite"):
            patch.apply(tiny)
        assert_same_weights(tiny, before)


class TestSaving:
    def test_save_load_round_trip(self, tiny, edit, tmp_path):
        """A saved edit loads with the same tensors, request and fields, and applies identically."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        loaded = WeightEdit.load(path, model=tiny)
        assert isinstance(loaded, RankOneEdit)
        assert loaded.request == edit.request and loaded.layer == edit.layer
        assert loaded.fingerprint == edit.fingerprint and loaded.losses == edit.losses
        for name in ("left", "right", "key", "value"):
            assert torch.equal(getattr(loaded, name), getattr(edit, name))
        with edit.apply(tiny):
            expected = tiny.blocks[LAYER].mlp.W_out.clone()
        with loaded.apply(tiny):
            assert torch.equal(tiny.blocks[LAYER].mlp.W_out, expected)

    def test_load_refuses_another_model(self, edit, tmp_path):
        """An edit made on one model will not load onto a model with other weights."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        with pytest.raises(ValueError, match="another model"):
            RankOneEdit.load(path, model=rome_lens.tiny_model(seed=1))
        with pytest.raises(ValueError, match="another model"):
            edit.apply(rome_lens.tiny_model(seed=1))

    def test_corrupt_edit_file_is_reported(self, edit, tmp_path):
        """A damaged edit file raises instead of loading garbage."""
        path = edit.save(tmp_path / "eiffel.safetensors")
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(RuntimeError, match="eiffel"):
            RankOneEdit.load(path)

    def test_dense_patch_round_trip(self, tiny, tmp_path):
        """The fine-tuning result saves and loads as a WeightPatch."""
        patch = ft_edit(tiny, REQUEST, layer=LAYER, hparams=FTHyperParams(steps=3), progress=False)
        loaded = WeightEdit.load(patch.save(tmp_path / "ft.safetensors"), model=tiny)
        assert isinstance(loaded, WeightPatch) and loaded.info["method"] == "ft"
        assert torch.equal(loaded.delta["blocks.1.mlp.W_out"], patch.delta["blocks.1.mlp.W_out"])


class TestStatistics:
    def test_moment_is_mean_outer_product_of_keys(self, tiny, tmp_path):
        """C equals the float64 mean of k kᵀ over every non-BOS token of the corpus."""
        stats = key_second_moment(tiny, LAYER, corpus=TEXTS[:4], cache_dir=tmp_path, progress=False)
        keys = []
        for text in TEXTS[:4]:
            _, cache = tiny.run_with_cache(text)
            keys.append(cache[f"blocks.{LAYER}.mlp.hook_post"][0, 1:].double())
        k = torch.cat(keys)
        torch.testing.assert_close(stats.moment, k.T @ k / len(k))
        assert stats.n_tokens == len(k) and stats.moment.dtype == torch.float64

    def test_file_corpora_match_strings(self, tiny, tmp_path):
        """A .txt file (blank-line separated) and a .jsonl file give the strings' statistics."""
        texts = TEXTS[:4]
        txt, jsonl = tmp_path / "c.txt", tmp_path / "c.jsonl"
        txt.write_text("\n\n".join(texts))
        jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts))
        kwargs = {"cache_dir": tmp_path, "progress": False, "use_cache": False}
        base = key_second_moment(tiny, LAYER, corpus=texts, **kwargs)
        for path in (txt, jsonl):
            torch.testing.assert_close(
                key_second_moment(tiny, LAYER, corpus=path, **kwargs).moment, base.moment
            )

    def test_n_tokens_caps_the_sample(self, tiny, tmp_path):
        """n_tokens limits how many keys are averaged."""
        stats = key_second_moment(
            tiny, LAYER, corpus=TEXTS, n_tokens=50, cache_dir=tmp_path, progress=False
        )
        assert stats.n_tokens == 50

    def test_sampled_corpus_is_seeded(self, tiny, tmp_path):
        """With corpus=None the model's own samples are reproducible per seed."""
        kwargs = {"n_tokens": 200, "progress": False, "use_cache": False}
        a = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "a", **kwargs)
        b = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "b", **kwargs)
        c = key_second_moment(tiny, LAYER, cache_dir=tmp_path / "c", seed=1, **kwargs)
        assert torch.equal(a.moment, b.moment) and not torch.equal(a.moment, c.moment)

    def test_cache_is_reused_and_keyed_by_model(self, tiny, tmp_path, monkeypatch):
        """A second call reads the cache; another model never does."""
        from rome_lens import stats as stats_module

        first = key_second_moment(tiny, LAYER, corpus=TEXTS, cache_dir=tmp_path, progress=False)
        real = stats_module._accumulate
        monkeypatch.setattr(stats_module, "_accumulate", lambda *a: pytest.fail("recomputed"))
        again = key_second_moment(tiny, LAYER, corpus=TEXTS, cache_dir=tmp_path, progress=False)
        assert torch.equal(first.moment, again.moment)
        monkeypatch.setattr(stats_module, "_accumulate", real)
        other = key_second_moment(
            rome_lens.tiny_model(seed=1), LAYER, corpus=TEXTS, cache_dir=tmp_path, progress=False
        )
        assert other.fingerprint != first.fingerprint
        assert not torch.equal(other.moment, first.moment)

    def test_corrupt_cache_is_rebuilt(self, tiny, tmp_path):
        """A damaged cache file is reported and recomputed."""
        first = key_second_moment(tiny, LAYER, corpus=TEXTS, cache_dir=tmp_path, progress=False)
        (path,) = (tmp_path / "key_stats").glob("*.st")
        path.write_bytes(b"not a safetensors file")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            again = key_second_moment(tiny, LAYER, corpus=TEXTS, cache_dir=tmp_path, progress=False)
        assert torch.equal(first.moment, again.moment)

    def test_editing_at_a_layer_keeps_its_fingerprint(self, tiny, edit, stats):
        """Statistics stay valid for a model already edited at that layer (sequential edits)."""
        with edit.apply(tiny):
            stats.check(tiny, LAYER)


class TestBadInput:
    def test_prompt_without_placeholder(self):
        with pytest.raises(ValueError, match=r"\{\}"):
            EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome")

    @pytest.mark.parametrize("target", ["", "   "])
    def test_empty_target(self, target):
        with pytest.raises(ValueError, match="target_new"):
            EditRequest("{} is in", "The Eiffel Tower", target)

    def test_target_equal_to_truth_warns(self):
        with pytest.warns(UserWarning, match="equals the true answer"):
            EditRequest("{} is in", "The Eiffel Tower", "Paris", target_true="Paris")

    def test_subject_missing_from_prompt(self, tmp_path):
        """A CounterFact case whose prompt does not spell its subject is named in the error."""
        from rome_lens.evaluate import load_counterfact

        case = {
            "case_id": 7,
            "prompt": "The tower is in",
            "subject": "The Eiffel Tower",
            "target_new": "Rome",
            "ground_truth": "Paris",
            "rephrase_prompt": "x",
            "locality_prompt": "y",
            "locality_ground_truth": "Paris",
        }
        path = tmp_path / "cf.json"
        path.write_text(json.dumps([case]))
        with pytest.raises(ValueError, match="'The Eiffel Tower' is not in prompt"):
            load_counterfact(path)

    def test_subject_not_in_tokens_of_essence_prompt(self):
        """The KL prompt must have a slot for the subject."""
        with pytest.raises(ValueError, match="kl_prompt"):
            ROMEHyperParams(kl_prompt="Paris is a")

    @pytest.mark.parametrize("layer", [-1, 3, 1.0])
    def test_layer_out_of_range(self, tiny, layer):
        with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\)"):
            rome_edit(tiny, REQUEST, layer=layer, progress=False)

    def test_model_without_mlp(self):
        cfg = HookedTransformerConfig(
            n_layers=2, d_model=16, d_head=4, n_ctx=16, d_vocab=50, attn_only=True, act_fn="relu"
        )
        with pytest.raises(ValueError, match=r"no blocks\.0\.mlp\.W_out"):
            rome.check_layer(_hooked_transformer(cfg), 0)

    def test_statistics_from_another_layer(self, tiny, stats):
        with pytest.raises(ValueError, match="layer 1, not layer 2"):
            rome_edit(tiny, REQUEST, layer=2, stats=stats, progress=False)

    def test_statistics_from_another_model(self, stats):
        other = rome_lens.tiny_model(seed=1)
        with pytest.raises(ValueError, match="another model"):
            rome_edit(other, REQUEST, layer=LAYER, stats=stats, progress=False)

    def test_ill_conditioned_statistics_are_regularised(self, tiny, tmp_path):
        """C from fewer tokens than keys is singular: a ridge is added, warned and recorded."""
        few = key_second_moment(tiny, LAYER, corpus=TEXTS[:2], cache_dir=tmp_path, progress=False)
        assert few.n_tokens < tiny.cfg.d_mlp
        with pytest.warns(UserWarning, match="ill-conditioned"):
            edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=few, progress=False)
        assert edit.ridge > 0 and edit.condition_number > FAST.max_condition
        assert torch.isfinite(edit.left).all()

    def test_no_warning_for_good_statistics(self, tiny, stats):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            edit = rome_edit(tiny, REQUEST, layer=LAYER, hparams=FAST, stats=stats, progress=False)
        assert edit.ridge == 0


class TestFineTuning:
    def test_constraint_and_effect(self, tiny):
        """FT+L keeps every entry of ΔW within ε and lowers the target's NLL."""
        hparams = FTHyperParams(steps=10, norm_constraint=1e-2, lr=1e-2)
        patch = ft_edit(tiny, REQUEST, layer=LAYER, hparams=hparams, progress=False)
        delta = patch.delta[f"blocks.{LAYER}.mlp.W_out"]
        assert delta.abs().max() <= 1e-2 + 1e-7
        before = target_nll(tiny, [REQUEST.text], ["Rome"])
        with edited(tiny, patch):
            assert target_nll(tiny, [REQUEST.text], ["Rome"]) < before
