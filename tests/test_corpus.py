"""The default corpus: the sample shipped for the default model, row-seeded sampling, threads."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import rome_lens
from rome_lens.core import corpus as corpus_module
from rome_lens.core import distributed
from rome_lens.core.corpus import (
    SAMPLE_LENGTH,
    Corpus,
    shipped_sample,
    write_shipped_sample,
)
from rome_lens.core.distributed import Split, share_cores
from rome_lens.core.fingerprint import model_fingerprint
from rome_lens.stats import DEFAULT_N_TOKENS

TINY_LENGTH = 63  # tokens per sampled row of the tiny model (n_ctx 64, start token first)
ROWS = 16  # rows of the default model's sample compared by likelihood
SHUFFLED = torch.randperm(SAMPLE_LENGTH + 1, generator=torch.Generator().manual_seed(0))


def rows(chunks) -> list[list[int]]:
    """Each chunk's token ids."""
    return [c.tokens.tolist() for c in chunks]


def sample(model, tmp_path: Path, n_tokens: int, **kwargs) -> list[list[int]]:
    """The sampled corpus of ``n_tokens``, read (or drawn) into a fresh cache folder."""
    chunks = Corpus.read(None).chunks(
        model, n_tokens=n_tokens, cache_dir=tmp_path / "cache", progress=False, **kwargs
    )
    return rows(chunks)


def cached_samples(tmp_path: Path) -> list[Path]:
    """The sampled corpora cached under ``tmp_path`` by :func:`sample`."""
    return sorted((tmp_path / "cache" / "samples").glob("*.st"))


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch) -> Path:
    """An empty folder of shipped samples, in place of the package's."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(corpus_module, "SHIPPED_SAMPLES", folder)
    return folder


def named_tiny(seed: int) -> rome_lens.core.backend.Model:
    """A tiny model under the name the test's shipped file is written for."""
    model = rome_lens.tiny_model(seed=seed)
    model.cfg.model_name = "tiny-shipped"
    return model


class TestRowSeededSampling:
    def test_rows_do_not_depend_on_the_batch_size(self, tiny, tmp_path, shipped_dir):
        """Each row reads its own uniforms: batches of 2 and of 64 sample the same text."""
        small = sample(tiny, tmp_path / "a", 600, batch_size=2)
        large = sample(tiny, tmp_path / "b", 600, batch_size=64)
        assert small == large

    def test_a_shorter_sample_is_a_prefix_of_a_longer_one(self, tiny, tmp_path, shipped_dir):
        """The first rows of a 1,000-token sample are the 300-token sample."""
        short = sample(tiny, tmp_path / "a", 300)
        long = sample(tiny, tmp_path / "b", 1_000)
        assert len(long) > len(short) and long[: len(short)] == short

    def test_the_seed_changes_the_text(self, tiny, tmp_path, shipped_dir):
        """Another seed, other rows."""
        assert sample(tiny, tmp_path / "a", 300) != sample(tiny, tmp_path / "b", 300, seed=1)

    def test_generator_and_uniforms_are_exclusive(self, tiny):
        """sample_tokens takes one source of randomness, and uniforms of the right shape."""
        from rome_lens.core.generation import sample_tokens

        prompts = torch.ones(2, 1, dtype=torch.long)
        with pytest.raises(ValueError, match="exactly one of generator= and uniforms="):
            sample_tokens(tiny, prompts, 3)
        with pytest.raises(ValueError, match=r"uniforms must be \[2, 3\]"):
            sample_tokens(tiny, prompts, 3, uniforms=torch.rand(3, 2))


