"""Benchmark: the cost model's predictions against measurements on the default model.

    python bench/bench_cost.py                        # every piece (~45 min on 2 cores)
    python bench/bench_cost.py --only rome_edit --only memit

For each piece, ``rome_lens.estimate_cost`` predicts FLOPs and peak memory from
the model's shape; the piece is then run on the CPU and timed, and its peak
resident memory measured:

* ``key_statistics``: C of ROME's default layer, in a fresh cache, the
  20,000-token corpus sampled too (the shipped sample hidden, as on a first
  edit of any model but the default one);
* ``rome_edit``: one CounterFact edit, its key statistics already cached (the
  time excludes loading them, the memory includes it);
* ``memit``: 10 CounterFact edits in one batch over the default layers, key
  statistics cached, targets z not;
* ``ekfac_factors``: EK-FAC factors of two layers over the default sampled
  corpus, in a fresh cache, sampling included;
* ``scan``: one query scored over paragraphs of CounterFact facts with those
  factors (loaded inside the measured window).

Three predictions are compared with what the run does:

* **FLOPs**: the matmul steps' FLOPs against ``torch.utils.flop_counter``'s
  count over the whole run (LAPACK work, which torch does not count, is left
  out of both).
* **Memory**: ``Cost.peak_memory_bytes`` against the high-water mark of
  resident memory above the memory resident before the piece (``VmHWM`` reset
  through ``/proc/self/clear_refs``). Each piece runs in a fresh process, after
  the model is loaded and has run once.
* **Time**: the predicted FLOPs over the machine's float32 and float64 matmul
  rates, measured first on the shapes the default model multiplies most (a
  batch of tokens through ``W_in``, and the float64 ``xᵀx`` of key
  statistics), against the measured seconds. This is the compute floor, and
  the ratio says how close to it the run comes (the FLOP counter's own
  dispatch overhead included); a second prediction adds a fixed cost per
  block call, measured on a one-token forward pass.

δ's optimisation stops early by a data-dependent rule, so the edits are costed
at the mean number of steps their requests really took; request and text
lengths are the real ones too. The table is printed and written to
``--out``/cost_model.csv. The script exits with status 1 when the ratio of
FLOPs or of memory falls outside [0.7, 1.3].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from tables import nothing_shipped, peak_mib, report, reset_peak
from torch.utils.flop_counter import FlopCounterMode

import rome_lens
from rome_lens.core.cache import cache_dir
from rome_lens.core.cost import BUILTIN_SHAPES, Cost, Throughput, estimate_cost, forward_flops
from rome_lens.core.runtime import run_to_layer
from rome_lens.core.tokens import target_token_ids
from rome_lens.editing import (
    EditRequest,
    default_layer,
    default_memit_layers,
    memit_edit,
    memory,
    rome_edit,
)
from rome_lens.evaluation import load_counterfact_sample, without_conflicts
from rome_lens.influence import fit_influence_factors, influence
from rome_lens.stats import key_second_moment

HERE = Path(__file__).resolve().parent
PIECES = ("key_statistics", "rome_edit", "memit", "ekfac_factors", "scan")
BOUNDS = (0.7, 1.3)  # predicted / measured, for FLOPs and for memory
MEMIT_REQUESTS = 10
EKFAC_LAYERS = [2, 3]
FACTS_PER_TEXT = 8  # CounterFact sentences joined into one scanned paragraph
N_TEXTS = 32
QUERY = ("The Eiffel Tower is located in the city of", " Paris")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PIECES, action="append")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", choices=(*PIECES, "stats"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rates", type=float, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--model-cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rates = Throughput(args.rates[0], float64=args.rates[1])
        print(json.dumps(run_piece(args.child, args.cache, rates, args.model_cache, args.count)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    float32, float64 = matmul_rates()
    print(f"matmul rates: float32 {float32 / 1e9:.1f} GFLOP/s, float64 {float64 / 1e9:.1f} GFLOP/s")
    pieces = args.only or list(PIECES)
    rows = []
    with (
        tempfile.TemporaryDirectory() as fresh_cache,  # key statistics computed from nothing
        tempfile.TemporaryDirectory() as stats_cache,  # those ROME and MEMIT read
        tempfile.TemporaryDirectory() as fit_cache,  # the factors the scan reads
    ):
        caches = {"key_statistics": fresh_cache, "ekfac_factors": fit_cache, "scan": fit_cache}
        if {"rome_edit", "memit"} & set(pieces):  # their key statistics, computed beforehand
            child("stats", Path(stats_cache), (float32, float64))
        if "scan" in pieces and "ekfac_factors" not in pieces:  # the factors it scores with
            child("ekfac_factors", Path(fit_cache), (float32, float64))
        for piece in pieces:
            cache = Path(caches.get(piece, stats_cache))
            with tempfile.TemporaryDirectory() as copy:  # the same cache, for the counted run
                shutil.copytree(cache, copy, dirs_exist_ok=True)
                row = child(piece, cache, (float32, float64))
                counted = child(piece, Path(copy), (float32, float64), count=True)
            rows.append(row | {"counted_flops": counted["counted_flops"]})
    table = ratios(pd.DataFrame(rows))
    report(args.out, "cost_model", table)
    outside = table[
        ~table["flops_ratio"].between(*BOUNDS) | ~table["memory_ratio"].between(*BOUNDS)
    ]
    if len(outside):
        sys.exit(f"predictions outside {list(BOUNDS)} for: {', '.join(outside['piece'])}")


# --------------------------------------------------------------------------- the machine


def matmul_rates(seconds: float = 2.0) -> tuple[float, float]:
    """FLOP/s of float32 and float64 matmuls of the default model's most common shapes."""
    shape = BUILTIN_SHAPES["smollm2-135m"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(64 * 64, shape.d_model, generator=generator)  # a batch through W_in
    w_in = torch.randn(shape.d_model, shape.d_mlp, generator=generator)
    keys = torch.randn(64 * 64, shape.d_mlp, generator=generator, dtype=torch.float64)
    float32 = rate(
        lambda: tokens @ w_in, 2.0 * tokens.shape[0] * shape.d_model * shape.d_mlp, seconds
    )
    float64 = rate(lambda: keys.T @ keys, 2.0 * keys.shape[0] * shape.d_mlp**2, seconds)
    return float32, float64


def rate(matmul, flops: float, seconds: float) -> float:
    """The best FLOP/s of ``matmul`` over about ``seconds`` of repeats (after a warm-up)."""
    matmul()
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - started)
    return flops / best


