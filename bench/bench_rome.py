"""Benchmark: ROME editing on CounterFact with the default model.

    python bench/bench_rome.py                       # everything below, ~1 hour on 2 cores
    python bench/bench_rome.py --only layers         # one phase

Phases (all seeded, cases in file order from ``--data``/counterfact_val.json):

* ``stats``: time of the key statistics per layer (first layer includes sampling the corpus);
* ``layers``: ES / PS / NS / S of ROME at several layers (picks the default layer);
* ``n_tokens``: the same edits with statistics over more or fewer tokens (and C = I);
  v* does not depend on C, so each case is optimised once and only u is re-solved;
* ``main``: unedited and ROME over ``--cases`` cases, with median edit time;
* ``ft``: the FT+L baseline over ``--ft-cases`` cases;
* ``sequential``: ``--sequential`` ROME edits applied one after another;
* ``variants``: which keys the update maps exactly to v* (``key_match``:
  the averaged k*, the bare prompt's key, or both) on ``--cases`` cases in one
  run; v* does not depend on it, so each case is optimised once;
* ``latency``: ``--latency-cases`` ROME edits, each beside the reference
  implementation's own v* loop (ROME's ``compute_v``: every context prompt
  forward and backward through the whole model at every step), re-implemented
  here and run for as many steps as the edit took.

Tables are printed and written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
from tables import data_argument, data_file, report

import rome_lens
from rome_lens.core.backend import Model
from rome_lens.editing import default_layer, edited, rome_edit
from rome_lens.evaluation import (
    CounterFactCase,
    case_scores,
    evaluate_edits,
    load_counterfact,
    overall_score,
    sequential_edits,
    summarize,
)
from rome_lens.stats import key_second_moment

PHASES = ("stats", "layers", "n_tokens", "main", "ft", "sequential", "variants", "latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--sweep-cases", type=int, default=20)
    parser.add_argument("--layers", default="2,4,6,8")
    parser.add_argument("--n-tokens", default="2000,5000,20000")
    parser.add_argument("--ft-cases", type=int, default=200)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--fluency-cases", type=int, default=20)
    parser.add_argument("--latency-cases", type=int, default=10)
    parser.add_argument("--generation-tokens", type=int, default=50)
    parser.add_argument("--only", choices=PHASES, action="append")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    data_argument(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.precision", 3)
    torch.manual_seed(0)

    model = rome_lens.load_model()
    cases = load_counterfact(data_file(args.data, "counterfact_val.json"))
    layer = default_layer(model)
    phases = args.only or PHASES
    layers = [int(x) for x in args.layers.split(",")]
    if "stats" in phases:
        report(args.out, "rome_stats", stats_times(model, layers))
    if "layers" in phases:
        rows = []
        for candidate in layers:
            result = evaluate_edits(
                model, cases[: args.sweep_cases], "rome", layer=candidate, fluency=False
            )
            rows.append({"layer": candidate, **result.summary().iloc[0].to_dict()})
        report(args.out, "rome_layers", pd.DataFrame(rows))
    if "n_tokens" in phases:
        sizes = [int(x) for x in args.n_tokens.split(",")]
        sweep = n_tokens_sweep(model, cases[: args.sweep_cases], layer, sizes)
        report(args.out, "rome_n_tokens", sweep)
    if "main" in phases:
        results = pd.concat(
            evaluate_edits(
                model,
                cases[: args.cases],
                method,
                layer=layer,
                fluency=args.fluency_cases,
                generation_tokens=args.generation_tokens,
            ).to_dataframe()
            for method in ("none", "rome")
        )
        results.to_csv(args.out / "rome_cases.csv", index=False)
        report(args.out, "rome_main", summarize(results))
    if "ft" in phases:
        results = evaluate_edits(
            model,
            cases[: args.ft_cases],
            "ft",
            layer=layer,
            fluency=args.fluency_cases,
            generation_tokens=args.generation_tokens,
        ).to_dataframe()
        results.to_csv(args.out / "ft_cases.csv", index=False)
        report(args.out, "rome_ft", summarize(results))
    if "sequential" in phases:
        n = args.sequential
        checkpoints = sorted({1, 10, 25, 50, 75, n})
        curve = sequential_edits(
            model, cases[:n], checkpoints=checkpoints, layer=layer
        ).to_dataframe()
        report(args.out, "rome_sequential", curve)
    if "variants" in phases:
        variants = key_match_variants(
            model, cases[: args.cases], layer, partial=args.out / "rome_variants.partial.csv"
        )
        report(args.out, "rome_variants", variants)
    if "latency" in phases:
        report(args.out, "rome_latency", latency(model, cases[: args.latency_cases], layer))


def stats_times(model: Model, layers: list[int]) -> pd.DataFrame:
    rows = []
    for layer in layers:
        start = time.perf_counter()
        stats = key_second_moment(model, layer, use_cache=False, progress=False)
        rows.append(
            {
                "layer": layer,
                "seconds": time.perf_counter() - start,
                "n_tokens": stats.n_tokens,
                "condition_number": stats.condition_number,
            }
        )
    return pd.DataFrame(rows)


def n_tokens_sweep(
    model: Model, cases: list[CounterFactCase], layer: int, sizes: list[int]
) -> pd.DataFrame:
    """ROME scores with C from ``sizes`` tokens and with C = I, reusing each case's v*."""
    variants = {
        f"{n} tokens": key_second_moment(model, layer, n_tokens=n, progress=False) for n in sizes
    }
    scores: dict[str, list[pd.DataFrame]] = {name: [] for name in ["C = I", *variants]}
    for case in cases:
        edit = rome_edit(model, case.request, layer=layer, progress=False)
        for name in scores:
            stats = variants.get(name)
            u = edit.key if stats is None else torch.linalg.solve(stats.moment, edit.key)
            variant = dataclasses.replace(edit, left=u / (u @ edit.key))
            with edited(model, variant):
                scores[name].append(case_scores(model, [case]))
    rows = []
    for name, frames in scores.items():
        df = pd.concat(frames)
        es, ps, ns = (
            100 * df[f"{m}_score"].mean() for m in ("efficacy", "paraphrase", "neighborhood")
        )
        rows.append(
            {"statistics": name, "ES": es, "PS": ps, "NS": ns, "S": overall_score([es, ps, ns])}
        )
    return pd.DataFrame(rows)


