"""Benchmark: LLM-Microscope on the default model, and rome_lens against the released code.

    python bench/bench_microscope.py                    # every phase, ~35 min on 2 cores
    python bench/bench_microscope.py --only compare     # one phase

Phases (results in ``--out``, figures and numbers in docs/figures):

* ``compare``: linearity, anisotropy and intrinsic dimension of the default
  model's residual streams, rome_lens against LLM-Microscope 0.0.7 on the same
  activations; then intrinsic dimension's time and peak memory at 1,024, 4,096
  and 16,384 points, each run in a process of its own (theirs stopped after
  ``--their-limit`` seconds);
* ``linearity``: each block's linearity with and without the residual stream
  over 5,000 tokens sampled from the model;
* ``context``: contextualization adapters trained with the frozen and the full
  decoder; their agreement on the same tokens (Spearman); contextualization by
  word class with bootstrap 95% intervals; its correlation with token
  nonlinearity (Pearson); the frozen adapter is saved for the notebook;
* ``removal``: how many of ROME's known facts the model still answers top-1
  after removing stop words, punctuation, or both from the prompts;
* ``cost``: seconds per training step of each adapter variant, alone on the
  machine (``context`` trains both for the figures; this times them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import string
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tables import data_argument, data_file, peak_mib, record_numbers, report, reset_peak

import rome_lens
from rome_lens.analysis import (
    ContextHyperParams,
    anisotropy_of,
    contextualization,
    fit_linear_maps,
    linearity_score,
    residual_states,
    token_nonlinearity,
    train_context_adapter,
    two_nn_dimension,
)
from rome_lens.core import predict_next

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "docs" / "figures"
ADAPTER = HERE / "results" / "context_adapter_frozen.st"
PHASES = ("compare", "linearity", "context", "removal", "cost")
DETERMINERS = {
    "the", "a", "an", "this", "that", "these", "those", "its", "his", "her", "their", "our",
    "my", "your", "some", "any", "each", "every", "no", "another",
}  # fmt: skip
STOP_WORDS = {
    "of", "in", "on", "at", "to", "for", "with", "by", "from", "as", "into", "about", "and",
    "or", "but", "if", "than", "then", "so", "is", "are", "was", "were", "be", "been", "being",
    "has", "have", "had", "do", "does", "did", "will", "would", "can", "could", "it", "he",
    "she", "they", "we", "you", "i", "him", "them", "which", "who", "whom", "what", "where",
    "when", "not", "also", "there",
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PHASES, action="append")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--steps", type=int, default=600, help="adapter training steps")
    parser.add_argument("--their-limit", type=int, default=600, help="seconds per run of theirs")
    parser.add_argument("--points", type=int, help=argparse.SUPPRESS)  # one timing, in a child
    parser.add_argument("--impl", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    data_argument(parser)
    args = parser.parse_args()
    if args.points is not None:
        print(json.dumps(time_dimension(args.impl, args.points)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(exist_ok=True)
    model = rome_lens.load_model()
    phases = args.only or PHASES
    path = FIGURES / "microscope_numbers.txt"
    if "compare" in phases:
        record_numbers(path, compare(model, args))
    if "linearity" in phases:
        record_numbers(path, linearity(model, args))
    if "context" in phases:
        record_numbers(path, context(model, args))
    if "removal" in phases:
        record_numbers(path, removal(model, args))
    if "cost" in phases:
        record_numbers(path, cost(model))


# --------------------------------------------------------------------------- compare


def released():
    """LLM-Microscope 0.0.7's functions.py, loaded on its own (its __init__ fails to import)."""
    spec = importlib.util.find_spec("llm_microscope")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-microscope==0.0.7 (in the dev extras)")
    path = Path(next(iter(spec.submodule_search_locations))) / "functions.py"
    module_spec = importlib.util.spec_from_file_location("llm_microscope_functions", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def compare(model, args) -> list[str]:
    functions = released()
    states = residual_states(model, None, n_tokens=1024).states.double()
    rows = []
    for depth in range(states.shape[0]):
        row = {"depth": depth}
        row["anisotropy_ours"] = anisotropy_of(states[depth])
        row["anisotropy_theirs"] = functions.calculate_anisotropy_torch(states[depth])
        if depth + 1 < states.shape[0]:
            x, y = states[depth], states[depth + 1]
            row["linearity_ours"] = linearity_score(x, y)
            row["linearity_theirs"] = functions.procrustes_similarity(x, y)
            row["without_residual_ours"] = linearity_score(x, y - x)
            row["without_residual_theirs"] = functions.procrustes_similarity(x, y - x)
        rows.append(row)
    for depth in (0, 10, 20, 30):
        started = time.perf_counter()
        theirs = functions.intrinsic_dimension(states[depth], "cpu")
        rows[depth]["dimension_theirs"] = theirs
        rows[depth]["dimension_ours"] = two_nn_dimension(states[depth], fit_fraction=0.2)
        rows[depth]["dimension_theirs_seconds"] = time.perf_counter() - started
    table = pd.DataFrame(rows)
    report(args.out, "microscope_agreement", table)
    worst = {
        name: float((table[f"{name}_ours"] - table[f"{name}_theirs"]).abs().max())
        for name in ("linearity", "without_residual", "anisotropy", "dimension")
    }
    timing = [
        child(impl, n, args.their_limit) for n in (1024, 4096, 16384) for impl in ("ours", "theirs")
    ]
    timings = pd.DataFrame(timing)
    report(args.out, "microscope_dimension_speed", timings)
    lines = [f"agreement with llm-microscope 0.0.7 (max abs difference, 1,024 tokens): {worst}"]
    for n in (1024, 4096, 16384):
        ours = timings[(timings.points == n) & (timings.impl == "ours")].iloc[0]
        theirs = timings[(timings.points == n) & (timings.impl == "theirs")].iloc[0]
        ratio = theirs.seconds / ours.seconds if theirs.finished else float("nan")
        lines.append(
            f"intrinsic dimension at {n:,} points: ours {ours.seconds:.2f} s / "
            f"{ours.peak_MiB} MiB, theirs {theirs.seconds:.1f} s / {theirs.peak_MiB} MiB"
            + ("" if theirs.finished else f" (did not finish: {theirs.stopped})")
            + (f", ours {ratio:.0f}x faster" if theirs.finished else "")
        )
    return lines


MEMORY_LIMIT = 20 * 2**30  # bytes of address space a timed process may take


def child(impl: str, points: int, limit: int) -> dict[str, object]:
    """Time one implementation at one size in a process of its own (its own peak memory),
    stopped after ``limit`` seconds or 20 GiB of address space."""
    command = [sys.executable, __file__, "--points", str(points), "--impl", impl]
    started = time.perf_counter()
    failed = {"impl": impl, "points": points, "peak_MiB": None, "finished": False}

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, preexec_fn=cap
        )
    except subprocess.TimeoutExpired:
        return failed | {"seconds": time.perf_counter() - started, "stopped": "time limit"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return failed | {"seconds": time.perf_counter() - started, "stopped": tail[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"finished": True, "stopped": ""}


def time_dimension(impl: str, points: int) -> dict[str, object]:
    """Intrinsic dimension of ``points`` tokens of the last residual stream, timed."""
    model = rome_lens.load_model()
    states = residual_states(model, None, n_tokens=points, progress=False).states[-1].double()
    del model
    before = reset_peak()
    started = time.perf_counter()
    if impl == "ours":
        dimension = two_nn_dimension(states, fit_fraction=0.2)
    else:
        dimension = released().intrinsic_dimension(states, "cpu")
    seconds = time.perf_counter() - started
    return {"impl": impl, "points": points, "seconds": seconds,
            "peak_MiB": peak_mib() - before, "dimension": dimension}  # fmt: skip


# --------------------------------------------------------------------------- linearity


def linearity(model, args) -> list[str]:
    maps = fit_linear_maps(model, n_tokens=5000)
    table = maps.to_dataframe()
    report(args.out, "microscope_linearity", table)
    maps.plot(path=FIGURES / "microscope_linearity.png")
    return [
        f"linearity over 5,000 sampled tokens: with the residual "
        f"{table.linearity.min():.3f}-{table.linearity.max():.3f} "
        f"(mean {table.linearity.mean():.3f}); "
        f"without {table.linearity_without_residual.min():.3f}-"
        f"{table.linearity_without_residual.max():.3f} "
        f"(mean {table.linearity_without_residual.mean():.3f})"
    ]


# --------------------------------------------------------------------------- context


def fact_paragraphs(data: Path, n: int = 40, per: int = 8) -> list[str]:
    """ROME's known facts written out as sentences, ``per`` to a paragraph."""
    facts = json.loads(data_file(data, "known_1000.json").read_text())
    sentences = [f"{f['prompt']} {f['attribute']}." for f in facts[: n * per]]
    return [" ".join(sentences[i : i + per]) for i in range(0, len(sentences), per)]


def word_class(token: str) -> str:
    """punctuation, determiner, other stop word or other (content words and word pieces)."""
    stripped = token.strip()
    if stripped and all(c in string.punctuation for c in stripped):
        return "punctuation"
    word = stripped.lower()
    if word in DETERMINERS:
        return "determiner"
    if word in STOP_WORDS:
        return "other stop word"
    return "other"


def context(model, args) -> list[str]:
    texts = fact_paragraphs(args.data)
    adapters, seconds = {}, {}
    for decoder in ("frozen", "full"):
        hparams = ContextHyperParams(decoder=decoder, steps=args.steps)
        started = time.perf_counter()
        adapters[decoder] = train_context_adapter(model, hparams=hparams, use_cache=False)
        seconds[decoder] = time.perf_counter() - started
    adapters["frozen"].save(ADAPTER)
    maps = fit_linear_maps(model, n_tokens=5000)
    rows = []
    for i, text in enumerate(texts):
        frozen = contextualization(model, text, adapters["frozen"], progress=False)
        full = contextualization(model, text, adapters["full"], progress=False)
        nonlinear = token_nonlinearity(model, text, maps=maps, progress=False)
        for t, token in enumerate(frozen.str_tokens):
            rows.append({
                "text": i, "token": t, "str_token": token, "class": word_class(token),
                "frozen": float(frozen.scores[t]), "full": float(full.scores[t]),
                "nonlinearity": float(nonlinear.errors[:, t].mean()),
            })  # fmt: skip
    table = pd.DataFrame(rows).dropna()
    table.to_csv(args.out / "microscope_tokens.csv", index=False)
    spearman = pearson(table.frozen.rank(), table.full.rank())[0]
    classes = []
    for name, group in table.groupby("class"):
        for decoder in ("frozen", "full"):
            low, high = bootstrap(group[decoder])
            mean = group[decoder].mean()
            classes.append(
                {"class": name, "decoder": decoder, "tokens": len(group), "mean_C": mean,
                 "ci_low": low, "ci_high": high}
            )  # fmt: skip
    by_class = pd.DataFrame(classes).sort_values(["decoder", "mean_C"])
    report(args.out, "microscope_word_classes", by_class)
    plot_classes(by_class)
    r_frozen, p_frozen = pearson(table.nonlinearity, table.frozen)
    r_full, p_full = pearson(table.nonlinearity, table.full)
    losses = pd.DataFrame({d: a.losses for d, a in adapters.items()})
    report(args.out, "microscope_adapter_losses", losses.iloc[:: max(1, len(losses) // 20)])
    per_step = {d: seconds[d] / args.steps for d in seconds}
    lines = [
        f"contextualization: {len(table):,} tokens of {len(texts)} fact paragraphs; "
        f"{args.steps} steps each; frozen {seconds['frozen']:.0f} s "
        f"({per_step['frozen']:.2f} s/step), full {seconds['full']:.0f} s "
        f"({per_step['full']:.2f} s/step); final loss frozen "
        f"{losses.frozen.tail(50).mean():.2f}, full {losses.full.tail(50).mean():.2f}",
        f"contextualization agreement frozen vs full: Spearman {spearman:.3f}",
        f"nonlinearity vs contextualization: Pearson r = {r_frozen:.3f} (p = {p_frozen:.2g}) "
        f"frozen, {r_full:.3f} (p = {p_full:.2g}) full",
    ]
    for decoder in ("frozen", "full"):
        order = by_class[by_class.decoder == decoder]
        lines.append(
            f"word classes by mean C ({decoder}, lowest = most context): "
            + "; ".join(
                f"{r['class']} {r.mean_C:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] n={r.tokens}"
                for _, r in order.iterrows()
            )  # fmt: skip
        )
    return lines


def pearson(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value (normal approximation of Student's t, n > 100)."""
    r = float(x.corr(y))
    n = len(x)
    t = r * math.sqrt((n - 2) / max(1 - r * r, 1e-12))
    return r, math.erfc(abs(t) / math.sqrt(2))


def bootstrap(values: pd.Series, draws: int = 2000) -> tuple[float, float]:
    """The 95% bootstrap interval of the mean (seeded)."""
    data = torch.tensor(values.to_numpy(), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(len(data), (draws, len(data)), generator=generator)
    means = data[index].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def plot_classes(by_class: pd.DataFrame) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    names = list(by_class[by_class.decoder == "frozen"]["class"])
    for k, decoder in enumerate(("frozen", "full")):
        rows = by_class[by_class.decoder == decoder].set_index("class").loc[names]
        x = torch.arange(len(names)) + (k - 0.5) * 0.38
        ax.bar(x, rows.mean_C, 0.36, label=f"{decoder} decoder",
               yerr=[rows.mean_C - rows.ci_low, rows.ci_high - rows.mean_C], capsize=3)  # fmt: skip
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean C (lower: more context)")
    low = by_class.ci_low.min()
    ax.set_ylim(low - 0.1 * (by_class.ci_high.max() - low), None)
    ax.legend(fontsize=8)
    fig.savefig(FIGURES / "microscope_word_classes.png", dpi=150, bbox_inches="tight")


def cost(model, steps: int = 30) -> list[str]:
    """Seconds per step of each decoder variant: (time of 1 + steps) − (time of 1), so reading
    the training tokens' residual streams is left out; that is timed on its own."""
    seconds, reading = {}, 0.0
    for decoder in ("frozen", "full"):
        took = []
        for n in (1, 1 + steps):
            hparams = ContextHyperParams(decoder=decoder, steps=n)
            adapter = train_context_adapter(model, hparams=hparams, use_cache=False,
                                            progress=False)  # fmt: skip
            took.append(adapter.seconds)
        seconds[decoder] = (took[1] - took[0]) / steps
        reading = took[0] - seconds[decoder]
    hparams = ContextHyperParams()
    return [
        f"adapter training cost: frozen {seconds['frozen']:.2f} s/step, full "
        f"{seconds['full']:.2f} s/step ({hparams.tokens_per_step} tokens a step); reading the "
        f"{hparams.n_tokens:,} training tokens' residual streams {reading:.0f} s once"
    ]


# --------------------------------------------------------------------------- removal


def removal(model, args) -> list[str]:
    facts = json.loads(data_file(args.data, "known_1000.json").read_text())
    answers = [f["attribute"] for f in facts]
    closed = DETERMINERS | STOP_WORDS
    variants = {
        "unchanged": lambda words: words,
        "no stop words": lambda words: [w for w in words if strip(w) not in closed],
        "no punctuation": lambda words: [bare for w in words if (bare := strip_marks(w))],
        "neither": lambda words: [
            bare for w in words if (bare := strip_marks(w)) and strip(w) not in closed
        ],
    }
    rows = []
    for name, edit in variants.items():
        prompts = [" ".join(edit(f["prompt"].split())) or f["prompt"] for f in facts]
        known = predict_next(model, prompts, targets=answers).target_is_top
        rows.append({"prompts": name, "answered_top_1": int(known.sum()), "of": len(facts)})
    table = pd.DataFrame(rows)
    report(args.out, "microscope_removal", table)
    return ["token removal (known facts answered top-1): " + "; ".join(
        f"{r.prompts} {r.answered_top_1}/{r.of}" for r in table.itertuples())]  # fmt: skip


def strip(word: str) -> str:
    return word.strip(string.punctuation).lower()


def strip_marks(word: str) -> str:
    return word.strip(string.punctuation)


if __name__ == "__main__":
    main()