def block_call_seconds(model, rates: Throughput) -> float:
    """The fixed cost of calling one block: a one-token forward pass, less its FLOPs' time."""
    tokens = model.to_tokens("The", prepend_bos=False)[:, :1]
    with torch.inference_mode():
        run_to_layer(model, tokens, model.cfg.n_layers)
        started = time.perf_counter()
        for _ in range(20):
            run_to_layer(model, tokens, model.cfg.n_layers)
        elapsed = (time.perf_counter() - started) / 20
    compute = forward_flops(model, 1, context=1) / rates.model
    return max(elapsed - compute, 0.0) / model.cfg.n_layers


# --------------------------------------------------------------------------- the pieces


def child(
    piece: str, cache: Path, rates: tuple[float, float], count: bool = False
) -> dict[str, object]:
    """Run one piece in a fresh process (its own peak memory) and read its JSON row.

    With ``count`` the piece runs under torch's FLOP counter instead, which holds
    tensors of its own and slows every op: its memory and time are not the piece's.
    """
    command = [sys.executable, __file__, "--child", piece, "--cache", str(cache),
               "--rates", str(rates[0]), str(rates[1]),
               "--model-cache", str(cache_dir())]  # the converted model, as it is  # fmt: skip
    command += ["--count"] if count else []
    env = os.environ | {"ROME_LENS_CACHE": str(cache)}  # every other cache read: the fresh one
    # A fixed mmap threshold stops glibc from raising it after each large free and then
    # serving tensors from a heap it keeps resident: freed tensors go back to the system,
    # and the resident high-water mark follows the tensors held, not the allocator's reuse.
    env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the {piece} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_piece(
    piece: str, cache: Path, rates: Throughput, model_cache: Path, count: bool = False
) -> dict[str, object]:
    """Load the model, run ``piece`` once, and return its measured and predicted costs."""
    torch.manual_seed(0)
    model = rome_lens.load_model(cache_dir=model_cache)
    with torch.inference_mode():
        model(model.to_tokens("The Eiffel Tower is located in"))
    if piece == "stats":  # not measured: the statistics ROME and MEMIT then read
        for layer in sorted({default_layer(model), *default_memit_layers(model)}):
            key_second_moment(model, layer, cache_dir=cache, progress=False)
        return {}
    overhead = block_call_seconds(model, rates)
    run = {"key_statistics": key_statistics, "rome_edit": rome, "memit": memit,
           "ekfac_factors": ekfac, "scan": scan}[piece]  # fmt: skip
    if count:
        with FlopCounterMode(display=False) as counter:
            run(model, cache)
        return {"counted_flops": counter.get_total_flops()}
    before = reset_peak()
    seconds, cost = run(model, cache)
    measured_mib = peak_mib() - before
    with_overhead = dataclasses.replace(rates, seconds_per_block_call=overhead)
    return {
        "piece": piece,
        "flops": cost.flops,
        "predicted_matmul_flops": cost.matmul_flops,
        "predicted_s": round(cost.seconds(rates), 2),
        "measured_s": round(seconds, 2),
        "predicted_s_with_calls": round(cost.seconds(with_overhead), 2),
        "predicted_MiB": round(cost.peak_memory_bytes / 2**20),
        "measured_MiB": measured_mib,
        "block_call_ms": round(overhead * 1e3, 3),
        "settings": describe(cost),
    }