def key_match_variants(
    model: Model, cases: list[CounterFactCase], layer: int, partial: Path | None = None
) -> pd.DataFrame:
    """ES / PS / NS of each ``key_match``, the unedited model beside them, reusing each v*.

    Every 20 cases the table so far is written to ``partial``, so a run cut short keeps it.
    """
    from rome_lens.editing import memory
    from rome_lens.editing.rome import KEY_MATCHES, _left_vector

    stats = key_second_moment(model, layer, progress=False)
    moment = stats.regularized(stats.ridge(1e10))
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in ("unedited", *KEY_MATCHES)}
    seconds = []
    for case in cases:
        frames["unedited"].append(case_scores(model, [case]))
        started = time.perf_counter()
        edit = rome_edit(model, case.request, layer=layer, stats=stats, progress=False)
        seconds.append(time.perf_counter() - started)
        bare = memory.compute_keys(model, [case.request], layer, ["{}"])[0]
        u = torch.linalg.solve(moment, edit.key)
        chosen = {"averaged": edit.key[None], "bare": bare[None],
                  "both": torch.stack([edit.key, bare])}  # fmt: skip
        for name in KEY_MATCHES:
            variant = dataclasses.replace(edit, left=_left_vector(u, chosen[name], moment))
            with edited(model, variant):
                frames[name].append(case_scores(model, [case]))
        if partial is not None and len(seconds) % 20 == 0:
            _variants_table(frames, seconds).to_csv(partial, index=False)
    if partial is not None:
        _variant_cases(frames, seconds).to_csv(
            partial.with_name("rome_variants_cases.csv"), index=False
        )
    return _variants_table(frames, seconds)


