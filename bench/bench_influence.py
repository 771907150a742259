"""Benchmark: influence functions on the default model, and rome_lens against kronfluence 1.0.1.

    pip install --no-deps kronfluence==1.0.1 opt_einsum einconv   # this benchmark's own set-up
    python bench/bench_influence.py                  # every phase but fit100k, ~25 min on 2 cores
    python bench/bench_influence.py --only compare   # one phase

The training texts are facts in plain sentences: ROME's known facts and the
true facts of the CounterFact cases ("BBC One, by BBC."), about 4,800 texts.
The queries are ten facts the default model answers.

Phases (tables in ``--out``, numbers in docs/figures/influence_numbers.txt):

* ``compare``: kronfluence 1.0.1 on the same model as a Hugging Face
  ``LlamaForCausalLM`` (built from the same dequantised GGUF weights), both
  tracking every layer's ``W_out`` (``mlp.down_proj``) with EK-FAC, the
  empirical Fisher and damping 0.1 × mean(Λ): the factors' relative
  differences, the Spearman correlation of the pairwise scores, and each
  one's wall time;
* ``speed``: factor fitting in tokens per second; scanning in texts per second
  with 1 and 10 queries, against a plain forward and backward pass over the
  same texts; the two ways to score a text, per-text gradient
  ``Σ_t ā_t g_tᵀ`` dotted with ``P`` (used) or the issue's ``Σ_t g_tᵀ P ā_t``;
  peak memory of each;
* ``rank``: rank-32 preconditioned queries (the paper's option) against full rank;
* ``lowrank``: cutting 16 query gradients of ``W_out``'s shape to rank 32 by a
  full SVD, against the Gram-matrix route ``low_rank`` takes;
* ``index``: a gradient index of the fact-tracing corpus (2,300 texts,
  ``bench/results/fact_tracing_corpus.jsonl``) against today's scan, W_out of
  every layer with EK-FAC: ten CounterFact queries scored exactly by one scan,
  then from an index built once per basis (``--index-bases``): a projected
  one at rank ``--index-rank`` (sub-blocks of it give every lower rank: the
  bases are nested), a tokens one (float32 or bfloat16) scored with queries
  cut to ranks 8, 16, 32, 64 and at full rank. Spearman correlation with the exact
  scores and top-10 agreement per rank; for ``--timed-bases``, build and
  query times against one single-query scan (the query's preparation and the
  products apart), disk bytes per text, and what 10⁶ texts would cost;
* ``fit100k``: EK-FAC factors of every MLP weight of all 30 layers over
  100,000 tokens the model samples itself, the default path (not in the
  default run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from tables import data_argument, data_file, peak_mib, record_numbers, report, reset_peak

import rome_lens
from rome_lens.core.corpus import Corpus, bos_tokens, token_batches
from rome_lens.core.runtime import frozen, linear_layout
from rome_lens.core.tokens import prompt_tokens, target_token_ids
from rome_lens.influence import (
    EigenQueries,
    IndexSettings,
    ScoreSettings,
    build_gradient_index,
    fit_influence_factors,
    influence,
    influence_many,
    mlp_weights,
    preconditioned_gradients,
    query_gradients,
)
from rome_lens.stats.moments import next_token_loss

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "docs" / "figures"
PHASES = ("compare", "speed", "rank", "lowrank", "index", "fit100k")
N_QUERIES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PHASES, action="append")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--fit-texts", type=int, default=1000, help="texts the factors fit on")
    parser.add_argument("--scan-texts", type=int, default=512, help="texts scored per query")
    parser.add_argument("--index-rank", type=int, default=64, help="rank swept up to")
    parser.add_argument("--timed-rank", type=int, default=32, help="rank of a timed projection")
    parser.add_argument("--timed-query-rank", type=int, default=32,
                        help="query rank against a timed tokens index")  # fmt: skip
    parser.add_argument("--index-bases", default="tokens,tokens-bf16,eigen,random,whitened",
                        help="indexes built and compared")  # fmt: skip
    parser.add_argument("--timed-bases", default="tokens,tokens-bf16", help="indexes timed")
    parser.add_argument("--index-texts", type=int, help="the corpus's first texts (a quick run)")
    data_argument(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = rome_lens.load_model()
    texts, queries = fact_texts(args.data), fact_queries(args.data)
    phases = args.only or PHASES[:-1]
    path = FIGURES / "influence_numbers.txt"
    fit_texts, scan_texts = texts[: args.fit_texts], texts[: args.scan_texts]
    if "compare" in phases:
        record_numbers(path, compare(model, fit_texts, scan_texts, queries, args))
    if "speed" in phases:
        record_numbers(path, speed(model, fit_texts, scan_texts, queries, args))
    if "rank" in phases:
        record_numbers(path, rank(model, fit_texts, texts, queries, args))
    if "lowrank" in phases:
        record_numbers(path, low_rank_speed(args))
    if "index" in phases:
        record_numbers(path, index_speed(model, fit_texts, args))
    if "fit100k" in phases:
        record_numbers(path, fit_100k(model, args))


def low_rank_speed(args) -> list[str]:
    """Rank-32 cuts of 16 query gradients of W_out's shape: full SVD against the Gram route."""
    from rome_lens.influence.scores import low_rank

    generator = torch.Generator().manual_seed(0)
    # a decaying spectrum, as preconditioned gradients have
    u = torch.linalg.qr(torch.randn(16, 1536, 576, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(16, 576, 576, generator=generator)).Q
    m = (u * torch.logspace(0, -4, 576)[None, None]) @ v.mT
    started = time.perf_counter()
    uu, ss, vh = torch.linalg.svd(m, full_matrices=False)
    svd_product = (uu[..., :32] * ss[..., None, :32]) @ vh[..., :32, :]
    svd_s = time.perf_counter() - started
    started = time.perf_counter()
    left, right = low_rank(m, 32)
    gram_s = time.perf_counter() - started
    error = float((left @ right.mT - svd_product).norm() / svd_product.norm())
    table = pd.DataFrame([{"svd_s": svd_s, "gram_s": gram_s, "ratio": svd_s / gram_s,
                           "relative_difference": error}])  # fmt: skip
    report(args.out, "influence_low_rank_speed", table)
    return [f"lowrank: full SVD {svd_s:.2f} s, Gram route {gram_s:.2f} s "
            f"({svd_s / gram_s:.1f}x), products differ by {error:.1e} (relative)"]  # fmt: skip


def fact_texts(data: Path) -> list[str]:
    """ROME's known facts and CounterFact's true facts as sentences, shuffled (seed 0)."""
    known = json.loads(data_file(data, "known_1000.json").read_text())
    cases = json.loads(data_file(data, "counterfact_val.json").read_text())
    texts = [f"{k['prompt']} {k['attribute']}." for k in known]
    texts += [f"{c['prompt']} {c['ground_truth']}." for c in cases]
    texts += [f"{c['rephrase_prompt']} {c['ground_truth']}." for c in cases]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    return [texts[i] for i in order]


def fact_queries(data: Path) -> list[tuple[str, str]]:
    """The Eiffel Tower and nine facts the default model answers."""
    known = json.loads(data_file(data, "known_smollm2.json").read_text())
    eiffel = ("The Eiffel Tower is located in the city of", " Paris")
    return [eiffel] + [(k["prompt"], " " + k["attribute"]) for k in known[: N_QUERIES - 1]]


# --------------------------------------------------------------------------- timing


def timed(work, *args, **kwargs):
    """``(result, seconds, peak MiB above the memory in use before)`` of one call."""
    before = reset_peak()
    started = time.perf_counter()
    result = work(*args, **kwargs)
    return result, time.perf_counter() - started, peak_mib() - before


# --------------------------------------------------------------------------- compare


def compare(model, fit_texts, scan_texts, queries, args) -> list[str]:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        raise SystemExit("pip install --no-deps kronfluence==1.0.1 opt_einsum einconv") from None
    layers = list(range(model.cfg.n_layers))
    n_tokens = count_tokens(model, fit_texts)
    ours_factors, ours_fit, ours_fit_mib = timed(
        fit_influence_factors, model, fit_texts, weights=["W_out"], n_tokens=n_tokens,
        fisher="empirical", use_cache=False, progress=False,
    )  # fmt: skip
    ours_results, ours_scan, ours_scan_mib = timed(
        influence_many, model, ours_factors, queries, scan_texts, top_k=1,
        settings=ScoreSettings(weights=("W_out",)), progress=False,
    )  # fmt: skip
    ours_scores = torch.stack([r.all_scores for r in ours_results])  # [query text]
    theirs = kronfluence_run(model, fit_texts, scan_texts, queries, layers)
    rows = []
    for layer in layers:
        name, module = f"blocks.{layer}.mlp.W_out", f"model.layers.{layer}.mlp.down_proj"
        a = rebuild(ours_factors.input_vectors[name], ours_factors.input_values[name])
        s = rebuild(ours_factors.output_vectors[name], ours_factors.output_values[name])
        lam = ours_factors.eigen_lambda[name].double()
        rows.append(
            {
                "layer": layer,
                "A_rel_diff": relative(a, theirs["A"][module]),
                "S_rel_diff": relative(s, theirs["S"][module]),
                "lambda_rel_diff": relative(lam, theirs["lambda"][module].T),
            }
        )
    table = pd.DataFrame(rows)
    report(args.out, "influence_factor_agreement", table)
    theirs_scores = theirs["scores"]
    overall = spearmanr(ours_scores.flatten(), theirs_scores.flatten()).statistic
    per_query = [spearmanr(ours_scores[q], theirs_scores[q]).statistic for q in range(len(queries))]
    ours_peak = max(ours_fit_mib, ours_scan_mib)
    timing = pd.DataFrame(
        [
            {"impl": "rome_lens", "fit_s": ours_fit, "scan_s": ours_scan, "peak_MiB": ours_peak},
            {"impl": "kronfluence"} | {k: theirs[k] for k in ("fit_s", "scan_s", "peak_MiB")},
        ]
    )
    report(args.out, "influence_kronfluence_timing", timing)
    return [
        f"kronfluence factors ({len(fit_texts)} texts, {n_tokens:,} tokens, W_out of {len(layers)} "
        f"layers): worst relative difference A {table.A_rel_diff.max():.1e}, "
        f"S {table.S_rel_diff.max():.1e}, Λ {table.lambda_rel_diff.max():.1e}",
        f"kronfluence scores ({len(queries)} queries × {len(scan_texts)} texts): Spearman "
        f"{overall:.5f} over all pairs, lowest per query {min(per_query):.5f}",
        f"kronfluence time: fit {ours_fit:.0f} s (ours) vs {theirs['fit_s']:.0f} s; "
        f"scan {ours_scan:.0f} s vs {theirs['scan_s']:.0f} s; peak "
        f"{max(ours_fit_mib, ours_scan_mib):,} MiB vs {theirs['peak_MiB']:,} MiB",
    ]


def count_tokens(model, texts) -> int:
    """The non-BOS tokens of ``texts`` as rome_lens counts them."""
    skip = len(bos_tokens(model))
    return sum(len(c.tokens) - skip for c in Corpus.read(texts).chunks(model))


def rebuild(vectors, values):
    return (vectors.double() * values.double()) @ vectors.double().T


def relative(ours, theirs) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def hf_model():
    """The default model as a Hugging Face ``LlamaForCausalLM`` from the same GGUF file."""
    from transformers import AutoModelForCausalLM

    from rome_lens.core.models import _gguf_path

    gguf = _gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


def kronfluence_run(model, fit_texts, scan_texts, queries, layers) -> dict:
    """kronfluence 1.0.1's W_out factors and pairwise scores on the same texts and tokens."""
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    hf = hf_model()
    check_same_model(model, hf)
    for layer in layers:  # rome_lens leaves BOS out: its MLP output takes no gradient
        hf.model.layers[layer].mlp.register_forward_hook(cut_bos)
    skip = len(bos_tokens(model))

    class FactTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
            )

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)  # -log p(completion): signs match ours

        def get_influence_tracked_modules(self):
            return [f"model.layers.{layer}.mlp.down_proj" for layer in layers]

        def get_attention_mask(self, batch):
            return batch["counted"]

    def rows(token_lists, counted_from):
        out = []
        for tokens, start in zip(token_lists, counted_from, strict=True):
            labels = tokens.clone()
            labels[:start] = -100
            out.append({"input_ids": tokens, "labels": labels, "start": skip})
        return out

    fit = [c.tokens for c in Corpus.read(fit_texts).chunks(model)]
    scan = [c.tokens for c in Corpus.read(scan_texts).chunks(model)]
    query = []
    query_start = []
    for prompt, completion in queries:
        head = prompt_tokens(model, prompt)[0]
        query.append(torch.cat([head, torch.tensor(target_token_ids(model, prompt, completion))]))
        query_start.append(len(head))
    train_rows = rows(fit, [skip] * len(fit))
    scan_rows = rows(scan, [skip] * len(scan))
    query_rows = rows(query, query_start)
    task = FactTask()
    hf = prepare_model(hf, task)
    kwargs = DataLoaderKwargs(collate_fn=collate)
    folder = tempfile.mkdtemp()
    analyzer = Analyzer(
        "facts", model=hf, task=task, cpu=True, disable_tqdm=True, output_dir=folder
    )
    analyzer.set_dataloader_kwargs(kwargs)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=torch.float64,
        gradient_covariance_dtype=torch.float64,
    )
    before = reset_peak()
    started = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=train_rows, per_device_batch_size=16,
                             factor_args=factor_args, overwrite_output_dir=True)  # fmt: skip
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores", factors_name="ekfac", query_dataset=query_rows, train_dataset=scan_rows,
        per_device_query_batch_size=len(query_rows), per_device_train_batch_size=8,
        score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True,
    )  # fmt: skip
    scan_s = time.perf_counter() - started
    peak = peak_mib() - before
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].double()
    covariances = analyzer.load_covariance_matrices("ekfac")
    lambdas = analyzer.load_lambda_matrices("ekfac")
    a = {
        m: v.double() / covariances["num_activation_covariance_processed"][m]
        for m, v in covariances["activation_covariance"].items()
    }
    s = {
        m: v.double() / covariances["num_gradient_covariance_processed"][m]
        for m, v in covariances["gradient_covariance"].items()
    }
    lam = {
        m: v.double() / lambdas["num_lambda_processed"][m]
        for m, v in lambdas["lambda_matrix"].items()
    }
    return {"A": a, "S": s, "lambda": lam, "scores": scores, "fit_s": fit_s, "scan_s": scan_s,
            "peak_MiB": peak}  # fmt: skip


