"""Benchmark: loading the default model, cold (GGUF conversion) and from the cache.

    python bench/bench_load.py

Uses a fresh temporary cache folder, so it measures the conversion every time.
"""

from __future__ import annotations

import tempfile
import time

import rome_lens


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        rome_lens.load_model(cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        rome_lens.load_model(cache_dir=cache)
        warm = time.perf_counter() - start
    print(f"first load (dequantise GGUF, convert, cache): {cold:6.1f} s")
    print(f"second load (checked safetensors cache):      {warm:6.1f} s")
    print(f"ratio first / second: {cold / warm:.0f}x")


if __name__ == "__main__":
    main()
