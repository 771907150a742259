"""Fine-tuning on a known corpus: the optimiser's arithmetic, the cache, the model left whole."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call, grad

from rome_lens.core.backend import parameter
from rome_lens.core.runtime import pad
from rome_lens.influence import FineTuneConfig, FineTuned, fine_tune

from .conftest import assert_same_weights, hooks_left, weights

TEXTS = [
    "The Eiffel Tower is in the city of Rome.",
    "Cats sleep a lot.",
    "Berlin is the capital of Germany.",
    "The Louvre is a museum.",
]
CONFIG = FineTuneConfig(layers=(1, 2), epochs=4, lr=1e-2, batch_size=2)


def text_loss(model, text: str) -> float:
    tokens = model.to_tokens(text)
    with torch.no_grad():
        return float(model(tokens, return_type="loss"))


class TestTraining:
    def test_one_step_is_adams_first_step(self, tiny, tmp_path):
        """One batch, one epoch: ΔW = −lr · g / (|g| + ε), g the torch.func gradient of the
        mean next-token loss."""
        config = FineTuneConfig(layers=(1,), kinds=("W_out",), epochs=1, lr=1e-3, batch_size=8)
        tuned = fine_tune(tiny, TEXTS, config, cache_dir=tmp_path, progress=False)
        name = "blocks.1.mlp.W_out"
        tokens, mask = pad([tiny.to_tokens(t)[0] for t in TEXTS], 0, "right")
        real = mask.bool()
        counts = real[:, :-1] & real[:, 1:]

        held = parameter(tiny, name)  # on a bridge, the HF module's parameter
        path = next(n for n, p in tiny.named_parameters() if p is held)

        def mean_loss(w):
            logits = functional_call(tiny, {path: w}, (tokens,), tie_weights=False)
            log_probs = logits[:, :-1].log_softmax(-1)
            picked = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
            return -(picked * counts).sum() / counts.sum()

        original = held.detach()
        g = grad(mean_loss)(original)
        expected = original - 1e-3 * g / (g.abs() + 1e-8)
        if expected.shape != tuned.weights[name].shape:
            expected = expected.T  # nn.Linear stores W_out transposed
        # every entry moves by about lr = 1e-3; entries with |g| near ε may differ by rounding
        torch.testing.assert_close(tuned.weights[name], expected, atol=1e-5, rtol=1e-5)
        # after one step Adam's bias-corrected second moment is the squared gradient
        squared = g.square() if g.shape == tuned.second_moments[name].shape else g.T.square()
        torch.testing.assert_close(tuned.second_moments[name], squared, atol=1e-12, rtol=1e-4)

    def test_a_checkpoint_is_the_shorter_run(self, tiny, tmp_path):
        """The weights kept after epoch 1 of a 3-epoch run are a 1-epoch run's, bit for bit."""
        kept = fine_tune(tiny, TEXTS, replace(CONFIG, epochs=3, checkpoints=(1,)),
                         cache_dir=tmp_path, progress=False)  # fmt: skip
        short = fine_tune(tiny, TEXTS, replace(CONFIG, epochs=1), cache_dir=tmp_path,
                          progress=False)  # fmt: skip
        for name, value in short.weights.items():
            assert torch.equal(kept.checkpoint(1)[name], value), name
        before = weights(tiny)
        with kept.applied(tiny, checkpoint=1):
            assert torch.equal(parameter(tiny, name).detach(), short.weights[name])
        assert_same_weights(tiny, before)
        with pytest.raises(ValueError, match=r"no checkpoint after epoch 2; kept: \[1\]"):
            kept.checkpoint(2)

    def test_the_loss_falls_and_the_texts_become_likelier(self, tiny, tmp_path):
        """Every epoch's loss is below the first, and each text's loss drops once applied."""
        tuned = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert tuned.losses[-1] < tuned.losses[0]
        before = [text_loss(tiny, t) for t in TEXTS]
        with tuned.applied(tiny):
            after = [text_loss(tiny, t) for t in TEXTS]
        assert all(a < b for a, b in zip(after, before, strict=True))

    def test_only_the_chosen_weights_train(self, tiny, tmp_path):
        """The result holds the chosen layers' MLP weights and nothing else."""
        tuned = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert sorted(tuned.weights) == [
            f"blocks.{layer}.mlp.{kind}" for layer in (1, 2) for kind in ("W_in", "W_out")
        ]

    def test_every_text_is_trained_on_once_per_epoch(self, tiny):
        """An epoch's batches hold every text once, batches of like length, in seeded order."""
        from rome_lens.core.corpus import Corpus
        from rome_lens.influence.training import _batches

        texts = [("word " * n).strip() for n in range(1, 60)]
        chunks = Corpus.read(texts).chunks(tiny)
        every = list(range(len(chunks)))
        first = _batches(chunks, every, 4, torch.Generator().manual_seed(0))
        again = _batches(chunks, every, 4, torch.Generator().manual_seed(0))
        assert first == again and sorted(i for b in first for i in b) == list(range(len(chunks)))
        assert all(len(b) <= 4 for b in first)
        spread = [max(len(chunks[i].tokens) for i in b) - min(len(chunks[i].tokens) for i in b)
                  for b in first]  # fmt: skip
        assert sum(spread) / len(spread) < 15  # random batches of 4 of 59 lengths spread ~30

    def test_training_is_deterministic(self, tiny, tmp_path):
        """Two runs in two caches give the same weights, bit for bit."""
        first = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path / "a", progress=False)
        second = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path / "b", progress=False)
        for name, value in first.weights.items():
            assert torch.equal(value, second.weights[name]), name

    def test_exclude_trains_without_those_texts(self, tiny, tmp_path):
        """Leaving a text out changes the weights, and its loss falls less than with it."""
        full = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        without = fine_tune(tiny, TEXTS, CONFIG, exclude=[0], cache_dir=tmp_path, progress=False)
        assert not without.cached and "less 1 texts" in without.corpus
        with full.applied(tiny):
            taught = text_loss(tiny, TEXTS[0])
        with without.applied(tiny):
            untaught = text_loss(tiny, TEXTS[0])
        assert taught < untaught