def cut_bos(module, inputs, output):
    """The MLP's output at BOS, detached (as rome_lens leaves BOS out of every gradient)."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def collate(rows):
    """Right-padded token ids, labels (-100 where not scored), the attention mask, and the
    tokens kronfluence counts in its covariances (real and after BOS)."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = r["input_ids"]
        batch["labels"][i, :n] = r["labels"]
        batch["attention_mask"][i, :n] = 1
    batch["counted"] = batch["attention_mask"].clone()
    batch["counted"][:, : rows[0]["start"]] = 0
    return batch


def check_same_model(model, hf) -> None:
    """The two models' next-token log-probabilities agree on a sentence."""
    tokens = Corpus.read(["The Eiffel Tower is located in the city of Paris."]).chunks(model)[0]
    with torch.no_grad():
        ours = model(tokens.tokens[None]).log_softmax(-1)
        theirs = hf(tokens.tokens[None]).logits.log_softmax(-1)
    gap = float((ours - theirs).abs().max())
    if gap > 1e-3:
        raise SystemExit(f"the Hugging Face model differs from the HookedTransformer by {gap}")


# --------------------------------------------------------------------------- speed


def speed(model, fit_texts, scan_texts, queries, args) -> list[str]:
    layers = list(range(model.cfg.n_layers))
    n_tokens = count_tokens(model, fit_texts)
    fit_rows, fitted = [], {}
    for label, kwargs in (
        ("all MLP weights, K-FAC (one pass)", {"strategy": "kfac"}),
        ("all MLP weights, EK-FAC (two passes)", {"strategy": "ekfac"}),
        ("W_out only, EK-FAC", {"strategy": "ekfac", "weights": ["W_out"]}),
    ):
        factors, seconds, mib = timed(
            fit_influence_factors, model, fit_texts, n_tokens=n_tokens, use_cache=False,
            progress=False, **kwargs,
        )  # fmt: skip
        fitted[label] = factors
        fit_rows.append(
            {
                "fit": label,
                "layers": len(layers),
                "tokens": n_tokens,
                "seconds": seconds,
                "tokens_per_s": n_tokens / seconds,
                "per_layer_s_per_100k": seconds / len(layers) * 1e5 / n_tokens,
                "peak_MiB": mib,
            }  # fmt: skip
        )
    fits = pd.DataFrame(fit_rows)
    report(args.out, "influence_fit_speed", fits)
    ekfac = fitted["all MLP weights, EK-FAC (two passes)"]
    scan_rows = []
    chunks = Corpus.read(scan_texts).chunks(model)
    _, plain_s, plain_mib = timed(plain_forward_backward, model, chunks)
    scan_rows.append({"scan": "plain forward+backward", "queries": 0, "seconds": plain_s,
                      "texts_per_s": len(chunks) / plain_s, "peak_MiB": plain_mib})  # fmt: skip
    for n in (1, N_QUERIES):
        _, seconds, mib = timed(
            influence_many, model, ekfac, queries[:n], scan_texts, top_k=1, progress=False
        )
        scan_rows.append({"scan": "rome_lens.influence_many", "queries": n, "seconds": seconds,
                          "texts_per_s": len(chunks) / seconds, "peak_MiB": mib})  # fmt: skip
    weights = mlp_weights(model)
    for n in (1, N_QUERIES):
        p = preconditioned_gradients(ekfac, query_gradients(model, weights, queries[:n]), "ekfac")
        for form in ("per-text gradient", "per-token"):
            _, seconds, mib = timed(scan_only, model, weights, chunks, p, form)
            scan_rows.append({"scan": f"scoring, {form} form", "queries": n, "seconds": seconds,
                              "texts_per_s": len(chunks) / seconds, "peak_MiB": mib})  # fmt: skip
    scans = pd.DataFrame(scan_rows)
    scans["share_of_plain"] = (scans.texts_per_s / scans.texts_per_s.iloc[0]).round(2)
    report(args.out, "influence_scan_speed", scans)
    one, ten = scans.iloc[1], scans.iloc[2]
    tokens_per_text = sum(len(c.tokens) for c in chunks) / len(chunks)
    return [
        f"fit speed ({n_tokens:,} tokens, 30 layers): "
        + "; ".join(f"{r.fit} {r.tokens_per_s:,.0f} tokens/s" for r in fits.itertuples()),
        f"scan speed ({len(chunks)} texts, {tokens_per_text:.1f} tokens each): "
        f"plain forward+backward {scans.texts_per_s.iloc[0]:.1f} texts/s; "
        f"1 query {one.texts_per_s:.1f} texts/s "
        f"({one.share_of_plain:.0%} of plain); 10 queries {ten.texts_per_s:.1f} texts/s "
        f"({ten.share_of_plain:.0%}), i.e. {ten.texts_per_s * N_QUERIES:.0f} text-query pairs/s",
        f"peak memory: fit {fits.peak_MiB.max():,} MiB; "
        f"scan {scans.peak_MiB.iloc[1:3].max():,} MiB (plain forward+backward {plain_mib:,} MiB)",
    ]


