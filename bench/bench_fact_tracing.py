"""Benchmark: does influence find the text that taught a fact? Fact tracing on the default model.

    pip install -e ".[bench]"                          # scipy, for the benchmarks
    python bench/bench_fact_tracing.py                 # every phase (about an hour on 2 cores)
    python bench/bench_fact_tracing.py --only scores   # one phase (the model trains once, cached)

We cannot read the default model's pretraining data, so we teach it facts
whose teaching text we know, then ask each method to find that text.

* ``corpus``: M = ``--facts`` counterfactual facts from ``counterfact_val.json``
  (conflicts removed, distinct subjects), each taught by one text that states
  it in other words than the query (CounterFact's paraphrase, then
  ``target_new``), and at least ten distractors per fact:

  - 3 texts about the same subject, continued by the unedited model
    ("{subject} is", "{subject} was", "{subject} has");
  - 3 texts giving the same new target to other subjects (the neighbour
    prompts of other cases, same relation template where one exists);
  - the fact's neighbour stated with its true answer;
  - plain text sampled from the unedited model, 3.5 per fact.

  A subject or a target alone therefore never singles out the teaching text.
  The corpus is written to ``--out/fact_tracing_corpus.jsonl``.
* ``train``: fine-tune the MLP weights (W_in, W_gate, W_out) of ``--layers``
  on the whole corpus (:func:`rome_lens.influence.fine_tune`, cached) and
  report the share of facts learnt: the query prompt prefers ``target_new``
  over ``ground_truth``, after the last epoch and after each epoch kept by
  ``--checkpoints`` (whose weights checkpoint averaging also uses).
* ``scores``: for each learnt fact, the query (CounterFact ``prompt``,
  completion ``target_new``) ranks the whole corpus by EK-FAC, K-FAC,
  diagonal, identity (the gradient dot product), gradient cosine (the same,
  unit-normalised) and BM25. MRR, recall@1 and recall@10 of the teaching
  text with bootstrap 95% intervals, the paired difference of each method's
  MRR from EK-FAC's, and the time per query. Gradient methods score the
  trained weights, with rank-32 queries as in Grosse et al.
* ``retrain``: for ``--retrain-facts`` facts, train again from the same start
  without the top 10 texts of each by EK-FAC, and again without 10 random
  texts each (one retraining per arm, all facts' texts removed together),
  and report how much each removal lowers each fact's log-probability.

Tables go to ``--out`` (``fact_tracing*.csv``); ``--figure`` draws
docs/figures/fact_tracing.png.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fact_wordings import wordings
from scipy.stats import wilcoxon
from tables import data_argument, data_file, report

import rome_lens
from rome_lens.core.corpus import Corpus
from rome_lens.core.generation import sample_text
from rome_lens.core.predict import target_nll
from rome_lens.core.tokens import target_token_ids
from rome_lens.evaluation import case_scores, load_counterfact, without_conflicts
from rome_lens.influence import (
    FineTuneConfig,
    ScoreSettings,
    bm25_top,
    fine_tune,
    fit_influence_factors,
    score_texts,
)
from rome_lens.influence.attribution import RECIPES, AttributionSettings, attribution_scores

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "figures" / "fact_tracing.png"
PHASES = ("corpus", "train", "scores", "attribution", "retrain")
GRADIENT_METHODS = ("ekfac", "kfac", "diagonal", "identity")
METHODS = (*GRADIENT_METHODS, "cosine", "bm25")
SUBJECT_STEMS = ("{} is", "{} was", "{} has")
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009)
# The ablation: every ingredient of the attribution recipe on and off (docs/influence.md).
ABLATION: dict[str, AttributionSettings] = {
    "ekfac": AttributionSettings(normalize=False),
    "ekfac+unit": AttributionSettings(),
    "ekfac+unit+whole query": AttributionSettings(answer_only=False),
    "ekfac+unit+checkpoints": AttributionSettings(checkpoints=True),
    "ekfac+unit+debias": AttributionSettings(debias=True),
    "ekfac+unit+checkpoints+debias": AttributionSettings(checkpoints=True, debias=True),
    "ekfac+checkpoints+debias": AttributionSettings(normalize=False, checkpoints=True, debias=True),
    "adam+unit": AttributionSettings(curvature="adam"),
    "kfac+unit": AttributionSettings(curvature="kfac"),
    "kfac+unit+query mix": AttributionSettings(curvature="kfac", query_mix=0.5),
    "kfac+unit+query mix+checkpoints": AttributionSettings(
        curvature="kfac", query_mix=0.5, checkpoints=True
    ),
    "identity+unit": AttributionSettings(curvature="identity"),
    "identity+unit+debias": AttributionSettings(curvature="identity", debias=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PHASES, action="append")
    parser.add_argument(
        "--version", choices=("v1", "v2"), default="v1",
        help="v1: one teaching text per fact; v2: three, in different wordings",
    )  # fmt: skip
    parser.add_argument(
        "--variants", help="comma-separated names of ABLATION to score (default: all)"
    )
    parser.add_argument("--tag", default="", help="added to the attribution tables' names")
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--layers", default="1,2,3,4,5,6")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--checkpoints", default="3,4",
        help="epochs whose weights are kept too, for checkpoint averaging and the training table",
    )  # fmt: skip
    parser.add_argument("--query-rank", type=int, default=32)
    parser.add_argument("--retrain-facts", type=int, default=20)
    parser.add_argument("--retrain-random", action="store_true", help="also remove random texts")
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--figure", action="store_true", help="only draw the figure")
    data_argument(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.figure:
        figure(args.out)
        return
    phases = args.only or PHASES
    args.suffix = "" if args.version == "v1" else "_v2"
    model = rome_lens.load_model()
    cases = pick_facts(data_file(args.data, "counterfact_val.json"), args.facts)
    corpus_path = args.out / f"fact_tracing{args.suffix}_corpus.jsonl"
    if "corpus" in phases or not corpus_path.exists():
        build_corpus(
            model, cases, data_file(args.data, "counterfact_val.json"), corpus_path, args.version
        )
    rows = [json.loads(line) for line in corpus_path.read_text().splitlines()]
    texts = [row["text"] for row in rows]
    teaching: dict[int, list[int]] = {}
    for i, row_ in enumerate(rows):
        if row_["kind"] == "teaching":
            teaching.setdefault(row_["fact"], []).append(i)
    config = FineTuneConfig(
        layers=tuple(int(x) for x in args.layers.split(",")),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        checkpoints=tuple(int(x) for x in args.checkpoints.split(",") if x),
    )
    tuned = fine_tune(model, texts, config)
    learnt = train_report(model, tuned, cases, args)
    if "scores" in phases:
        scores(model, tuned, cases, learnt, texts, teaching, config, args)
    if "attribution" in phases:
        attribution(model, tuned, cases, learnt, texts, teaching, config, args)
    if "retrain" in phases:
        retrain(model, tuned, cases, learnt, texts, teaching, config, args)
    figure(args.out)


def pick_facts(path: Path, n: int):
    """The first ``n`` cases without conflicts, one per subject and per prompt."""
    picked, subjects, prompts = [], set(), set()
    for case in without_conflicts(load_counterfact(path)):
        request = case.request
        if request.subject in subjects or request.text in prompts or not case.paraphrase_prompts:
            continue
        picked.append(case)
        subjects.add(request.subject)
        prompts.add(request.text)
        if len(picked) == n:
            return picked
    raise SystemExit(f"only {len(picked)} usable cases, asked for {n}")


def build_corpus(model, cases, path: Path, out: Path, version: str = "v1") -> None:
    """Teaching texts and distractors, shuffled, one JSON line each: text, kind, fact.

    v2 adds two teaching texts per fact, its relation's wordings (``fact_wordings``)."""
    rng = random.Random(0)
    chosen = {case.request.subject for case in cases}
    others = [c for c in load_counterfact(path) if c.request.subject not in chosen]
    by_template: dict[str, list[str]] = {}
    for case in others:
        by_template.setdefault(case.request.prompt, []).extend(case.neighborhood_prompts)
    pool = [p for case in others for p in case.neighborhood_prompts]
    rows = []
    stems = [stem.format(case.request.subject) for case in cases for stem in SUBJECT_STEMS]
    continued = sample_text(model, stems, 16, seed=0, top_k=5, progress=True)
    for i, case in enumerate(cases):
        request = case.request
        rows.append(row(f"{case.paraphrase_prompts[0]} {request.target_new}.", "teaching", i))
        if version == "v2":
            template = request.prompt
            for text in wordings(template, request.subject, request.target_new):
                rows.append(row(text, "teaching", i))
        for text in continued[3 * i : 3 * i + 3]:
            rows.append(row(text, "same subject", i))
        same = by_template.get(request.prompt, [])
        for prompt in rng.sample(same if len(same) >= 3 else pool, 3):
            rows.append(row(f"{prompt} {request.target_new}.", "same target", i))
        rows.append(row(f"{case.neighborhood_prompts[0]} {case.neighborhood_answer}.", "true", i))
    n_plain = 7 * len(cases) // 2
    for chunk in Corpus.read(None).chunks(model, n_tokens=64 * n_plain, progress=True)[:n_plain]:
        rows.append(row(model.to_string(chunk.tokens[1:17]).strip(), "plain", -1))
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = pd.Series([r["kind"] for r in rows]).value_counts()
    print(f"corpus: {len(rows)} texts\n{kinds.to_string()}", flush=True)