def key_statistics(model, cache: Path) -> tuple[float, Cost]:
    """C of ROME's layer over 20,000 sampled tokens, sampling included."""
    layer = default_layer(model)
    started = time.perf_counter()
    with nothing_shipped():  # the default model's sample ships; every other model samples
        key_second_moment(model, layer, cache_dir=cache, progress=False)
    return time.perf_counter() - started, estimate_cost(model, "key_statistics", layer=layer)


def rome(model, cache: Path) -> tuple[float, Cost]:
    """One edit; its time without loading the statistics, its memory with."""
    request = edit_requests(model, 1)[0]
    started = time.perf_counter()
    edit = rome_edit(model, request, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - started - edit.stats_seconds
    sizes = request_sizes(model, [request])
    return seconds, estimate_cost(model, "rome_edit", v_steps=len(edit.losses), **sizes)


def memit(model, cache: Path) -> tuple[float, Cost]:
    """Ten edits in one batch, costed at the steps δ's batch really ran.

    The batch drops converged requests only once they are half of it, so the rows
    run per step are counted as they are run: the cost's ``v_steps`` is their sum
    over the requests.
    """
    requests = edit_requests(model, MEMIT_REQUESTS)
    rows_run: list[int] = []
    run_batch = memory._ValueBatch.__call__

    def counted(self, delta):
        rows_run.append(len(self.members))
        return run_batch(self, delta)

    memory._ValueBatch.__call__ = counted
    try:
        started = time.perf_counter()
        edit = memit_edit(model, requests, cache_dir=cache, progress=False)
        seconds = time.perf_counter() - started - edit.stats_seconds
    finally:
        memory._ValueBatch.__call__ = run_batch
    sizes = request_sizes(model, requests)
    v_steps = sum(rows_run) / len(requests)
    cost = estimate_cost(model, "memit", n_requests=len(requests), v_steps=v_steps, **sizes)
    return seconds, cost


def ekfac(model, cache: Path) -> tuple[float, Cost]:
    """EK-FAC factors of two layers over the default sampled corpus, sampling included."""
    started = time.perf_counter()
    with nothing_shipped():
        fit_influence_factors(model, layers=EKFAC_LAYERS, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - started
    return seconds, estimate_cost(model, "ekfac_factors", layers=EKFAC_LAYERS)


def scan(model, cache: Path) -> tuple[float, Cost]:
    """One query over paragraphs of facts, with the factors (read from the cache)"""
    factors = fit_influence_factors(model, layers=EKFAC_LAYERS, cache_dir=cache, progress=False)
    texts = fact_paragraphs()
    started = time.perf_counter()
    influence(model, factors, *QUERY, texts, progress=False)
    seconds = time.perf_counter() - started
    lengths = [len(model.to_tokens(text, prepend_bos=False)[0]) for text in texts]
    query = len(model.to_tokens(QUERY[0], prepend_bos=False)[0])
    query += len(target_token_ids(model, *QUERY))
    cost = estimate_cost(
        model, "scan", layers=EKFAC_LAYERS, n_documents=len(texts), query_tokens=query,
        document_tokens=round(sum(lengths) / len(lengths)),
    )  # fmt: skip
    return seconds, cost


# --------------------------------------------------------------------------- inputs


def edit_requests(model, n: int) -> list[EditRequest]:
    """The first ``n`` CounterFact cases whose prompt starts with the subject (as the cost
    model assumes), without conflicts."""
    cases = without_conflicts(load_counterfact_sample())
    return [c.request for c in cases if c.request.prompt.startswith("{}")][:n]


def request_sizes(model, requests: list[EditRequest]) -> dict[str, int]:
    """The requests' prompt, subject and target lengths in the model's tokens: the longest,
    as one batch pads every request to them."""
    return {
        "prompt_tokens": max(
            [len(model.to_tokens(r.text, prepend_bos=False)[0]) for r in requests]
        ),
        "subject_tokens": max(
            [len(model.to_tokens(r.subject, prepend_bos=False)[0]) for r in requests]
        ),
        "target_tokens": max(
            [len(target_token_ids(model, r.text, r.target_new)) for r in requests]
        ),
    }


def fact_paragraphs() -> list[str]:
    """CounterFact's true facts as sentences, ``FACTS_PER_TEXT`` to a paragraph."""
    sentences = [f"{c.request.text} {c.request.target_true}." for c in load_counterfact_sample()]
    return [
        " ".join(sentences[i : i + FACTS_PER_TEXT])
        for i in range(0, N_TEXTS * FACTS_PER_TEXT, FACTS_PER_TEXT)
    ]


def describe(cost: Cost) -> str:
    """The sizes a cost was estimated for, briefly."""
    s = cost.settings
    if cost.work in ("rome_edit", "memit"):
        return (f"layers {s.layers if cost.work == 'memit' else s.layer}, {s.n_requests} requests, "
                f"{s.v_steps:.3g} steps, prompt {s.prompt_tokens}, subject {s.subject_tokens}, "
                f"target {s.target_tokens}")  # fmt: skip
    if cost.work == "scan":
        return f"layers {list(s.layers or ())}, {s.n_documents} texts of {s.document_tokens}"
    layers = s.layer if cost.work == "key_statistics" else list(s.layers or ())
    return f"layer(s) {layers}, {s.n_tokens} tokens"


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """The table with predicted/measured ratios of FLOPs, memory and time."""
    table = table.copy()
    table["flops_ratio"] = (table["predicted_matmul_flops"] / table["counted_flops"]).round(3)
    table["time_ratio"] = (table["predicted_s"] / table["measured_s"]).round(2)
    table["time_ratio_with_calls"] = (table["predicted_s_with_calls"] / table["measured_s"]).round(
        2
    )
    table["memory_ratio"] = (table["predicted_MiB"] / table["measured_MiB"].clip(lower=1)).round(2)
    columns = ["piece", "predicted_matmul_flops", "counted_flops", "flops_ratio",
               "predicted_MiB", "measured_MiB", "memory_ratio", "predicted_s", "measured_s",
               "time_ratio", "time_ratio_with_calls", "flops", "block_call_ms",
               "settings"]  # fmt: skip
    return table[columns]


if __name__ == "__main__":
    main()