def plain_forward_backward(model, chunks, batch_size: int = 8) -> None:
    """A plain training step's forward and backward (all weights get gradients)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in token_batches(model, chunks, batch_size):
            logits = model(batch.tokens)
            loss = next_token_loss(logits, batch.tokens, batch.real, "empirical", None)
            loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def scan_only(model, weights, chunks, preconditioned, form: str, batch_size: int = 8):
    """Every text's score, by per-text gradients or by ``Σ_t g_tᵀ P ā_t`` (no top-k, no splits)."""
    from rome_lens.influence.factors import sequence_gradients

    n_queries = next(iter(preconditioned.values())).shape[0]
    scores = torch.zeros(len(chunks), n_queries, dtype=torch.float64)
    with frozen(model), linear_layout(model):
        for batch in token_batches(model, chunks, batch_size):

            def log_likelihood(logits, batch=batch):
                return -next_token_loss(logits, batch.tokens, batch.real, "empirical", None)

            found = sequence_gradients(model, batch.tokens, batch.counted, weights, log_likelihood)
            rows = torch.tensor(batch.indices)
            for weight in weights:
                a, g = found[weight.name]
                p = preconditioned[weight.name]
                if form == "per-token":
                    dots = torch.einsum("bti,qio,bto->bq", a, p, g)
                else:
                    dots = torch.einsum("bio,qio->bq", torch.einsum("bti,bto->bio", a, g), p)
                scores.index_add_(0, rows, dots.double())
    return scores


