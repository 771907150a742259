"""Benchmark: the default model with and without a BOS token before every prompt.

TransformerLens prepends the tokenizer's BOS (``<|im_start|>`` for SmolLM2) to
every prompt, although SmolLM2's own tokenizer adds none. This runs the same
work both ways on the default model, switching ``model.cfg.default_prepend_bos``:

* ``known``: ROME's known facts (known_1000.json) answered top-1, and the mean
  probability of the answer's first token;
* ``trace``: average indirect effects of MLP states over ``--trace-facts`` known
  facts (10 noise samples): the peak at the last subject token and where it is;
* ``rome``: ROME at the default layer on ``--cases`` CounterFact cases: ES, PS, NS;
* ``microscope``: the logit lens's loss of each known fact's last answer token
  (prompt and answer read as one text), at the last layer and the middle one.

    python bench/bench_bos.py                # all phases, ~15 min on 2 cores
    python bench/bench_bos.py --only known   # one phase

Tables are printed and written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from tables import data_argument, data_file, report

import rome_lens
from rome_lens.analysis import intermediate_predictions
from rome_lens.core.predict import predict_next
from rome_lens.evaluation import evaluate_edits, load_counterfact

PHASES = ("known", "trace", "rome", "microscope")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace-facts", type=int, default=30)
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--only", choices=PHASES)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    data_argument(parser)
    args = parser.parse_args()
    model = rome_lens.load_model()
    known = json.loads(data_file(args.data, "known_1000.json").read_text())
    rows: dict[str, list[dict[str, object]]] = {phase: [] for phase in PHASES}
    for bos in (True, False):
        model.cfg.default_prepend_bos = bos
        label = {"bos": bos}
        answered = predict_next(
            model, [f["prompt"] for f in known], targets=[" " + f["attribute"] for f in known]
        )
        top = answered.target_is_top.tolist()
        if args.only in (None, "known"):
            assert answered.target_prob is not None
            rows["known"].append(
                {**label, "facts": len(known), "top_1": sum(top),
                 "mean_p_answer": float(answered.target_prob.mean())}
            )  # fmt: skip
        if args.only in (None, "trace"):
            facts = [f for f, ok in zip(known, top, strict=True) if ok][: args.trace_facts]
            effects = rome_lens.average_causal_effects(model, facts, kinds=("mlp",), progress=False)
            last_subject = effects.mean[0, effects.groups.index("last subject token")]
            last_token = effects.mean[0, effects.groups.index("last token")]
            rows["trace"].append(
                {**label, "facts": effects.n_facts, "peak_aie": float(last_subject.max()),
                 "peak_layer": int(last_subject.argmax()),
                 "last_token_peak": float(last_token.max())}
            )  # fmt: skip
        if args.only in (None, "rome"):
            cases = load_counterfact(data_file(args.data, "counterfact_val.json"), limit=args.cases)
            evaluation = evaluate_edits(model, cases, "rome", fluency=False, progress=False)
            post = evaluation.summary().iloc[0]
            rows["rome"].append(
                {**label, "cases": len(cases), "ES": post["post_ES"], "PS": post["post_PS"],
                 "NS": post["post_NS"], "pre_NS": post["pre_NS"]}
            )  # fmt: skip
        if args.only in (None, "microscope"):
            facts = known[:60]
            lenses = [
                intermediate_predictions(model, f"{f['prompt']} {f['attribute']}", progress=False)
                for f in facts
            ]
            last = torch.stack([lens.losses[:, -1] for lens in lenses])  # [fact layer]
            middle = model.cfg.n_layers // 2
            rows["microscope"].append(
                {**label, "facts": len(facts), "final_loss": float(last[:, -1].mean()),
                 f"layer_{middle}_loss": float(last[:, middle].mean())}
            )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for phase, found_rows in rows.items():
        if found_rows:
            report(args.out, f"bos_{phase}", pd.DataFrame(found_rows))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
