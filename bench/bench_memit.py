"""Benchmark: MEMIT batches of 1 to 1,000 CounterFact edits on the default model.

    python bench/bench_memit.py                        # sizes 1, 10, 100, 1000 (~80 min)
    python bench/bench_memit.py --only sweep           # layer sets and λ, on --sweep-cases
    python bench/bench_memit.py --only sweep --sweep-cases 1000 --sweep-layers "1-8;3-8" \
        --sweep-lambdas 1000,3000 --base-layers 1-8 --base-lambda 1000
    python bench/bench_memit.py --only batching --batching-cases 96 --batching-layer 8

Phases (seeded, cases in file order from ../shared/data/counterfact_val.json,
less those that rewrite an earlier case's subject and prompt to another target):

* ``sizes``: for each batch size, one ``memit_edit`` of the first N cases with the
  default layers, then ES / PS / NS / S of those cases with the batch applied,
  the unedited NS, the total and per-edit time (key statistics excluded: they
  are computed first and cached), and the peak resident memory. Each size runs
  in a fresh process, so its peak memory is its own. The ROME sequential-editing
  curve (``bench/bench_rome.py --only sequential``) is printed beside it;
* ``sweep``: quality of candidate layer sets (at ``--base-lambda``, 5,000) and of
  λ (``mom2_update_weight``, at ``--base-layers``, the default layers), which
  picked the defaults; z is computed once per last layer and reused. A sweep
  over other than 100 cases writes ``memit_sweep_{cases}.csv``;
* ``batching``: the δ optimisation behind z for the same requests, batched in
  file order (as before) and by suffix length (``optimize_deltas`` now): time,
  the share of recomputed positions that are padding, and the largest change
  of δ between the two.

Tables are printed and written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from tables import data_argument, data_file, report
from torch import Tensor
from tqdm.auto import tqdm

import rome_lens
from rome_lens.core.runtime import frozen, linear_layout
from rome_lens.editing import MEMITHyperParams, default_memit_layers, edited, memit_edit
from rome_lens.editing.memory import (
    _optimise_batch,
    _ValueProblem,
    context_templates,
    optimize_deltas,
)
from rome_lens.editing.multilayer import subject_residuals
from rome_lens.evaluation import (
    CounterFactCase,
    case_scores,
    load_counterfact,
    overall_score,
    without_conflicts,
)
from rome_lens.stats import key_second_moment

PHASES = ("sizes", "sweep", "batching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--sweep-cases", type=int, default=100)
    parser.add_argument("--sweep-layers", default="0-2;1-4;2-4;0-4")
    parser.add_argument("--sweep-lambdas", default="500,1000,1500,5000,15000")
    parser.add_argument("--base-layers", help="layers the λ sweep uses (default: the model's)")
    parser.add_argument("--base-lambda", type=float, default=5_000.0, help="λ of the layer sweep")
    parser.add_argument("--key-match", choices=("averaged", "both"), default="averaged")
    parser.add_argument("--no-unedited", action="store_true", help="skip the unedited row")
    parser.add_argument("--batching-cases", type=int, default=96)
    parser.add_argument("--batching-layer", type=int, default=8)
    parser.add_argument("--only", choices=PHASES, action="append")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one size, in a child
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    data_argument(parser)
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    pd.set_option("display.precision", 3)
    torch.manual_seed(0)
    data = data_file(args.data, "counterfact_val.json")
    if args.size is not None:
        print(json.dumps(run_size(args.size, data)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model = rome_lens.load_model()
    phases = args.only or PHASES[:2]
    if "batching" in phases:
        cases = without_conflicts(load_counterfact(data))[: args.batching_cases]
        report(args.out, "memit_batching", batching(model, cases, args.batching_layer))
    if "sweep" in phases:
        cases = without_conflicts(load_counterfact(data))[: args.sweep_cases]
        base = parse_layers(args.base_layers) if args.base_layers else None
        table = sweep(model, cases, args.sweep_layers, args.sweep_lambdas, base, args.base_lambda,
                      args.key_match, not args.no_unedited)  # fmt: skip
        name = "memit_sweep" if args.sweep_cases == 100 else f"memit_sweep_{args.sweep_cases}"
        name += "" if args.key_match == "averaged" else f"_{args.key_match}"
        report(args.out, name, table)
    if "sizes" in phases:
        for layer in default_memit_layers(model):  # cached, so no size pays for statistics
            key_second_moment(model, layer)
        rows = [child(n, args.data) for n in (int(x) for x in args.sizes.split(","))]
        report(args.out, "memit_sizes", pd.DataFrame(rows))
        rome_curve = args.out / "rome_sequential.csv"
        if rome_curve.exists():
            print("\nROME, the same cases edited one after another (bench_rome.py):")
            print(pd.read_csv(rome_curve).to_string(index=False))


def child(n: int, data: Path) -> dict[str, object]:
    """Run one size in a fresh process (its own peak memory) and read its JSON row."""
    command = [sys.executable, __file__, "--size", str(n), "--data", str(data)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {n}-edit run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(n: int, data: Path) -> dict[str, object]:
    """Edit the first ``n`` cases in one batch and score them (z not cached: timed in full)."""
    model = rome_lens.load_model()
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = without_conflicts(load_counterfact(data))[:n]
    pre = case_scores(model, cases)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        edit = memit_edit(
            model, [c.request for c in cases], cache_dir=folder, use_cache=False, progress=False
        )
    seconds = time.perf_counter() - started
    with edited(model, edit):
        post = case_scores(model, cases)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "edits": n,
        **scores(post),
        "NS_unedited": 100 * pre["neighborhood_score"].mean(),
        "total_s": round(seconds, 1),
        "s_per_edit": round(seconds / n, 2),
        "peak_rss_MiB": peak_kib // 1024,
        "peak_over_loaded_MiB": (peak_kib - loaded_kib) // 1024,
        "finite": all(bool(torch.isfinite(d).all()) for d in edit.delta.values()),
    }


def sweep(
    model,
    cases: list[CounterFactCase],
    layer_sets: str,
    lambdas: str,
    base_layers: list[int] | None = None,
    base_lambda: float = 5_000.0,
    key_match: str = "averaged",
    unedited: bool = True,
) -> pd.DataFrame:
    """ES / PS / NS / S for each layer set at ``base_lambda``, and each λ at ``base_layers``.

    The first point with a given last layer pays for the targets z of the requests not
    yet cached; later points reuse them, so their time is the keys and the solve.
    """
    requests = [c.request for c in cases]
    default = MEMITHyperParams(key_match=key_match)  # type: ignore[arg-type]
    base_layers = base_layers or default_memit_layers(model)
    rows = []
    if unedited:
        rows.append({"layers": "unedited", "lambda": None, **scores(case_scores(model, cases))})
        print(rows[-1], flush=True)
    candidates = [(parse_layers(s), base_lambda) for s in layer_sets.split(";")]
    candidates += [(base_layers, float(x)) for x in lambdas.split(",") if x]
    for layers, weight in dict.fromkeys((tuple(ls), w) for ls, w in candidates):
        hparams = dataclasses.replace(default, mom2_update_weight=weight)
        started = time.perf_counter()
        edit = memit_edit(model, requests, layers=list(layers), hparams=hparams, progress=False)
        seconds = time.perf_counter() - started
        with edited(model, edit):
            row = scores(case_scores(model, cases))
        rows.append({"layers": str(list(layers)), "lambda": weight, "key_match": key_match,
                     **row, "seconds": seconds})  # fmt: skip
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def batching(model, cases: list[CounterFactCase], layer: int) -> pd.DataFrame:
    """δ for the same requests batched in file order and by suffix length, side by side."""
    requests = [c.request for c in cases]
    hparams = MEMITHyperParams()
    templates = context_templates(model, hparams)
    norms = subject_residuals(model, requests, layer).norm(dim=1)
    problems = [_ValueProblem.build(model, r, templates, hparams) for r in requests]
    size = hparams.requests_per_batch

    def in_file_order() -> Tensor:
        with frozen(model), torch.enable_grad(), linear_layout(model):
            chunks = [
                _optimise_batch(
                    model,
                    layer,
                    problems[i : i + size],
                    norms[i : i + size].float(),
                    hparams,
                    tqdm(disable=True),
                )[0]  # fmt: skip
                for i in range(0, len(problems), size)
            ]
        return torch.cat(chunks)

    def by_suffix_length() -> Tensor:
        return optimize_deltas(model, requests, layer, templates, norms, hparams,
                               batch_size=size, progress=False)[0]  # fmt: skip

    optimize_deltas(model, requests[:1], layer, templates, norms[:1], hparams, progress=False)
    rows, deltas = [], []  # after one untimed warm-up request
    file_order = list(range(len(problems)))
    by_length = sorted(file_order, key=lambda i: max(problems[i].suffix_lengths))
    for name, run, order in [("file order", in_file_order, file_order),
                             ("by suffix length", by_suffix_length, by_length)]:  # fmt: skip
        started = time.perf_counter()
        deltas.append(run())
        seconds = time.perf_counter() - started
        rows.append({"batches": name, "requests": len(requests), "layer": layer,
                     "seconds": seconds, "s_per_request": seconds / len(requests),
                     "padding": padding([problems[i] for i in order], size)})  # fmt: skip
        print(rows[-1], flush=True)
    change = (deltas[1] - deltas[0]).norm(dim=1) / deltas[0].norm(dim=1)
    rows[-1]["max_relative_change"] = float(change.max())
    return pd.DataFrame(rows)


def padding(problems: list, size: int) -> float:
    """The share of suffix positions that are right padding, batching ``size`` problems in order."""
    real = padded = 0
    for start in range(0, len(problems), size):
        lengths = [n for problem in problems[start : start + size] for n in problem.suffix_lengths]
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
    return 1 - real / padded


def scores(df: pd.DataFrame) -> dict[str, float]:
    es, ps, ns = (100 * df[f"{m}_score"].mean() for m in ("efficacy", "paraphrase", "neighborhood"))
    return {"ES": es, "PS": ps, "NS": ns, "S": overall_score([es, ps, ns])}


def parse_layers(text: str) -> list[int]:
    first, last = (int(x) for x in text.split("-"))
    return list(range(first, last + 1))


if __name__ == "__main__":
    main()
