"""Benchmark: the default model in bfloat16 against float32, on the CPU.

    python bench/bench_precision.py               # 50 CounterFact cases, ~30 min on 2 cores
    python bench/bench_precision.py --cases 10    # a quicker look

Three comparisons, each the same work on the same model in both precisions:

* the demo trace (every cell; the largest difference of P(target) is reported);
* key statistics of ROME's default layer (‖C_bf16 − C_fp32‖ / ‖C_fp32‖);
* ROME's ES / PS / NS on the first ``--cases`` CounterFact cases, each edit
  computed on its own model, applied and reverted; revert is checked bit for bit.

The bfloat16 model is the float32 one cast with ``model.to(torch.bfloat16)``;
everything rome_lens sums or solves is promoted (see rome_lens.core.precision).
Tables are printed and written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from tables import data_argument, data_file, report

import rome_lens
from rome_lens.core.backend import Model
from rome_lens.editing import default_layer
from rome_lens.evaluation import CounterFactCase, evaluate_edits, load_counterfact, summarize
from rome_lens.stats import KeyStats, key_second_moment

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    data_argument(parser)
    args = parser.parse_args()
    cases = load_counterfact(data_file(args.data, "counterfact_val.json"))[: args.cases]
    models = {"float32": rome_lens.load_model(), "bfloat16": rome_lens.load_model()}
    models["bfloat16"].to(torch.bfloat16)
    layer = default_layer(models["float32"])
    traces, stats, rows = {}, {}, []
    for name, model in models.items():
        started = time.perf_counter()
        traces[name] = rome_lens.trace_fact(model, PROMPT, SUBJECT, target=TARGET).scores
        trace_seconds = time.perf_counter() - started
        started = time.perf_counter()
        stats[name] = key_second_moment(model, layer)
        stats_seconds = time.perf_counter() - started
        evaluation = evaluate_edits(model, cases, "rome", layer=layer, stats=stats[name],
                                    fluency=False)  # fmt: skip
        summary = summarize(evaluation.to_dataframe()).iloc[0].to_dict()
        rows.append({"dtype": name, "trace_s": trace_seconds, "stats_s": stats_seconds,
                     "revert_bit_exact": reverts_exactly(model, cases[0], layer, stats[name]),
                     **summary})  # fmt: skip
    report(args.out, "precision_rome", pd.DataFrame(rows))
    difference = (traces["bfloat16"] - traces["float32"]).abs()
    half, full = stats["bfloat16"].moment, stats["float32"].moment
    table = pd.DataFrame([{
        "trace_max_abs_difference": float(difference.max()),
        "trace_peak_float32": float(traces["float32"].max()),
        "key_stats_relative_difference": float((half - full).norm() / full.norm()),
        "layer": layer,
        "cases": len(cases),
    }])  # fmt: skip
    report(args.out, "precision_differences", table)


def reverts_exactly(model: Model, case: CounterFactCase, layer: int, stats: KeyStats) -> bool:
    """Apply one ROME edit and revert it: is every weight back, bit for bit?"""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = rome_lens.rome_edit(model, case.request, layer=layer, stats=stats, progress=False)
    edit.apply(model).revert()
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


if __name__ == "__main__":
    main()
