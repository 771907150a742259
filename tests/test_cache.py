"""The one cache-or-compute: read, verify, discard with a reason, compute, save."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from rome_lens.core import cache as cache_module
from rome_lens.core.cache import (
    cache_key,
    cached,
    hit_on_every_rank,
    load_tensors,
    read_cached,
    save_tensors,
)
from rome_lens.core.distributed import Split


def load(path: Path) -> torch.Tensor:
    return load_tensors(path)[0]["value"]


def save(path: Path, value: torch.Tensor) -> None:
    save_tensors(path, {"value": value}, {})


class Counter:
    """A computation that counts its calls."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value


class TestCached:
    def test_computes_once_then_reads(self, tmp_path):
        """The first call computes and saves; the second reads the entry back."""
        path, compute = tmp_path / "entry.st", Counter(torch.arange(4.0))
        first = cached(path, compute, load=load, save=save)
        second = cached(path, compute, load=load, save=save)
        assert compute.calls == 1 and path.exists()
        assert torch.equal(first, second)

    def test_a_corrupt_entry_is_discarded_with_its_reason_and_rebuilt(self, tmp_path):
        """A damaged entry is warned about, with what is wrong, then computed and saved again."""
        path, compute = tmp_path / "entry.st", Counter(torch.arange(4.0))
        cached(path, compute, load=load, save=save)
        path.write_bytes(b"broken")
        with pytest.warns(UserWarning, match=r"rebuilding cache entry entry\.st: .* bytes"):
            again = cached(path, compute, load=load, save=save)
        assert compute.calls == 2 and torch.equal(again, torch.arange(4.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(cached(path, compute, load=load, save=save), again)
        assert compute.calls == 2

    @pytest.mark.parametrize("error", [ValueError, KeyError, TypeError])
    def test_a_refusing_loader_means_a_rebuild(self, tmp_path, error):
        """A loader that finds the entry wrong (another model, other settings) rebuilds it."""
        path, compute = tmp_path / "entry.st", Counter(torch.ones(2))
        save(path, torch.zeros(2))

        def refuse(path: Path) -> torch.Tensor:
            raise error("another model")

        with pytest.warns(UserWarning, match="another model"):
            assert torch.equal(cached(path, compute, load=refuse, save=save), torch.ones(2))
        assert torch.equal(load(path), torch.ones(2))

    def test_without_the_cache_nothing_is_read_or_written(self, tmp_path):
        """use_cache=False computes every time and leaves the folder as it was."""
        path, compute = tmp_path / "entry.st", Counter(torch.ones(2))
        cached(path, compute, load=load, save=save, use_cache=False)
        assert compute.calls == 1 and not path.exists()
        save(path, torch.zeros(2))
        assert torch.equal(cached(path, compute, load=load, save=save, use_cache=False),
                           torch.ones(2))  # fmt: skip
        assert compute.calls == 2 and torch.equal(load(path), torch.zeros(2))


class TestRanksAgree:
    def test_one_rank_missing_makes_every_rank_compute(self, tmp_path, monkeypatch):
        """Where another rank found no entry, this one computes too, and only rank 0 saves."""
        path, compute = tmp_path / "entry.st", Counter(torch.ones(2))
        save(path, torch.zeros(2))
        monkeypatch.setattr(cache_module, "all_reduce_sum", lambda t, split: t + 1)  # a miss
        found = cached(path, compute, load=load, save=save, split=Split(rank=1, world_size=2))
        assert compute.calls == 1 and torch.equal(found, torch.ones(2))
        assert torch.equal(load(path), torch.zeros(2))  # rank 1 writes nothing
        cached(path, compute, load=load, save=save, split=Split(rank=0, world_size=2))
        assert torch.equal(load(path), torch.ones(2))  # rank 0 does

    def test_every_rank_hitting_reads(self, tmp_path):
        """With no process group, a split of one reads its entry."""
        path, compute = tmp_path / "entry.st", Counter(torch.ones(2))
        save(path, torch.zeros(2))
        assert torch.equal(cached(path, compute, load=load, save=save, split=Split()),
                           torch.zeros(2))  # fmt: skip
        assert compute.calls == 0
        assert hit_on_every_rank(True, None) and not hit_on_every_rank(False, Split())


class TestReadCached:
    def test_absent_and_corrupt_are_none(self, tmp_path):
        """No entry is None quietly; a damaged one is None with a warning, and is removed."""
        path = tmp_path / "entry.st"
        assert read_cached(path, load) is None
        save(path, torch.ones(2))
        assert torch.equal(read_cached(path, load), torch.ones(2))
        path.write_bytes(b"broken")
        with pytest.warns(UserWarning, match="rebuilding cache entry"):
            assert read_cached(path, load) is None
        assert not path.exists() and not path.with_suffix(".st.json").exists()


class TestCacheKey:
    def test_the_digest_of_the_parts_as_json(self):
        """The names cache entries had before the helper: sha256 of the JSON list of parts."""
        parts = (["blocks.1.mlp.W_out"], "abc", 400, {"b": 1, "a": 2})
        text = json.dumps(list(parts), sort_keys=True)
        assert cache_key(*parts, length=16) == hashlib.sha256(text.encode()).hexdigest()[:16]
        assert len(cache_key("x")) == 24
        assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
        assert cache_key(1, 2) != cache_key(2, 1)
