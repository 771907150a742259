"""The ``rome-lens`` command line (also ``python -m rome_lens``).

    rome-lens demo [--out DIR]
    rome-lens trace PROMPT --subject S [--target T] [--kinds resid mlp attn] [--out DIR]

Each command loads the default model (SmolLM2-135M-Instruct), writes a heatmap,
a CSV of every score and an HTML page into its output folder, and prints where
they are. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_SUBJECT = "The Eiffel Tower"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rome-lens", description="Locate and rewrite facts in TransformerLens models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="trace the Eiffel Tower fact on the default model")
    demo.add_argument("--out", type=Path, default=Path("rome_lens_demo"), help="output folder")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    trace = commands.add_parser("trace", help="causal trace of one prompt")
    trace.add_argument("prompt")
    trace.add_argument("--subject", required=True, help="the substring of PROMPT to corrupt")
    trace.add_argument("--target", default=None, help="answer to score (default: clean top-1)")
    trace.add_argument("--kinds", nargs="+", default=["resid", "mlp", "attn"])
    trace.add_argument("--samples", type=int, default=10)
    trace.add_argument("--window", type=int, default=10)
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--out", type=Path, default=Path("rome_lens_trace"), help="output folder")
    trace.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _trace(
    prompt: str,
    subject: str,
    out: Path,
    *,
    progress: bool,
    target: str | None = None,
    kinds: Sequence[str] = ("resid", "mlp", "attn"),
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
) -> None:
    import rome_lens
    from rome_lens.report import trace_page

    model = rome_lens.load_model()
    trace = rome_lens.trace_fact(
        model,
        prompt,
        subject,
        target=target,
        kinds=kinds,
        samples=samples,
        window=window,
        seed=seed,
        progress=progress,
    )
    print(f"prompt: {prompt!r}  subject: {subject!r}  target: {trace.target_str!r}")
    print(f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}")
    for kind in trace.kinds:
        peak = trace.peak(kind)
        print(
            f"peak {kind:>5}: token {peak.token} {peak.str_token!r}, layer {peak.layer}, "
            f"p = {peak.score:.3f} (indirect effect {peak.indirect_effect:+.3f})"
        )
    out.mkdir(parents=True, exist_ok=True)
    trace.plot(out / "trace.png")
    trace.to_dataframe().to_csv(out / "trace.csv", index=False)
    (out / "index.html").write_text(trace_page(trace, image="trace.png"))
    print(f"wrote {out / 'trace.png'}, {out / 'trace.csv'} and {out / 'index.html'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.no_progress
    try:
        if args.command == "demo":
            _trace(DEMO_PROMPT, DEMO_SUBJECT, args.out, progress=progress)
        else:
            _trace(
                args.prompt,
                args.subject,
                args.out,
                progress=progress,
                target=args.target,
                kinds=args.kinds,
                samples=args.samples,
                window=args.window,
                seed=args.seed,
            )
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        print(f"rome-lens: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
