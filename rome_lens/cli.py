"""The ``rome-lens`` command line (also ``python -m rome_lens``).

    rome-lens trace PROMPT --subject S [--target T] [--kinds resid mlp attn] --out DIR
    rome-lens edit PROMPT_TEMPLATE --subject S --new T [--method M] [--layer L | --layers L ...]
                   [--neighbor P ...] --out DIR
    rome-lens lens PROMPT [--targets T ...] --out DIR
    rome-lens microscope TEXT_OR_FILE [--adapter PATH] --out DIR
    rome-lens influence PROMPT COMPLETION --corpus FILE [--index DIR | --tuned FILE]
        [--layers L ...] --out DIR
    rome-lens demo [--out DIR]

Each command works on the default model (SmolLM2-135M-Instruct) unless
``--model-path`` names a Llama-family GGUF file or a folder written by
:func:`rome_lens.core.models.save_model`; ``--prepend-bos`` / ``--no-prepend-bos``
override whether prompts start with BOS. Each prints what it found and writes
its figures, CSV tables and an offline HTML report (``index.html``) into
``--out``. ``edit`` writes the fact with any registered editor (``--method rome``,
the default, ``memit``, ``alphaedit``, ``ft``, or one registered with
:func:`rome_lens.editing.register_editor` before :func:`main` runs).
``demo`` traces, edits and lenses the Eiffel Tower fact on one page;
``microscope`` reads a text with LLM-Microscope's metrics; ``influence`` ranks
the texts of a corpus by how much they raise a completion's probability, or,
with ``--tuned``, by which of them taught a fine-tuned model the completion.

Exit status: 0 when all went well; 1 when the science failed (a trace of a
fact the model does not know, unless ``--allow-unreliable``; an edit that did
not take, unless ``--allow-miss``); 2 for bad input, with a one-line message.
Arguments are parsed before anything heavy is imported, so ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rome_lens.analysis import LogitLens
    from rome_lens.core.backend import Model
    from rome_lens.editing import EditRequest, WeightEdit
    from rome_lens.tracing import CausalTrace
    from rome_lens.viz import Widget

__all__ = ["main"]

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
DEMO_SUBJECT = "The Eiffel Tower"
DEMO_NEW = "Rome"
DEMO_PROMPTS = {
    "edit": DEMO_PROMPT,
    "paraphrase": "Where is the Eiffel Tower? It is in the city of",
    "neighbor": "The Louvre is located in the city of",
}
SCIENCE_FAILED = 1
BAD_INPUT = 2


class _Failed(Exception):
    """The command ran, but what it found says nothing (exit status 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rome-lens",
        description="Locate and rewrite facts in TransformerLens models.",
        epilog="Exit status: 0 done, 1 the trace or edit failed (see the message), 2 bad input.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="trace, edit and lens the Eiffel Tower fact")
    _common(demo, "rome_lens_demo")

    trace = commands.add_parser("trace", help="causal trace of one prompt")
    trace.add_argument("prompt", help="the text whose next token is the answer")
    trace.add_argument("--subject", required=True, help="the substring of PROMPT to corrupt")
    trace.add_argument("--target", default=None, help="answer to score (default: clean top-1)")
    trace.add_argument(
        "--kinds",
        nargs="+",
        default=["resid", "mlp", "attn"],
        choices=["resid", "mlp", "attn"],
        help="states to restore: residual stream, MLP outputs, attention outputs (default: all)",
    )
    trace.add_argument("--samples", type=int, default=10, help="noise samples (default: 10)")
    trace.add_argument(
        "--window", type=int, default=10, help="layers restored together (default: 10)"
    )
    trace.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    trace.add_argument(
        "--allow-unreliable",
        action="store_true",
        help="exit 0 even when the model does not know the answer or the noise does not hide it",
    )
    _common(trace, "rome_lens_trace")

    edit = commands.add_parser("edit", help="rewrite one fact (ROME by default) and save the edit")
    edit.add_argument(
        "prompt_template",
        help='the prompt with {} where the subject goes, e.g. "{} is located in the city of"; '
        "a prompt without {} that contains the subject gets {} in its place (and says so)",
    )
    edit.add_argument("--subject", required=True, help="fills the template's {}")
    edit.add_argument("--new", required=True, help="the new answer")
    edit.add_argument(
        "--method",
        default="rome",
        help="the editor: rome, memit, alphaedit, ft, or a registered one (default: rome)",
    )
    where = edit.add_mutually_exclusive_group()
    where.add_argument("--layer", type=int, default=None, help="MLP layer (default: per model)")
    where.add_argument(
        "--layers", type=int, nargs="+", default=None, help="MLP layers, for memit and alphaedit"
    )
    edit.add_argument(
        "--neighbor", "--neighbour", dest="neighbors", nargs="*", default=[],
        help="prompts that must not change (--neighbour: the flag's name before 0.3)",
    )  # fmt: skip
    edit.add_argument(
        "--allow-miss",
        action="store_true",
        help="exit 0 even when the new answer does not take on the edit prompt",
    )
    _common(edit, "rome_lens_edit")

    lens = commands.add_parser("lens", help="logit lens of one prompt")
    lens.add_argument("prompt", help="the text to read layer by layer")
    lens.add_argument("--targets", nargs="*", default=None, help="answers to follow")
    _common(lens, "rome_lens_lens")

    micro = commands.add_parser(
        "microscope", help="LLM-Microscope: linearity, nonlinearity, predictions, context"
    )
    micro.add_argument("text", metavar="TEXT_OR_FILE", help="a text, or a path to a text file")
    micro.add_argument(
        "--reference-tokens",
        type=int,
        default=5000,
        help="tokens sampled from the model to fit the linear maps on (default: 5000)",
    )
    micro.add_argument(
        "--adapter", type=Path, default=None, help="a contextualization adapter saved earlier"
    )
    micro.add_argument(
        "--context-steps",
        type=int,
        default=100,
        help="training steps of a new adapter when --adapter is not given (default: 100)",
    )
    micro.add_argument("--no-context", action="store_true", help="skip contextualization")
    _common(micro, "rome_lens_microscope")

    infl = commands.add_parser("influence", help="which texts of a corpus drive a completion")
    infl.add_argument("prompt", help="the query's prompt")
    infl.add_argument(
        "completion_arg",
        nargs="?",
        metavar="COMPLETION",
        help="the answer whose probability counts (or --completion)",
    )
    infl.add_argument("--completion", default=None, help="the same as COMPLETION")
    infl.add_argument(
        "--corpus",
        required=True,
        type=Path,
        help="the texts: .txt (blank-line separated) or .jsonl",
    )
    infl.add_argument(
        "--layers", type=int, nargs="+", default=None, help="MLP layers (default: every layer)"
    )
    infl.add_argument(
        "--fit-tokens",
        type=int,
        default=20_000,
        help="corpus tokens the EK-FAC factors average over (default: 20000)",
    )
    infl.add_argument(
        "--strategy",
        choices=["ekfac", "kfac", "diagonal", "identity"],
        default="ekfac",
        help="curvature approximation (default: ekfac)",
    )
    infl.add_argument("--top-k", type=int, default=20, help="texts to show (default: 20)")
    infl.add_argument(
        "--prefilter", type=int, default=None, help="score only BM25's top texts (default: all)"
    )
    infl.add_argument(
        "--index",
        type=Path,
        default=None,
        help="a gradient index of the corpus in this folder, built there on first use: "
        "later queries read it instead of scanning the corpus",
    )
    infl.add_argument(
        "--tuned",
        type=Path,
        default=None,
        help="a fine-tune of the model saved by FineTuned.save: rank the texts it was trained "
        "on by which taught the completion (the attribution recipe)",
    )
    _common(infl, "rome_lens_influence")
    return parser


def _common(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument(
        "--out", type=Path, default=Path(out), help=f"output folder (default: {out})"
    )
    command.add_argument(
        "--model-path", type=Path, default=None, help="a .gguf file or a saved-model folder"
    )
    command.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start every prompt with the tokenizer's BOS (default: the model's own choice; "
        "none for SmolLM2)",
    )
    command.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 1 (the trace or edit failed) or 2 (bad input).
    """
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        run = {
            "demo": _demo,
            "trace": _trace,
            "edit": _edit,
            "lens": _lens,
            "microscope": _microscope,
            "influence": _influence,
        }[args.command]
        failures: list[str] = []
        widgets = run(_model(args.model_path, args.prepend_bos), args, failures)
        from rome_lens.viz import report

        path = report(args.out / "index.html", *widgets, title=f"rome-lens {args.command}")
        print(f"report: {path}")
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"rome-lens: error: {message}", file=sys.stderr)
        return BAD_INPUT
    for failure in failures:
        print(f"rome-lens: {failure}", file=sys.stderr)
    return SCIENCE_FAILED if failures else 0


def _check_args(args: argparse.Namespace) -> None:
    if args.command == "influence":
        _resolve_completion(args)
    for name in ("samples", "window", "reference_tokens", "context_steps", "fit_tokens", "top_k"):
        value = getattr(args, name, 1)
        if value < 1:
            flag = name.replace("_", "-")
            raise ValueError(f"--{flag} must be a positive integer, got {value}")


def _resolve_completion(args: argparse.Namespace) -> None:
    """COMPLETION may come as the second positional or as --completion, not as two answers."""
    given = {c for c in (args.completion_arg, args.completion) if c is not None}
    if not given:
        raise ValueError("influence needs a COMPLETION: rome-lens influence PROMPT COMPLETION ...")
    if len(given) > 1:
        raise ValueError(
            f"two completions given, {args.completion_arg!r} and --completion "
            f"{args.completion!r}: pass one"
        )
    args.completion = given.pop()


def _model(path: Path | None, prepend_bos: bool | None) -> Model:
    from rome_lens.core.models import load_model, load_model_path

    if path is None:
        return load_model(prepend_bos=prepend_bos)
    model = load_model_path(path)
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = prepend_bos
    return model


def _trace(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    from rome_lens.tracing import UnreliableTraceWarning, trace_fact

    with _silenced(UnreliableTraceWarning):  # printed below, in the CLI's words
        trace = trace_fact(
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
    widget = _save_trace(trace, args.out)
    if trace.problems and not args.allow_unreliable:
        failures.append(
            "the trace is unreliable (pass --allow-unreliable to accept it): "
            + "; ".join(trace.problems)
        )
    return [widget]


def _save_trace(trace: CausalTrace, out: Path) -> Widget:
    from rome_lens.viz import plot_trace, trace_widget

    print(f"prompt: {trace.prompt!r}  subject: {trace.subject!r}  target: {trace.target_str!r}")
    print(f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f}")
    for problem in trace.problems:
        print(f"warning: {problem}")
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


def _edit(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    template = args.prompt_template
    if "{}" not in template:
        if args.subject not in template:
            raise ValueError(
                f"the prompt template {template!r} has no {{}} and does not contain the subject "
                f"{args.subject!r}: write {{}} where the subject goes"
            )
        template = template.replace(args.subject, "{}", 1)
        print(f"note: the template had no {{}}; using {template!r} ({{}} for the subject)")
    prompts = {"edit": template.replace("{}", args.subject, 1)}
    prompts |= {f"neighbor {i + 1}": p for i, p in enumerate(args.neighbors)}
    return _edit_and_lens(model, template, args.subject, args.new, prompts, args, failures)


def _edit_and_lens(
    model: Model,
    template: str,
    subject: str,
    new: str,
    prompts: dict[str, str],
    args: argparse.Namespace,
    failures: list[str],
) -> list[Widget]:
    """Edit the fact, print and save before/after, and lens the prompt on both sides."""
    from rome_lens.analysis import logit_lens
    from rome_lens.editing import edited
    from rome_lens.viz import edit_widget, logit_lens_widget

    edit = _compute_edit(model, _EditArgs.of(args, template, subject, new))
    args.out.mkdir(parents=True, exist_ok=True)
    edit.save(args.out / "edit.safetensors")
    shown = edit_widget(model, edit, prompts)
    table = shown.to_dataframe()
    table.to_csv(args.out / "edit.csv", index=False)
    print(f"edited {', '.join(edit.deltas())}{_timing(edit)}")
    for label, rows in table.groupby("label", sort=False):
        top = rows.iloc[0]
        print(
            f"{label}: {top['prompt']!r}: before {top['before']!r} ({top['p_before']:.3f}), "
            f"after {top['after']!r} ({top['p_after']:.3f})"
        )
    (outcome,) = edit.outcomes
    verdict = "took" if outcome.took else "did NOT take"
    print(
        f"the edit {verdict}: p({new!r}) {outcome.p_new_before:.4f} -> {outcome.p_new:.4f}, "
        f"rank {outcome.rank_new} after the edit"
    )
    if not outcome.took and not getattr(args, "allow_miss", False):
        failures.append(
            f"the edit did not take: {new!r} is at rank {outcome.rank_new} with "
            f"p = {outcome.p_new:.4f} after the edit (pass --allow-miss to accept it)"
        )
    print(f"saved the edit to {args.out / 'edit.safetensors'}")
    before_top = table.iloc[0]["before"]
    targets = [new] + ([before_top] if before_top.strip() and before_top.strip() != new else [])
    before = logit_lens(model, prompts["edit"], targets=targets, progress=False)
    with edited(model, edit):
        after = logit_lens(model, prompts["edit"], targets=targets, progress=False)
    _save_lens(after, args.out, before=before)
    return [shown, logit_lens_widget(after, before=before)]


@dataclass(frozen=True)
class _EditArgs:
    """What ``edit`` and ``demo`` ask of the editor."""

    method: str
    """The editor's registered name."""
    layers: list[int] | None
    """The layers (``None``: the editor's default)."""
    request: EditRequest
    """The fact."""
    progress: bool
    """Show progress bars."""

    @classmethod
    def of(cls, args: argparse.Namespace, template: str, subject: str, new: str) -> _EditArgs:
        """The request and options from the parsed arguments (``demo`` has no ``--method``)."""
        from rome_lens.editing import EditRequest

        layer, layers = getattr(args, "layer", None), getattr(args, "layers", None)
        chosen = [layer] if layer is not None else layers
        request = EditRequest(template, subject, new)
        return cls(getattr(args, "method", "rome"), chosen, request, not args.no_progress)


def _compute_edit(model: Model, asked: _EditArgs) -> WeightEdit:
    """The edit of the one request, by the registered editor asked for, misses not warned."""
    from rome_lens.editing import EditMissWarning, get_editor

    editor = get_editor(asked.method)
    with _silenced(EditMissWarning):  # printed by the caller, in the CLI's words
        return editor.edit(model, [asked.request], layers=asked.layers, progress=asked.progress)


def _timing(edit: WeightEdit) -> str:
    """`` in 1.2 s (+ 3.4 s for key statistics)``, as far as the edit recorded its times
    (ROME and MEMIT as fields, FT+L in its ``info``; an editor of your own perhaps not)."""
    notes = getattr(edit, "info", {})
    seconds = getattr(edit, "seconds", notes.get("seconds"))
    if seconds is None:
        return ""
    stats_seconds = getattr(edit, "stats_seconds", 0.0)
    stats = f" (+ {stats_seconds:.1f} s for key statistics)" if stats_seconds > 1 else ""
    return f" in {seconds:.1f} s{stats}"


def _lens(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    from rome_lens.analysis import logit_lens
    from rome_lens.viz import logit_lens_widget

    lens = logit_lens(model, args.prompt, targets=args.targets or None, progress=False)
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


def _microscope(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    """Token nonlinearity, intermediate predictions, contextualization, linearity, geometry."""
    from rome_lens.analysis import (
        ContextAdapter,
        ContextHyperParams,
        contextualization,
        fit_linear_maps,
        intermediate_predictions,
        representation_geometry,
        token_nonlinearity,
        train_context_adapter,
    )

    path = Path(args.text)
    text = path.read_text() if path.is_file() else args.text
    progress = not args.no_progress
    maps = fit_linear_maps(model, n_tokens=args.reference_tokens, progress=progress)
    results = [
        token_nonlinearity(model, text, maps=maps, progress=progress),
        intermediate_predictions(model, text, progress=progress),
    ]
    if not args.no_context:
        if args.adapter is not None:
            adapter = ContextAdapter.load(args.adapter, model=model)
        else:
            hparams = ContextHyperParams(steps=args.context_steps)
            adapter = train_context_adapter(model, hparams=hparams, progress=progress)
        results.append(contextualization(model, text, adapter, progress=progress))
    results.append(maps)
    results.append(
        representation_geometry(model, n_tokens=min(args.reference_tokens, 2048), progress=progress)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    widgets = []
    for result in results:
        name = result.kind
        result.to_dataframe().to_csv(args.out / f"{name}.csv", index=False)
        _save_png_and_svg(result.plot(), args.out / name)
        widget = result.widget()
        print(" ".join(html.unescape(re.sub(r"<[^>]+>", "", s)) for s in widget.summary))
        widgets.append(widget)
    return widgets


def _influence(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    """Fit EK-FAC factors on the corpus, then rank its texts for the query."""
    from rome_lens.influence import (
        FineTuned,
        ScoreSettings,
        build_gradient_index,
        fit_influence_factors,
        influence,
    )

    progress = not args.no_progress
    tuned = None if args.tuned is None else FineTuned.load(args.tuned, model=model)
    if tuned is not None and (args.index is not None or args.prefilter is not None):
        raise ValueError("--tuned scores every text in each model state: drop --index/--prefilter")
    with contextlib.nullcontext() if tuned is None else tuned.applied(model):
        factors = fit_influence_factors(
            model,
            args.corpus,
            layers=args.layers,
            n_tokens=args.fit_tokens,
            strategy=args.strategy if args.strategy in ("ekfac", "diagonal") else "kfac",
            progress=progress,
        )
    index = None
    if args.index is not None:  # completed where shards are missing, reused as it is otherwise
        index = build_gradient_index(model, factors, args.corpus, args.index, progress=progress)
    settings = (
        ScoreSettings(layers=args.layers)
        if tuned is not None
        else ScoreSettings(strategy=args.strategy, prefilter=args.prefilter)
    )
    result = influence(
        model,
        factors,
        args.prompt,
        args.completion,
        args.corpus,
        top_k=args.top_k,
        settings=settings,
        progress=progress,
        index=index,
        recipe=None if tuned is None else "attribution",
        tuned=tuned,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = result.to_dataframe()
    table.to_csv(args.out / "influence.csv", index=False)
    _save_png_and_svg(result.plot(), args.out / "influence")
    for row in table.head(5).itertuples():
        flat = " ".join(str(row.text).split())
        print(f"{row.rank}. text {row.text_id}: score {row.score:.4g}  {flat[:80]!r}")
    return [result.widget()]


def _save_lens(lens: LogitLens, out: Path, *, before: LogitLens | None = None) -> None:
    from rome_lens.viz import plot_logit_lens

    lens.to_dataframe().to_csv(out / "lens.csv", index=False)
    _save_png_and_svg(plot_logit_lens(lens, before=before), out / "lens")


def _save_png_and_svg(fig: Figure, stem: Path) -> None:
    from rome_lens.viz import save_figure

    for suffix in (".png", ".svg"):
        save_figure(fig, stem.with_suffix(suffix))


def _demo(model: Model, args: argparse.Namespace, failures: list[str]) -> list[Widget]:
    from rome_lens.tracing import UnreliableTraceWarning, trace_fact

    with _silenced(UnreliableTraceWarning):
        trace = trace_fact(model, DEMO_PROMPT, DEMO_SUBJECT, progress=not args.no_progress)
    widgets = [_save_trace(trace, args.out)]
    failures += trace.problems
    template = DEMO_PROMPT.replace(DEMO_SUBJECT, "{}")
    return widgets + _edit_and_lens(
        model, template, DEMO_SUBJECT, DEMO_NEW, DEMO_PROMPTS, args, failures
    )


@contextmanager
def _silenced(category: type[Warning]) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield


if __name__ == "__main__":
    sys.exit(main())