# --------------------------------------------------------------------------- rank


def rank(model, fit_texts, texts, queries, args) -> list[str]:
    factors = fit_influence_factors(model, fit_texts, n_tokens=count_tokens(model, fit_texts),
                                    progress=False)  # fmt: skip
    corpus = texts[:2048]
    full, full_s, full_mib = timed(
        influence_many, model, factors, queries, corpus, top_k=20, progress=False
    )
    low, low_s, low_mib = timed(
        influence_many, model, factors, queries, corpus, top_k=20,
        settings=ScoreSettings(query_rank=32), progress=False,
    )  # fmt: skip
    rows = []
    for q, (f, lo) in enumerate(zip(full, low, strict=True)):
        rows.append(
            {
                "query": queries[q][0] + queries[q][1],
                "spearman": spearmanr(f.all_scores, lo.all_scores).statistic,
                "top20_overlap": len(set(f.text_ids) & set(lo.text_ids)) / 20,
                "top1_same": f.text_ids[0] == lo.text_ids[0],
            }
        )
    table = pd.DataFrame(rows)
    report(args.out, "influence_low_rank", table)
    return [
        f"rank-32 queries vs full ({len(corpus)} texts, {len(queries)} queries): Spearman "
        f"mean {table.spearman.mean():.4f} (lowest {table.spearman.min():.4f}), top-20 overlap "
        f"mean {table.top20_overlap.mean():.2f}, same top text {int(table.top1_same.sum())}/"
        f"{len(table)}; scan {full_s:.0f} s / {full_mib:,} MiB at full rank, {low_s:.0f} s / "
        f"{low_mib:,} MiB at rank 32"
    ]