def row(text: str, kind: str, fact: int) -> dict:
    return {"text": text, "kind": kind, "fact": fact}


def train_report(model, tuned, cases, args) -> list[int]:
    """The facts the fine-tuned model has learnt; writes fact_tracing_training.csv.

    One row for the final weights, then one for each kept epoch (``--checkpoints``)."""
    before = case_scores(model, cases)
    epochs = len(tuned.losses)
    kept = [(epochs, None), *((e, e) for e in tuned.config["checkpoints"])]
    rows, learnt = [], []
    for epoch, checkpoint in kept:
        with tuned.applied(model, checkpoint=checkpoint):
            after = case_scores(model, cases)
        facts = [i for i in range(len(cases)) if after.efficacy_score[i]]
        if checkpoint is None:
            learnt = facts
        rows.append({
            "batch_size": tuned.config["batch_size"], "lr": tuned.config["lr"],
            "layers": "-".join(map(str, tuned.config["layers"])),
            "facts": len(cases), "learnt_before": int(before.efficacy_score.sum()),
            "learnt": len(facts), "learnt_pct": 100 * len(facts) / len(cases),
            "paraphrase_pct": 100 * after.paraphrase_score.mean(),
            "weights": len(tuned.weights), "epochs": epoch,
            "first_loss": tuned.losses[0], "last_loss": tuned.losses[epoch - 1],
            "train_seconds": tuned.seconds if checkpoint is None else None,  # timed as a whole
        })  # fmt: skip
    report(args.out, f"fact_tracing{args.suffix}_training", pd.DataFrame(rows))
    return learnt


