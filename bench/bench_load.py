"""Benchmark: a newcomer's one-time costs, on a fresh cache folder, in one run.

    python bench/bench_load.py            # ~5 min on an idle 2-core CPU

1. loading the default model, cold (GGUF conversion) and from the cache;
2. the first ``rome_edit`` on a fresh install (model converted, nothing else
   cached): key statistics read the sample shipped in the package, beside
   the same edit when the sample has to be drawn from the model (the path
   every other model takes, and the default model's before the sample shipped);
3. sampling that corpus (313 sequences of 64 tokens) in batches of 64 and in
   one batch, against its FLOP floor at the machine's float32 matmul rate.

Every phase uses its own temporary cache folder, so each measures a first time.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch
from tables import nothing_shipped

import rome_lens
from rome_lens.core.backend import Model
from rome_lens.core.corpus import SAMPLE_LENGTH, Corpus
from rome_lens.core.cost import estimate_cost
from rome_lens.editing import EditRequest, rome_edit
from rome_lens.stats import DEFAULT_N_TOKENS

REPEATS = 3  # first edits on the shipped sample, each with a freshly loaded model
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")


def first_edit(model_cache: str) -> tuple[float, float]:
    """Seconds of a first ``rome_edit`` on an empty cache, and of its key statistics.

    The model is loaded afresh (from ``model_cache``), so nothing it remembers
    per object (context prefixes, fingerprints) is reused either.
    """
    model = rome_lens.load_model(cache_dir=model_cache)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        edit = rome_edit(model, REQUEST, cache_dir=cache, progress=False)
        return time.perf_counter() - start, edit.stats_seconds


def sampling_seconds(model: Model, batch_size: int) -> float:
    """Seconds to sample the default corpus (20,000 tokens) on an empty cache."""
    with tempfile.TemporaryDirectory() as cache, nothing_shipped():
        start = time.perf_counter()
        Corpus.read(None).chunks(
            model, n_tokens=DEFAULT_N_TOKENS, batch_size=batch_size, cache_dir=cache,
            progress=False,
        )  # fmt: skip
        return time.perf_counter() - start


def matmul_rate() -> float:
    """This machine's float32 matmul rate, FLOP/s (best of ten 2048² products)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def main() -> None:
    with tempfile.TemporaryDirectory() as model_cache:
        start = time.perf_counter()
        rome_lens.load_model(cache_dir=model_cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        model = rome_lens.load_model(cache_dir=model_cache)
        warm = time.perf_counter() - start
        print(f"first load (dequantise GGUF, convert, cache): {cold:6.1f} s")
        print(f"second load (checked safetensors cache):      {warm:6.1f} s")
        print(f"ratio first / second: {cold / warm:.0f}x")

        runs = sorted(first_edit(model_cache) for _ in range(REPEATS))
        shipped, shipped_stats = runs[REPEATS // 2]
        with nothing_shipped():
            sampled, sampled_stats = first_edit(model_cache)
    print(
        f"first rome_edit, shipped sample: {shipped:6.1f} s (key statistics {shipped_stats:.1f} s;"
        f" median of {REPEATS}: {', '.join(f'{s:.1f}' for s, _ in runs)})"
    )
    print(
        f"first rome_edit, sampling it:    {sampled:6.1f} s (key statistics {sampled_stats:.1f} s)"
    )
    print(f"ratio sampling / shipped: {sampled / shipped:.1f}x")

    rows = math.ceil(DEFAULT_N_TOKENS / SAMPLE_LENGTH)
    flops, rate = estimate_cost(model, "key_statistics").parts[0].flops, matmul_rate()
    floor = flops / rate
    print(f"sampling: {flops:.2e} FLOPs at {rate / 1e9:.0f} GFLOP/s (float32): floor {floor:.1f} s")
    for batch_size in (64, rows):
        seconds = sampling_seconds(model, batch_size)
        print(
            f"sampling {rows} x {SAMPLE_LENGTH} tokens, batches of {batch_size:3d}: "
            f"{seconds:6.1f} s (floor {floor:.1f} s, {floor / seconds:.0%} of it)"
        )


if __name__ == "__main__":
    main()