# --------------------------------------------------------------------------- fit100k


# --------------------------------------------------------------------------- index

INDEX_RANKS = (8, 16, 32, 64, 128)
QUERY_RANKS = (8, 16, 32, 64)
MILLION = 1_000_000


def index_speed(model, fit_texts, args) -> list[str]:
    """A gradient index against the scan it replaces: agreement by rank, build and query cost."""
    from bench_fact_tracing import pick_facts

    rows = (HERE / "results" / "fact_tracing_corpus.jsonl").read_text().splitlines()
    texts = [json.loads(row)["text"] for row in rows][: args.index_texts]
    cases = pick_facts(data_file(args.data, "counterfact_val.json"), N_QUERIES)
    queries = [(case.request.text, " " + case.request.target_new) for case in cases]
    factors = fit_influence_factors(model, fit_texts, weights=["W_out"], progress=False)
    _, scan_s, scan_mib = timed(influence, model, factors, *queries[0], texts, top_k=10,
                                   progress=False)  # fmt: skip
    exact = influence_many(model, factors, queries, texts, top_k=10, progress=False)
    exact_scores = torch.stack([r.all_scores for r in exact], 1)  # [text query]
    agreement = []
    for basis in args.index_bases.split(","):
        if basis.startswith("tokens"):
            agreement += token_agreement(model, factors, texts, queries, exact_scores, basis)
            continue
        settings = index_settings(basis, args.index_rank)
        folder = Path(tempfile.mkdtemp(prefix=f"index-{basis}-"))
        index = build_gradient_index(model, factors, texts, folder, settings=settings,
                                     progress=False)  # fmt: skip
        dense = dense_queries(model, factors, queries)
        for rank in [r for r in INDEX_RANKS if r <= args.index_rank]:
            approx = sliced_scores(model, factors, index, dense, texts, rank)
            size = index.bytes_per_text * rank**2 // args.index_rank**2
            row = {"basis": basis, "rank": rank, "query_rank": "full", "bytes_per_text": size}
            agreement.append(row | agreement_row(exact_scores, approx))
        shutil.rmtree(folder)
    agree = pd.DataFrame(agreement)
    report(args.out, "influence_index_agreement", agree)
    times = pd.DataFrame([
        index_timing(model, factors, texts, queries, exact_scores, (scan_s, scan_mib), basis, args)
        for basis in args.timed_bases.split(",")
    ])  # fmt: skip
    report(args.out, "influence_index_speed", times)
    return index_numbers(agree, times, len(texts))


