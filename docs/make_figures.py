"""Make the figures and numbers quoted in the docs, on the default model.

    python docs/make_figures.py [--facts 16]    # docs/tracing.md
    python docs/make_figures.py --only-counts   # just the known-fact counts (~1 min)
    python docs/make_figures.py --only-lens     # docs/logit_lens.md and the README screenshot

Reads ROME's known facts from ``--data`` (default ../shared/data: development
data, not shipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import rome_lens
from rome_lens import average_causal_effects, trace_fact, trace_severed
from rome_lens.core.predict import predict_next

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
SHARED_DATA = HERE.parents[1] / "shared" / "data"
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


def known_fact_counts(model, data: Path) -> str:
    """How many of ROME's known facts the model answers top-1, with and without BOS."""
    facts = json.loads((data / "known_1000.json").read_text())
    prompts, answers = [f["prompt"] for f in facts], [f["attribute"] for f in facts]
    counts = {
        bos: int(predict_next(model, prompts, targets=answers, prepend_bos=bos).target_is_top.sum())
        for bos in (True, False)
    }
    return (
        f"known facts answered top-1 (of {len(facts)}): "
        f"{counts[True]} with BOS, {counts[False]} without"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--only-counts", action="store_true")
    parser.add_argument("--only-lens", action="store_true")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="known-facts folder")
    args = parser.parse_args()
    FIGURES.mkdir(exist_ok=True)
    model = rome_lens.load_model()
    if args.only_lens:
        lens_figures(model)
        return
    counts = known_fact_counts(model, args.data)
    (FIGURES / "known_facts.txt").write_text(counts + "\n")
    print(counts)
    if args.only_counts:
        return

    trace = trace_fact(model, PROMPT, SUBJECT)
    trace.plot(path=FIGURES / "eiffel_trace.png")
    window1 = trace_fact(model, PROMPT, SUBJECT, kinds=("mlp", "attn"), window=1)
    window1.plot(path=FIGURES / "eiffel_trace_window1.png")
    lines = [f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}"]
    for t in (trace, window1):
        for kind in t.kinds:
            p = t.peak(kind)
            lines.append(
                f"window {t.window} {kind}: peak at token {p.token} {p.str_token!r}, "
                f"layer {p.layer}, p = {p.score:.3f}, effect {p.indirect_effect:+.3f}"
            )

    token = trace.peak("mlp").token
    for severed in ("mlp", "attn"):
        result = trace_severed(model, PROMPT, SUBJECT, severed=severed, token=token)
        result.plot(path=FIGURES / f"eiffel_severed_{severed}.png")
        lines.append(
            f"severed {severed} at {result.str_tokens[token]!r}: mean effect layers 0-9 "
            f"{(result.scores[:10] - result.corrupted_prob).mean():+.3f} -> "
            f"{(result.severed_scores[:10] - result.corrupted_prob).mean():+.3f}"
        )

    facts = json.loads((args.data / "known_smollm2.json").read_text())[: args.facts]
    average = average_causal_effects(model, facts, samples=args.samples)
    average.plot(path=FIGURES / "average_effects.png")
    average.to_dataframe().to_csv(FIGURES / "average_effects.csv", index=False)
    for k, kind in enumerate(average.kinds):
        for g, group in enumerate(average.groups):
            row = average.mean[k, g]
            lines.append(
                f"average {kind} / {group}: max {row.max():+.3f} at layer {int(row.argmax())}"
            )
    (FIGURES / "numbers.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def lens_figures(model) -> None:
    """The logit lens before and after the demo edit, and a screenshot of the demo report."""
    from rome_lens.analysis import logit_lens
    from rome_lens.cli import main as cli
    from rome_lens.viz import plot_logit_lens, save_figure

    targets = ["Paris", "Rome"]
    before = logit_lens(model, PROMPT, targets=targets)
    edit = rome_lens.rome_edit(
        model, rome_lens.EditRequest("{} is located in the city of", SUBJECT, "Rome")
    )
    with rome_lens.edited(model, edit):
        after = logit_lens(model, PROMPT, targets=targets)
    save_figure(plot_logit_lens(before), FIGURES / "lens_before.png")
    save_figure(plot_logit_lens(after, before=before), FIGURES / "lens_after_edit.png")
    lines = [f"edited layer {edit.layer}"]
    for name, lens in (("before", before), ("after", after)):
        for t, target in enumerate(targets):
            ranks = lens.target_ranks[:, t].tolist()
            probs = [round(float(p), 3) for p in lens.target_log_probs[:, t].exp()]
            lines.append(f"{name} {target}: rank by layer {ranks}")
            lines.append(f"{name} {target}: p by layer {probs}")
    (FIGURES / "lens_numbers.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    sys.path.insert(0, str(HERE.parent))
    from tests.browser import visit

    with tempfile.TemporaryDirectory() as out:
        cli(["demo", "--out", out, "--no-progress"])
        seen = visit(Path(out), "index.html", [], screenshot=FIGURES / "report.png")
    print(f"screenshot: {FIGURES / 'report.png'}; console errors: {seen.console_errors}")


if __name__ == "__main__":
    main()