class TestShippedSample:
    def test_a_shipped_sample_is_read_not_sampled(self, tmp_path, shipped_dir):
        """A model whose fingerprint the shipped file names reads its rows; nothing is cached."""
        model = named_tiny(0)
        expected = sample(model, tmp_path / "fresh", 640)  # what sampling gives
        write_shipped_sample(model, shipped_dir / "tiny.st", n_tokens=640, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read = sample(model, tmp_path, 300)
        assert read == expected[: len(read)] and cached_samples(tmp_path) == []

    def test_rows_beyond_the_shipped_ones_are_sampled_and_cached(
        self, tmp_path, shipped_dir, monkeypatch
    ):
        """A larger request reads the shipped rows and samples only the rest, as sampling would."""
        model = named_tiny(0)
        write_shipped_sample(model, shipped_dir / "tiny.st", n_tokens=320, progress=False)
        drawn: list[range] = []
        sample_rows = corpus_module._sample_rows
        monkeypatch.setattr(
            corpus_module, "_sample_rows", lambda m, r, *a: drawn.append(r) or sample_rows(m, r, *a)
        )
        extended = sample(model, tmp_path / "a", 1_000)
        assert drawn == [range(6, 16)]  # 6 rows shipped, 16 asked for
        assert len(cached_samples(tmp_path / "a")) == 1
        (shipped_dir / "tiny.st").unlink()
        assert extended == sample(model, tmp_path / "b", 1_000)

    def test_another_model_of_that_name_samples_and_says_so(self, tmp_path, shipped_dir):
        """Other weights under the shipped name: sampling says why, naming the fingerprint."""
        write_shipped_sample(named_tiny(0), shipped_dir / "tiny.st", n_tokens=320, progress=False)
        other = named_tiny(1)
        assert shipped_sample(other, 0, TINY_LENGTH) is None
        with pytest.warns(UserWarning, match=f"this model's is {model_fingerprint(other)}"):
            assert len(sample(other, tmp_path, 320)) == 6  # rows of TINY_LENGTH
        assert len(cached_samples(tmp_path)) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # read from the cache: nothing sampled, nothing said
            assert len(sample(other, tmp_path, 320)) == 6

    def test_a_corrupt_shipped_file_is_ignored(self, tmp_path, shipped_dir):
        """A file that fails its checksum is named in a warning and the model samples."""
        model = named_tiny(0)
        path = write_shipped_sample(model, shipped_dir / "tiny.st", n_tokens=320, progress=False)
        data = bytearray(path.read_bytes())
        data[-8] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.warns(UserWarning, match="the shipped sample tiny.st is unreadable"):
            assert len(sample(model, tmp_path, 320)) == 6
        assert len(cached_samples(tmp_path)) == 1

    def test_other_models_and_seeds_are_not_served(self, tiny, tmp_path, shipped_dir):
        """Another model, or another seed, finds no shipped rows and no warning."""
        write_shipped_sample(named_tiny(0), shipped_dir / "tiny.st", n_tokens=320, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert shipped_sample(rome_lens.tiny_model(seed=2), 0, TINY_LENGTH) is None
            assert shipped_sample(named_tiny(0), 1, TINY_LENGTH) is None


class TestDefaultModelSample:
    @pytest.fixture(scope="class")
    def default(self):
        """The default model as load_model() gives it (no BOS)."""
        return rome_lens.load_model()

    def test_the_package_ships_the_default_models_sample(self, default, smol):
        """Both BOS settings of the default model match the shipped file: 20,000 tokens."""
        for model in (default, smol):
            tokens = shipped_sample(model, 0, SAMPLE_LENGTH)
            assert tokens is not None, model_fingerprint(model)
            assert tokens.shape == (-(-DEFAULT_N_TOKENS // SAMPLE_LENGTH), SAMPLE_LENGTH + 1)

    def test_the_default_corpus_is_read_from_it(self, default, smol, tmp_path):
        """The default corpus comes from the package: nothing sampled, BOS as the model reads."""
        no_bos = sample(default, tmp_path, DEFAULT_N_TOKENS)
        with_bos = sample(smol, tmp_path, DEFAULT_N_TOKENS)
        assert cached_samples(tmp_path) == []
        assert [row[1:] for row in with_bos] == no_bos
        assert {row[0] for row in with_bos} == {smol.tokenizer.bos_token_id}

    def test_its_rows_read_like_the_models_own_samples(self, default):
        """The shipped rows are as likely under the model as rows it samples now (per-token NLL)."""
        from rome_lens.core.corpus import _sample_rows

        shipped = shipped_sample(default, 0, SAMPLE_LENGTH)
        assert shipped is not None
        fresh = _sample_rows(default, range(ROWS), 1, SAMPLE_LENGTH, ROWS, False)  # another seed
        nll = {name: per_token_nll(default, rows) for name, rows in
               (("shipped", shipped[:ROWS]), ("fresh", fresh),
                ("shuffled", shipped[:ROWS, SHUFFLED]))}  # fmt: skip
        assert abs(nll["shipped"] - nll["fresh"]) < 0.15 * nll["fresh"], nll
        assert nll["shuffled"] > 1.5 * nll["fresh"], nll


def per_token_nll(model, rows: torch.Tensor) -> float:
    """Mean negative log-likelihood of each token after the first, in nats."""
    with torch.inference_mode():
        logits = model(rows, return_type="logits").float()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, rows[:, 1:, None])
    return float(-logprobs.mean())


class TestShareCores:
    @pytest.fixture
    def eight_cores(self, monkeypatch):
        """Eight cores, torch at eight threads as it started, and cores not yet shared."""
        previous = torch.get_num_threads()
        monkeypatch.setattr(distributed, "_cores", lambda: 8)
        monkeypatch.setattr(distributed, "_THREADS_AT_IMPORT", 8)
        monkeypatch.setattr(distributed, "_CORES_SHARED", False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        torch.set_num_threads(8)
        yield
        torch.set_num_threads(previous)

    def test_ranks_on_one_machine_share_its_cores(self, eight_cores):
        """Four ranks on eight cores run two threads each."""
        assert share_cores(Split(rank=1, world_size=4)) == 2
        assert torch.get_num_threads() == 2

    def test_one_process_keeps_its_threads(self, eight_cores):
        """No split, no change."""
        assert share_cores(Split()) == 8

    def test_omp_num_threads_wins(self, eight_cores, monkeypatch):
        """OMP_NUM_THREADS is the user's choice (or torchrun's): left as it is."""
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        assert share_cores(Split(rank=0, world_size=4)) == 8

    def test_a_count_set_after_import_wins(self, eight_cores):
        """torch.set_num_threads after importing rome_lens is the user's choice."""
        torch.set_num_threads(6)
        assert share_cores(Split(rank=0, world_size=4)) == 6

    def test_once_per_process(self, eight_cores):
        """The first split sets the count; a later one leaves a count the user set since."""
        assert share_cores(Split(rank=0, world_size=4)) == 2
        torch.set_num_threads(3)
        assert share_cores(Split(rank=0, world_size=4)) == 3

    def test_a_local_rendezvous_counts_every_rank(self, eight_cores, monkeypatch):
        """Without LOCAL_WORLD_SIZE, a MASTER_ADDR on this machine puts all ranks here."""
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        assert share_cores(Split(rank=0, world_size=2)) == 4

    def test_a_remote_rendezvous_without_local_ranks_changes_nothing(
        self, eight_cores, monkeypatch
    ):
        """Ranks spread over machines, their count here unknown: the threads stay."""
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
        assert share_cores(Split(rank=0, world_size=2)) == 8

    def test_a_bad_local_world_size_is_named(self, eight_cores, monkeypatch):
        """LOCAL_WORLD_SIZE that is not a positive integer is refused, naming it."""
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
        with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be a positive integer"):
            share_cores(Split(rank=0, world_size=2))

    def test_split_of_shares_the_cores(self, eight_cores, monkeypatch):
        """Split.of, the entry every distributed computation takes, shares them."""
        monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
        monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
        assert Split.of(None) == Split(rank=0, world_size=4)
        assert torch.get_num_threads() == 2