def index_settings(basis: str, rank: int) -> IndexSettings:
    """``"eigen"``, ``"random"``, ``"whitened"`` at ``rank``; ``"tokens"`` or ``"tokens-bf16"``."""
    if basis.startswith("tokens"):
        dtype = "bfloat16" if basis.endswith("bf16") else "float32"
        return IndexSettings(basis="tokens", dtype=dtype, chunks_per_shard=256)
    return IndexSettings(rank_in=rank, rank_out=rank, basis=basis)


def token_agreement(model, factors, texts, queries, exact_scores, basis) -> list[dict]:
    """A tokens index scored at every query rank (and at full rank, in float32)."""
    folder = Path(tempfile.mkdtemp(prefix=f"index-{basis}-"))
    index = build_gradient_index(model, factors, texts, folder,
                                 settings=index_settings(basis, 0), progress=False)  # fmt: skip
    rows = []
    query_ranks = [*QUERY_RANKS, None] if index.settings.dtype == "float32" else QUERY_RANKS
    for query_rank in query_ranks:
        settings = ScoreSettings(query_rank=query_rank)
        found = influence_many(model, factors, queries, texts, top_k=10, index=index,
                               settings=settings, progress=False)  # fmt: skip
        approx = torch.stack([r.all_scores for r in found], 1)
        row = {"basis": basis, "rank": "exact", "query_rank": query_rank or "full",
               "bytes_per_text": index.bytes_per_text}  # fmt: skip
        rows.append(row | agreement_row(exact_scores, approx))
    shutil.rmtree(folder)
    return rows


