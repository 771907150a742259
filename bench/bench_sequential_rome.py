"""Benchmark: does ROME edit as fast in a row as alone? Seconds per v* step, both ways.

    python bench/bench_sequential_rome.py              # 12 cases, ~5 minutes on 2 cores

Each case is edited twice on the default model: alone, on the unedited weights
(``rome_edit``, not applied), and in a row, by a ``SequentialEditor`` that has
applied every earlier case. An edit's time is dominated by its v* optimisation,
whose step count varies with the fact, so the two are compared per step: the
ratio of the median seconds per step in a row to alone, measured in one run.
A ratio near 1 means sequential ROME runs at single-edit speed.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
from tables import data_argument, data_file, report

import rome_lens
from rome_lens.editing import EditMissWarning, SequentialEditor, rome_edit
from rome_lens.evaluation import load_counterfact, without_conflicts

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    data_argument(parser)
    args = parser.parse_args()
    warnings.simplefilter("ignore", EditMissWarning)
    model = rome_lens.load_model()
    cases = without_conflicts(load_counterfact(data_file(args.data, "counterfact_val.json")))
    requests = [case.request for case in cases[: args.cases]]
    rome_edit(model, requests[0], progress=False)  # statistics and templates, once
    rows = []
    for request in requests:
        started = time.perf_counter()
        edit = rome_edit(model, request, progress=False)
        rows.append({"subject": request.subject, "run": "alone", "steps": len(edit.losses),
                     "seconds": time.perf_counter() - started})  # fmt: skip
    editor = SequentialEditor(model, "rome", progress=False)
    try:
        for done, request in enumerate(requests):
            started = time.perf_counter()
            (edit,) = editor.edit([request])
            rows.append({"subject": request.subject, "run": f"after {done} edits",
                         "steps": len(edit.losses),
                         "seconds": time.perf_counter() - started})  # fmt: skip
    finally:
        editor.revert_all()
    table = pd.DataFrame(rows).assign(per_step=lambda t: t.seconds / t.steps)
    report(args.out, "sequential_rome_speed", table.round(3))
    alone = table[table.run == "alone"].per_step.median()
    in_a_row = table[table.run != "alone"].per_step.median()
    print(f"\nmedian seconds per v* step: alone {alone:.3f}, in a row {in_a_row:.3f}, "
          f"ratio {in_a_row / alone:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