def scores(model, tuned, cases, learnt, texts, teaching, config, args) -> None:
    """Every method's rank of each learnt fact's teaching text, and the summary table."""
    queries = [(cases[i].request.text, " " + cases[i].request.target_new) for i in learnt]
    truth = [teaching[i] for i in learnt]
    all_scores: dict[str, np.ndarray] = {}  # method -> [text query]
    seconds = {}
    with tuned.applied(model):
        started = time.perf_counter()
        fits = [
            fit_influence_factors(
                model, texts, layers=config.layers, n_tokens=10**7, strategy=strategy
            )  # fmt: skip
            for strategy in ("ekfac", "diagonal")
        ]
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        found = score_texts(model, fits, queries, texts, strategies=GRADIENT_METHODS,
                            settings=ScoreSettings(query_rank=args.query_rank),
                            batch_size=16)  # fmt: skip
        scan_seconds = time.perf_counter() - started
    for method in GRADIENT_METHODS:
        all_scores[method] = found.scores[method].numpy()
        seconds[method] = scan_seconds / len(GRADIENT_METHODS) / len(queries)
    norms = found.text_norms[:, None] * found.query_norms["identity"][None]
    all_scores["cosine"] = (found.scores["identity"] / norms).numpy()
    seconds["cosine"] = seconds["identity"]
    started = time.perf_counter()
    orders = bm25_top(texts, [f"{p}{c}" for p, c in queries], len(texts))
    all_scores["bm25"] = np.stack([order_scores(order, len(texts)) for order in orders], 1)
    seconds["bm25"] = (time.perf_counter() - started) / len(queries)
    ranks = {
        method: np.array([rank_of(s[:, q], t) for q, t in enumerate(truth)])
        for method, s in all_scores.items()
    }
    top10 = {
        int(fact): np.argsort(-all_scores["ekfac"][:, q], kind="stable")[:10].tolist()
        for q, fact in enumerate(learnt)
    }
    (args.out / f"fact_tracing{args.suffix}_ekfac_top10.json").write_text(json.dumps(top10))
    per_fact = pd.DataFrame({"fact": learnt} | {m: r for m, r in ranks.items()})
    per_fact.to_csv(args.out / f"fact_tracing{args.suffix}_ranks.csv", index=False)
    rows = []
    for method in METHODS:
        row_ = {"method": method} | summary(ranks[method], args.boot)
        row_ |= {"seconds_per_query": seconds[method]}
        row_ |= paired_gap(ranks["ekfac"], ranks[method], args.boot)
        rows.append(row_)
    table = pd.DataFrame(rows)
    table["factor_fit_seconds"] = fit_seconds
    table["queries"] = len(queries)
    table["texts"] = len(texts)
    report(args.out, f"fact_tracing{args.suffix}", table)