def index_timing(model, factors, texts, queries, exact_scores, scan, basis, args) -> dict:
    """Build once, then each query through ``influence(..., index=)``; the products alone."""
    from rome_lens.core.distributed import Split
    from rome_lens.influence import index as index_module
    from rome_lens.influence import scan as scan_module
    from rome_lens.influence import scores as scores_module

    scan_s, scan_mib = scan
    tokens = basis.startswith("tokens")
    settings = index_settings(basis, args.timed_rank)
    scoring = ScoreSettings(query_rank=args.timed_query_rank if tokens else None)
    folder = Path(tempfile.mkdtemp(prefix="index-timed-"))
    index, build_s, build_mib = timed(build_gradient_index, model, factors, texts, folder,
                                      settings=settings, progress=False)  # fmt: skip
    one = {"top_k": 10, "index": index, "progress": False, "settings": scoring}
    cold = timed(influence, model, factors, *queries[0], texts, **one)[1]
    runs = [timed(influence, model, factors, *q, texts, **one) for q in queries]
    warm = [seconds for _, seconds, _ in runs]
    through_api = torch.stack([result.all_scores for result, _, _ in runs], 1)
    chosen = scan_module._scoring(model, factors, scoring)
    prepare = scan_module._preconditioned_queries if tokens else scores_module._index_queries
    prepared, prepare_s, _ = timed(prepare, model, factors, chosen, queries[:1])
    corpus = Corpus.read(texts)
    products_s = timed(index_module.index_scan, model, factors, index, corpus, chosen.weights,
                       chosen.layers, prepared, Split.of(False))[1]  # fmt: skip
    shutil.rmtree(folder)
    return {
        "basis": basis, "rank": "exact" if tokens else args.timed_rank,
        "query_rank": scoring.query_rank or "full", "scan_s": scan_s, "build_s": build_s,
        "build_over_scan": build_s / scan_s, "query_cold_s": cold,
        "query_warm_s": float(np.median(warm)), "speedup": scan_s / float(np.median(warm)),
        "prepare_s": prepare_s, "products_s": products_s,
        "bytes_per_text": index.bytes_per_text, "build_peak_MiB": build_mib,
        "scan_peak_MiB": scan_mib,
    } | agreement_row(exact_scores, through_api)  # fmt: skip


def dense_queries(model, factors, queries):
    """Each query's EK-FAC-preconditioned gradient in the eigenbasis, ``X = Q_Aᵀ P Q_S``."""
    weights = mlp_weights(model, factors.layers, ["W_out"])
    found = []
    for query in queries:
        dense = preconditioned_gradients(factors, query_gradients(model, weights, [query]), "ekfac")
        found.append({
            name: EigenQueries(factors.input_vectors[name], factors.input_vectors[name].T @ p
                               @ factors.output_vectors[name], factors.output_vectors[name])
            for name, p in dense.items()
        })  # fmt: skip
    return found