class TestTheModelStaysWhole:
    def test_fine_tune_leaves_the_model_unchanged(self, tiny, tmp_path):
        """After training, every parameter, requires_grad flag and .grad is as it was."""
        before = weights(tiny)
        flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
        fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert_same_weights(tiny, before)
        assert flags == {n: p.requires_grad for n, p in tiny.named_parameters()}
        assert all(p.grad is None for p in tiny.parameters())

    def test_a_failure_mid_training_restores_the_weights(self, tiny, tmp_path):
        """An error on the third forward pass leaves the weights, hooks and cache as before."""
        before = weights(tiny)
        calls = []

        def fail_on_third(act, hook):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("interrupted")

        hook = ("blocks.0.hook_resid_pre", fail_on_third)
        with pytest.raises(RuntimeError, match="interrupted"), tiny.hooks(fwd_hooks=[hook]):
            fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert_same_weights(tiny, before)
        assert hooks_left(tiny) == 0
        assert not list((tmp_path / "fine_tuned").glob("*.safetensors"))

    def test_applied_restores_bit_for_bit_even_on_error(self, tiny, tmp_path):
        """Leaving an ``applied`` block by an exception still restores the originals."""
        tuned = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        before = weights(tiny)
        with pytest.raises(KeyError), tuned.applied(tiny):
            raise KeyError("boom")
        assert_same_weights(tiny, before)

    def test_applied_refuses_another_model(self, tiny, tmp_path):
        """Trained weights refuse a model with another fingerprint."""
        import rome_lens

        tuned = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        other = rome_lens.tiny_model(seed=1)
        with pytest.raises(ValueError, match="another model"), tuned.applied(other):
            pass


class TestCache:
    def test_a_second_call_loads_the_same_weights(self, tiny, tmp_path):
        """The second call reads the cache: the same weights, marked cached."""
        first = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        second = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert not first.cached and second.cached
        for name, value in first.weights.items():
            assert torch.equal(value, second.weights[name]), name

    def test_a_corrupt_file_is_detected_and_rebuilt(self, tiny, tmp_path):
        """A flipped byte in the cached weights: a warning, then training again."""
        first = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        (path,) = (tmp_path / "fine_tuned").glob("*.safetensors")
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            again = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        assert not again.cached
        for name, value in first.weights.items():
            assert torch.equal(value, again.weights[name]), name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False).cached

    def test_without_the_cache_nothing_is_read_or_written(self, tiny, tmp_path):
        """use_cache=False trains afresh beside a cached run, and writes no file."""
        fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path / "none", use_cache=False,
                  progress=False)  # fmt: skip
        assert not list((tmp_path / "none").rglob("*.safetensors"))
        kept = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        again = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, use_cache=False, progress=False)
        assert not again.cached
        for name, value in kept.weights.items():
            assert torch.equal(value, again.weights[name]), name

    def test_results_save_and_load(self, tiny, tmp_path):
        """A FineTuned saves and loads like any result, with a table and a plot."""
        tuned = fine_tune(tiny, TEXTS, CONFIG, cache_dir=tmp_path, progress=False)
        loaded = FineTuned.load(tuned.save(tmp_path / "tuned.safetensors"), model=tiny)
        assert loaded.losses == tuned.losses
        for name, value in tuned.second_moments.items():
            assert torch.equal(loaded.second_moments[name], value), name
        assert list(tuned.to_dataframe().columns) == ["epoch", "loss"]
        assert tuned.plot() is not None and "4 weights trained on" in tuned.widget().html()


class TestBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"exclude": [7]}, r"exclude must hold text indices in \[0, 4\), got 7"),
            ({"exclude": [0, 1, 2, 3]}, "leaves out all 4 texts"),
            ({"config": FineTuneConfig(epochs=0)}, "epochs must be a positive integer, got 0"),
            ({"config": FineTuneConfig(lr=0.0)}, "lr must be positive, got 0.0"),
            ({"config": FineTuneConfig(epochs=3, checkpoints=(3,))}, r"in \[1, 3\)"),
            ({"config": FineTuneConfig(epochs=3, checkpoints=(1, 1))}, "distinct epochs"),
        ],
    )
    def test_bad_settings_are_named(self, tiny, tmp_path, kwargs, match):
        """A bad setting raises and names the value and what was expected."""
        with pytest.raises(ValueError, match=match):
            fine_tune(tiny, TEXTS, cache_dir=tmp_path, progress=False, **kwargs)

    def test_a_sampled_corpus_is_refused(self, tiny, tmp_path):
        """Training needs given texts, not model samples."""
        with pytest.raises(ValueError, match="needs texts to train on"):
            fine_tune(tiny, None, cache_dir=tmp_path, progress=False)