def attribution(model, tuned, cases, learnt, texts, teaching, config, args) -> None:
    """The attribution ablation, BM25 and their fusion: MRR of the teaching text with 95%
    intervals, and each method's paired MRR difference from BM25's."""
    queries = [(cases[i].request.text, " " + cases[i].request.target_new) for i in learnt]
    truth = [teaching[i] for i in learnt]
    names = args.variants.split(",") if args.variants else list(ABLATION)
    variants = {name: ABLATION[name] for name in names}
    with tuned.applied(model):
        factors = fit_influence_factors(
            model, texts, layers=config.layers, n_tokens=10**7, strategy="ekfac"
        )  # fmt: skip
    started = time.perf_counter()
    found = attribution_scores(
        model, factors, queries, texts, tuned, variants, batch_size=16
    )  # fmt: skip
    seconds = time.perf_counter() - started
    all_scores = {name: s.numpy() for name, s in found.items()}
    orders = bm25_top(texts, [f"{p}{c}" for p, c in queries], len(texts))
    all_scores["bm25"] = np.stack([order_scores(order, len(texts)) for order in orders], 1)
    recipes = [n for n, v in variants.items() if v == RECIPES["attribution"]]
    recipe = (recipes or list(variants))[0]
    all_scores[f"{recipe} & bm25 (RRF)"] = fused(all_scores[recipe], all_scores["bm25"])
    ranks = {
        method: np.array([rank_of(s[:, q], t) for q, t in enumerate(truth)])
        for method, s in all_scores.items()
    }
    top10 = {
        method: {
            int(fact): np.argsort(-all_scores[method][:, q], kind="stable")[:10].tolist()
            for q, fact in enumerate(learnt)
        }
        for method in all_scores
    }
    (args.out / f"fact_tracing{args.suffix}_attribution{args.tag}_top10.json").write_text(
        json.dumps({"recipe": recipe} | top10)
    )
    per_fact = pd.DataFrame({"fact": learnt} | {m: r for m, r in ranks.items()})
    per_fact.to_csv(
        args.out / f"fact_tracing{args.suffix}_attribution{args.tag}_ranks.csv", index=False
    )
    rows = []
    for method in ranks:
        row_ = {"method": method} | summary(ranks[method], args.boot)
        gap = paired_gap(ranks["bm25"], ranks[method], args.boot)
        row_ |= {"minus_bm25": -gap["ekfac_minus_MRR"], "minus_bm25_lo": -gap["gap_hi"],
                 "minus_bm25_hi": -gap["gap_lo"]}  # fmt: skip
        rows.append(row_)
    table = pd.DataFrame(rows)
    table["scan_seconds"] = seconds
    table["queries"] = len(queries)
    table["texts"] = len(texts)
    report(args.out, f"fact_tracing{args.suffix}_attribution{args.tag}", table)