def sliced_scores(model, factors, index, dense, texts, rank) -> torch.Tensor:
    """Every text's score from the index's leading ``rank × rank`` block (the bases are
    nested: the top-``rank`` eigenvectors, or the first ``rank`` Gaussian columns)."""
    from rome_lens.influence import index as index_module

    weights = mlp_weights(model, factors.layers, ["W_out"])
    bases = index_module._bases(factors, weights, index.settings)
    scores = torch.zeros(index.n_texts, len(dense), dtype=torch.float64)
    for k in range(index.n_shards):
        shard = index_module._read_shard(index, k)
        for name, projection in bases.items():
            query = torch.cat([projection.cut(rank).queries(d[name]) for d in dense])
            dots = shard[name][:, :rank, :rank].flatten(1) @ query.flatten(1).T
            scores.index_add_(0, shard["documents"], dots.double())
    return scores


def agreement_row(exact, approx) -> dict[str, float]:
    """Spearman correlation and top-10 agreement of ``approx`` with ``exact``, per query."""
    rhos, same, overlap = [], [], []
    for q in range(exact.shape[1]):
        rhos.append(spearmanr(exact[:, q], approx[:, q]).statistic)
        top_exact = set(exact[:, q].argsort(descending=True)[:10].tolist())
        top_approx = set(approx[:, q].argsort(descending=True)[:10].tolist())
        same.append(top_exact == top_approx)
        overlap.append(len(top_exact & top_approx) / 10)
    return {
        "spearman_mean": float(np.mean(rhos)),
        "spearman_min": float(np.min(rhos)),
        "same_top10_share": float(np.mean(same)),
        "top10_overlap": float(np.mean(overlap)),
    }


def index_numbers(agree, times, n_texts) -> list[str]:
    lines = []
    for row in agree.itertuples():
        lines.append(
            f"index {row.basis} rank {row.rank}, query rank {row.query_rank}: Spearman mean "
            f"{row.spearman_mean:.4f} "
            f"(lowest {row.spearman_min:.4f}), same top-10 {row.same_top10_share:.0%}, "
            f"top-10 overlap {row.top10_overlap:.2f}, {row.bytes_per_text:,} B/text"
        )
    for row in times.itertuples():
        million_gb = row.bytes_per_text * MILLION / 1e9
        million_build_h = row.build_s / n_texts * MILLION / 3600
        lines.append(
            f"index {row.basis} rank {row.rank}, query rank {row.query_rank}, on {n_texts:,} "
            f"texts: build {row.build_s:.0f} s "
            f"= {row.build_over_scan:.2f}x one scan ({row.scan_s:.0f} s); "
            f"query {row.query_warm_s:.2f} s warm ({row.speedup:.0f}x faster than the scan), "
            f"{row.query_cold_s:.2f} s cold; query preparation {row.prepare_s:.2f} s, "
            f"products {row.products_s:.2f} s; "
            f"10^6 texts: {million_gb:.0f} GB, build {million_build_h:.0f} h on this machine, "
            f"products {row.products_s / n_texts * MILLION:.0f} s a query; through influence(): "
            f"Spearman mean {row.spearman_mean:.4f}, same top-10 {row.same_top10_share:.0%}"
        )
    return lines


def fit_100k(model, args) -> list[str]:
    """The default path: 100,000 tokens the model samples itself (sampled first, and timed
    apart), every MLP weight of every layer, EK-FAC."""
    started = time.perf_counter()
    Corpus.read(None).chunks(model, n_tokens=100_000, progress=True)  # cached for the fit
    sampling = time.perf_counter() - started
    factors, seconds, mib = timed(
        fit_influence_factors, model, n_tokens=100_000, use_cache=False, progress=True
    )
    layers = len(factors.layers)
    table = pd.DataFrame([{"tokens": factors.n_tokens, "layers": layers, "seconds": seconds,
                           "sampling_s": sampling, "peak_MiB": mib}])  # fmt: skip
    report(args.out, "influence_fit_100k", table)
    return [
        f"fit of 100,000 sampled tokens, every MLP weight of {layers} layers, EK-FAC: "
        f"{seconds / 60:.1f} min ({seconds / layers:.0f} s per layer), peak {mib:,} MiB above "
        f"the loaded model; sampling the tokens first took {sampling / 60:.1f} min"
    ]


if __name__ == "__main__":
    main()