def _variant_cases(frames: dict[str, list[pd.DataFrame]], seconds: list[float]) -> pd.DataFrame:
    """One row per case and variant, with the seconds its ROME edit took."""
    parts = []
    for name, case_frames in frames.items():
        df = pd.concat(case_frames, ignore_index=True)
        parts.append(df.assign(key_match=name, edit_s=seconds[: len(df)]))
    return pd.concat(parts, ignore_index=True)


def _variants_table(frames: dict[str, list[pd.DataFrame]], seconds: list[float]) -> pd.DataFrame:
    rows = []
    for name, parts in frames.items():
        df = pd.concat(parts)
        es, ps, ns = (
            100 * df[f"{m}_score"].mean() for m in ("efficacy", "paraphrase", "neighborhood")
        )
        rows.append({"key_match": name, "cases": len(df), "ES": es, "PS": ps, "NS": ns,
                     "S": overall_score([es, ps, ns])})  # fmt: skip
    table = pd.DataFrame(rows)
    table["median_edit_s"] = float(pd.Series(seconds).median())
    return table


def latency(model: Model, cases: list[CounterFactCase], layer: int) -> pd.DataFrame:
    """Each edit's time beside the reference v* loop's for the same number of steps."""
    stats = key_second_moment(model, layer, progress=False)
    rows = []
    for case in cases:
        started = time.perf_counter()
        edit = rome_edit(model, case.request, layer=layer, stats=stats, progress=False)
        seconds = time.perf_counter() - started
        steps = len(edit.losses)
        reference = reference_v_loop(model, case.request, layer, steps)
        rows.append({"case_id": case.case_id, "steps": steps, "rome_lens_edit_s": seconds,
                     "reference_v_loop_s": reference, "ratio": reference / seconds})  # fmt: skip
    table = pd.DataFrame(rows)
    median = table.median(numeric_only=True)
    print(f"median edit {median.rome_lens_edit_s:.1f} s; reference v* loop alone "
          f"{median.reference_v_loop_s:.1f} s; ratio {median.ratio:.2f}")  # fmt: skip
    return table


def reference_v_loop(model: Model, request: rome_lens.EditRequest, layer: int, steps: int) -> float:
    """Seconds for ``steps`` steps of ROME's own v* loop on the same prompts.

    Every step runs every context prompt (with the target but its last token) and the
    KL prompt, right-padded, through all layers, takes the full logits, and goes
    backward through all of it: what ROME's ``compute_v`` does. δ is added to
    ``blocks.{layer}.hook_mlp_out`` at each prompt's last subject token. The loss has
    the same NLL and KL terms; its decay is left unscaled, which costs the same.
    """
    from rome_lens.core.hooks import add_at_rows, attached
    from rome_lens.core.runtime import frozen, pad
    from rome_lens.editing import ROMEHyperParams
    from rome_lens.editing.memory import _ValueProblem, context_templates

    hparams = ROMEHyperParams()
    problem = _ValueProblem.build(model, request, context_templates(model, hparams), hparams)
    tokens, mask = pad([torch.tensor(s) for s in problem.sequences], 0, "right")
    rows = torch.arange(len(problem.sequences))
    subject_last = torch.tensor(problem.subject_last)
    n_target = len(problem.target_ids)
    lengths = mask.sum(1)
    answers = torch.tensor(problem.target_ids)
    delta = torch.zeros(model.cfg.d_model, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    init_kl = None
    started = time.perf_counter()
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            hook = add_at_rows(rows, subject_last, delta.expand(len(rows), -1))
            with attached(model, [(f"blocks.{layer}.hook_mlp_out", hook)]):
                log_probs = model(tokens, attention_mask=mask).log_softmax(-1)  # [seq pos vocab]
            nll = 0.0
            for row in range(len(rows) - 1):
                first = int(lengths[row]) - n_target
                picked = log_probs[row, first : first + n_target].gather(1, answers[:, None])
                nll = nll - picked.mean()
            nll = nll / (len(rows) - 1)
            kl_log_probs = log_probs[-1, int(lengths[-1]) - 1]
            if init_kl is None:
                init_kl = kl_log_probs.detach()
            kl = (kl_log_probs.exp() * (kl_log_probs - init_kl)).sum()
            loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * delta.norm()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
