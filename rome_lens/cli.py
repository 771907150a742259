"""The ``rome-lens`` command line (also ``python -m rome_lens``).

    rome-lens trace PROMPT --subject S [--target T] [--kinds resid mlp attn] --out DIR
    rome-lens edit PROMPT_TEMPLATE --subject S --new T [--layer L] [--neighbour P ...] --out DIR
    rome-lens lens PROMPT [--targets T ...] --out DIR
    rome-lens demo [--out DIR]

Each command works on the default model (SmolLM2-135M-Instruct) unless
``--model-path`` names a Llama-family GGUF file or a folder written by
:func:`rome_lens.models.save_model`. Each prints what it found and writes its
figures, CSV tables and an offline HTML report (``index.html``) into ``--out``.
``demo`` traces, edits and lenses the Eiffel Tower fact on one page. Bad input
exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformer_lens import HookedTransformer

    from rome_lens.lens import LogitLens
    from rome_lens.tracing import CausalTrace
    from rome_lens.viz import Widget

__all__ = ["main"]

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_SUBJECT = "The Eiffel Tower"
DEMO_NEW = "Rome"
DEMO_PROMPTS = {
    "edit": DEMO_PROMPT,
    "paraphrase": "Where is the Eiffel Tower? It is in the city of",
    "neighbour": "The Louvre is located in the city of",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rome-lens", description="Locate and rewrite facts in TransformerLens models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="trace, edit and lens the Eiffel Tower fact")
    _common(demo, "rome_lens_demo")

    trace = commands.add_parser("trace", help="causal trace of one prompt")
    trace.add_argument("prompt")
    trace.add_argument("--subject", required=True, help="the substring of PROMPT to corrupt")
    trace.add_argument("--target", default=None, help="answer to score (default: clean top-1)")
    trace.add_argument("--kinds", nargs="+", default=["resid", "mlp", "attn"])
    trace.add_argument("--samples", type=int, default=10, help="noise samples")
    trace.add_argument("--window", type=int, default=10, help="layers restored together")
    trace.add_argument("--seed", type=int, default=0)
    _common(trace, "rome_lens_trace")

    edit = commands.add_parser("edit", help="rewrite one fact with ROME and save the edit")
    edit.add_argument("prompt_template", help='e.g. "{} is located in the city of"')
    edit.add_argument("--subject", required=True, help="fills the template's {}")
    edit.add_argument("--new", required=True, help="the new answer")
    edit.add_argument("--layer", type=int, default=None, help="MLP layer (default: per model)")
    edit.add_argument("--neighbour", nargs="*", default=[], help="prompts that must not change")
    _common(edit, "rome_lens_edit")

    lens = commands.add_parser("lens", help="logit lens of one prompt")
    lens.add_argument("prompt")
    lens.add_argument("--targets", nargs="*", default=None, help="answers to follow")
    _common(lens, "rome_lens_lens")
    return parser


def _common(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument("--out", type=Path, default=Path(out), help="output folder")
    command.add_argument(
        "--model-path", type=Path, default=None, help="a .gguf file or a saved-model folder"
    )
    command.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run = {"demo": _demo, "trace": _trace, "edit": _edit, "lens": _lens}[args.command]
        widgets = run(_model(args.model_path), args)
        from rome_lens.viz import report

        path = report(args.out / "index.html", *widgets, title=f"rome-lens {args.command}")
        print(f"report: {path}")
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"rome-lens: error: {message}", file=sys.stderr)
        return 2
    return 0


def _model(path: Path | None) -> HookedTransformer:
    import rome_lens
    from rome_lens.models import load_model_path

    return rome_lens.load_model() if path is None else load_model_path(path)


def _trace(model: HookedTransformer, args: argparse.Namespace) -> list[Widget]:
    import rome_lens

    trace = rome_lens.trace_fact(
        model,
        args.prompt,
        args.subject,
        target=args.target,
        kinds=args.kinds,
        samples=args.samples,
        window=args.window,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return [_save_trace(trace, args.out)]


def _save_trace(trace: CausalTrace, out: Path) -> Widget:
    from rome_lens.plots import plot_trace
    from rome_lens.viz import trace_widget

    print(f"prompt: {trace.prompt!r}  subject: {trace.subject!r}  target: {trace.target_str!r}")
    print(f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}")
    for kind in trace.kinds:
        peak = trace.peak(kind)
        print(
            f"peak {kind:>5}: token {peak.token} {peak.str_token!r}, layer {peak.layer}, "
            f"p = {peak.score:.3f} (indirect effect {peak.indirect_effect:+.3f})"
        )
    out.mkdir(parents=True, exist_ok=True)
    _save_png_and_svg(plot_trace(trace), out / "trace")
    trace.to_dataframe().to_csv(out / "trace.csv", index=False)
    return trace_widget(trace)


def _edit(model: HookedTransformer, args: argparse.Namespace) -> list[Widget]:
    template = args.prompt_template
    if "{}" not in template and args.subject in template:
        template = template.replace(args.subject, "{}", 1)
    prompts = {"edit": template.replace("{}", args.subject, 1)}
    prompts |= {f"neighbour {i + 1}": p for i, p in enumerate(args.neighbour)}
    return _edit_and_lens(model, template, args.subject, args.new, prompts, args)


def _edit_and_lens(
    model: HookedTransformer,
    template: str,
    subject: str,
    new: str,
    prompts: dict[str, str],
    args: argparse.Namespace,
) -> list[Widget]:
    """ROME-edit the fact, print and save before/after, and lens the prompt on both sides."""
    import rome_lens
    from rome_lens.lens import logit_lens
    from rome_lens.viz import edit_widget, logit_lens_widget

    request = rome_lens.EditRequest(template, subject, new)
    layer = getattr(args, "layer", None)  # demo has no --layer
    edit = rome_lens.rome_edit(model, request, layer=layer, progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    edit.save(args.out / "edit.safetensors")
    shown = edit_widget(edit, model, prompts)
    table = shown.to_dataframe()
    table.to_csv(args.out / "edit.csv", index=False)
    print(f"edited blocks.{edit.layer}.mlp.W_out in {edit.seconds:.1f} s")
    for label, rows in table.groupby("label", sort=False):
        top = rows.iloc[0]
        print(
            f"{label}: {top['prompt']!r}: before {top['before']!r} ({top['p_before']:.3f}), "
            f"after {top['after']!r} ({top['p_after']:.3f})"
        )
    print(f"saved the edit to {args.out / 'edit.safetensors'}")
    before_top = table.iloc[0]["before"]
    targets = [new] + ([before_top] if before_top.strip() and before_top.strip() != new else [])
    before = logit_lens(model, prompts["edit"], targets=targets)
    with rome_lens.edited(model, edit):
        after = logit_lens(model, prompts["edit"], targets=targets)
    _save_lens(after, args.out, before=before)
    return [shown, logit_lens_widget(after, before=before)]


def _lens(model: HookedTransformer, args: argparse.Namespace) -> list[Widget]:
    from rome_lens.lens import logit_lens
    from rome_lens.viz import logit_lens_widget

    lens = logit_lens(model, args.prompt, targets=args.targets or None)
    args.out.mkdir(parents=True, exist_ok=True)
    _save_lens(lens, args.out)
    for t, target in enumerate(lens.targets):
        ranks = lens.target_ranks[:, t]
        first = int((ranks == 0).nonzero()[0]) if bool((ranks == 0).any()) else None
        where = f"top-1 from layer {first}" if first is not None else "never top-1"
        print(
            f"{target!r}: p = {float(lens.target_log_probs[-1, t].exp()):.3f} at the end, {where}"
        )
    return [logit_lens_widget(lens)]


def _save_lens(lens: LogitLens, out: Path, *, before: LogitLens | None = None) -> None:
    from rome_lens.plots import plot_logit_lens

    lens.to_dataframe().to_csv(out / "lens.csv", index=False)
    _save_png_and_svg(plot_logit_lens(lens, before=before), out / "lens")


def _save_png_and_svg(fig: Figure, stem: Path) -> None:
    from rome_lens.plots import save_figure

    for suffix in (".png", ".svg"):
        save_figure(fig, stem.with_suffix(suffix))


def _demo(model: HookedTransformer, args: argparse.Namespace) -> list[Widget]:
    import rome_lens

    trace = rome_lens.trace_fact(model, DEMO_PROMPT, DEMO_SUBJECT, progress=not args.no_progress)
    widgets = [_save_trace(trace, args.out)]
    template = DEMO_PROMPT.replace(DEMO_SUBJECT, "{}")
    return widgets + _edit_and_lens(model, template, DEMO_SUBJECT, DEMO_NEW, DEMO_PROMPTS, args)


if __name__ == "__main__":
    sys.exit(main())
