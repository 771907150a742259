"""Benchmark: a ROME edit's time on TL 4's TransformerBridge against TL 3's HookedTransformer.

The same default model (SmolLM2-135M-Instruct, the same GGUF weights) on each
backend edits the same CounterFact cases at the default layer. Key statistics
are computed (or read from the cache) before timing starts. Each backend runs
in its own subprocess, twice, alternating, so that a passing load on the
machine touches both; the ratio is of the medians over both runs.

    python bench/bench_rome_backends.py          # the installed TL and, if .tl3 exists, TL 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(cases_file: Path, n_cases: int) -> None:
    """Time ``n_cases`` ROME edits on the installed TransformerLens; print one JSON line."""
    import torch

    import rome_lens
    from rome_lens.core.backend import transformer_lens_major
    from rome_lens.editing import default_layer, rome_edit
    from rome_lens.evaluation import load_counterfact
    from rome_lens.stats import key_second_moment

    torch.manual_seed(0)
    model = rome_lens.load_model()
    layer = default_layer(model)
    stats = key_second_moment(model, layer, progress=False)
    seconds, steps = [], []
    for case in load_counterfact(cases_file, limit=n_cases):
        started = time.perf_counter()
        edit = rome_edit(model, case.request, layer=layer, stats=stats, progress=False)
        seconds.append(time.perf_counter() - started)
        steps.append(len(edit.losses))
    backend = (
        "TL 4 TransformerBridge" if transformer_lens_major() >= 4 else "TL 3 HookedTransformer"
    )
    print(json.dumps({"backend": backend, "seconds": seconds, "steps": steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--other-tl", type=Path, default=ROOT / ".tl3")
    parser.add_argument(
        "--counterfact", type=Path, default=ROOT.parent / "shared" / "data" / "counterfact_val.json"
    )
    args = parser.parse_args()
    if args.one:
        run_one(args.counterfact, args.cases)
        return
    folders: list[Path | None] = [None]
    if (args.other_tl / "transformer_lens").exists():
        folders.append(args.other_tl)
    found: dict[str, list[float]] = {}
    for run in range(args.runs):
        for folder in folders:
            env = dict(os.environ)
            if folder is not None:
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [str(folder), env.get("PYTHONPATH")])
                )
            cmd = [sys.executable, __file__, "--one", "--cases", str(args.cases),
                   "--counterfact", str(args.counterfact)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            found.setdefault(result["backend"], []).extend(result["seconds"])
            print(f"run {run + 1} {result['backend']:<24} edits "
                  + " ".join(f"{s:.2f}" for s in result["seconds"])
                  + f" s (steps {result['steps']})")  # fmt: skip
    medians = {backend: statistics.median(times) for backend, times in found.items()}
    for backend, median in medians.items():
        print(f"{backend:<24} median edit {median:.2f} s over {len(found[backend])} edits")
    if len(medians) == 2:
        bridge, hooked = medians["TL 4 TransformerBridge"], medians["TL 3 HookedTransformer"]
        print(f"bridge / HookedTransformer edit time: {bridge / hooked:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