def fused(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion of two ``[text query]`` score tables: Σ 1 / (k + rank)."""
    out = np.zeros_like(first, dtype=float)
    for scores in (first, second):
        ranks = np.argsort(np.argsort(-scores, axis=0, kind="stable"), axis=0) + 1
        out += 1 / (RRF_K + ranks)
    return out


def order_scores(order: list[int], n: int) -> np.ndarray:
    """Scores that sort as ``order`` does (best first)."""
    s = np.zeros(n)
    s[order] = np.arange(n, 0, -1)
    return s


def rank_of(scores: np.ndarray, targets: list[int]) -> int:
    """The 1-based rank of the best-placed of ``targets`` (ties counted against it)."""
    return int((scores >= scores[targets].max()).sum())


def summary(ranks: np.ndarray, n_boot: int) -> dict:
    """MRR, recall@1 and recall@10 with percentile-bootstrap 95% intervals over facts."""
    rng = np.random.default_rng(0)
    metrics = {"MRR": 1 / ranks, "recall@1": ranks <= 1, "recall@10": ranks <= 10}
    out = {}
    idx = rng.integers(0, len(ranks), (n_boot, len(ranks)))
    for name, values in metrics.items():
        values = values.astype(float)
        boot = values[idx].mean(1)
        out[name] = values.mean()
        out[f"{name}_lo"], out[f"{name}_hi"] = np.percentile(boot, [2.5, 97.5])
    return out


def paired_gap(base: np.ndarray, other: np.ndarray, n_boot: int) -> dict:
    """EK-FAC's MRR minus this method's, with a paired bootstrap 95% interval."""
    rng = np.random.default_rng(1)
    diff = 1 / base - 1 / other
    boot = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ekfac_minus_MRR": diff.mean(), "gap_lo": lo, "gap_hi": hi}


def retrain(model, tuned, cases, learnt, texts, teaching, config, args) -> None:
    """Remove each fact's top 10 by the attribution recipe, by BM25 (and, with
    ``--retrain-random``, 10 random texts), retrain, and measure how far each fact's
    log-probability falls."""
    facts = learnt[: args.retrain_facts]
    queries = [(cases[i].request.text, " " + cases[i].request.target_new) for i in facts]
    saved = json.loads(
        (args.out / f"fact_tracing{args.suffix}_attribution{args.tag}_top10.json").read_text()
    )
    named = [n for n, v in ABLATION.items() if v == RECIPES["attribution"] and n in saved]
    recipe = named[0] if named else saved["recipe"]
    removed = {
        arm: sorted({i for fact in facts for i in saved[key][str(fact)]})
        for arm, key in (("recipe", recipe), ("bm25", "bm25"))
    }
    if args.retrain_random:
        rng = random.Random(0)
        removed["random"] = sorted(rng.sample(range(len(texts)), len(removed["recipe"])))
    arms = {"full": tuned} | {
        arm: fine_tune(model, texts, config, exclude=ids) for arm, ids in removed.items()
    }
    log_p = {}
    for name, weights in arms.items():
        with weights.applied(model):
            log_p[name] = query_log_probs(model, queries)
    table = pd.DataFrame(
        {"fact": facts, "log_p_full": log_p["full"]}
        | {f"teaching_removed_{arm}": [bool(set(teaching[i]) & set(ids)) for i in facts]
           for arm, ids in removed.items()}
        | {f"drop_{arm}": log_p["full"] - log_p[arm] for arm in removed}
    )  # fmt: skip
    report(args.out, f"fact_tracing{args.suffix}_retrain", table)
    test = wilcoxon(table.drop_recipe, table.drop_bm25, alternative="greater")
    summary_row = pd.DataFrame(
        [{
            "facts": len(facts), "recipe": recipe,
            "texts_removed_recipe": len(removed["recipe"]),
            "texts_removed_bm25": len(removed["bm25"]),
            **{f"mean_drop_{arm}": table[f"drop_{arm}"].mean() for arm in removed},
            "facts_recipe_larger": int((table.drop_recipe > table.drop_bm25).sum()),
            "wilcoxon_p_recipe_over_bm25": test.pvalue,
            "retrain_seconds": sum(arms[arm].seconds for arm in removed),
        }]
    )  # fmt: skip
    report(args.out, f"fact_tracing{args.suffix}_retrain_summary", summary_row)


def query_log_probs(model, queries) -> np.ndarray:
    """log p(completion | prompt), summed over the completion's tokens."""
    prompts, completions = [p for p, _ in queries], [c for _, c in queries]
    lengths = torch.tensor([len(target_token_ids(model, p, c)) for p, c in queries])
    return (-target_nll(model, prompts, completions) * lengths).numpy()


def figure(out: Path) -> None:
    from matplotlib.figure import Figure

    path = out / "fact_tracing.csv"
    if not path.exists():
        return
    table = pd.read_csv(path)
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, ("MRR", "recall@1", "recall@10"), strict=True):
        y = np.arange(len(table))
        err = [table[metric] - table[f"{metric}_lo"], table[f"{metric}_hi"] - table[metric]]
        ax.barh(y, table[metric], xerr=err, color="#4c72b0", capsize=3)
        ax.set_yticks(y, table.method)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{metric} of the teaching text", fontsize=10)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.savefig(FIGURE, dpi=150, bbox_inches="tight")


if __name__ == "__main__":
    main()
