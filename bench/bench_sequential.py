"""Benchmark: editing in a row on the default model — ROME, MEMIT and AlphaEdit side by side.

    python bench/bench_sequential.py                       # 1,000 cases, every method (hours)
    python bench/bench_sequential.py --cases 500 --only alphaedit --only memit
    python bench/bench_sequential.py --only alphaedit --layers 1,2,3,4,5,6,7,8 --energy 0.3 --l2 10

Each method writes the same CounterFact cases (file order, conflicts removed) in
the same order into one model, batch after batch, each batch computed on the
model as the earlier ones left it: AlphaEdit and MEMIT in batches of
``--batch`` (100), ROME one request at a time. After every ``--batch`` cases it
measures:

* ES, PS and NS over every case written so far (and the unedited NS of the same
  cases);
* general ability: top-1 accuracy on the default model's known facts
  (``known_smollm2.json``) whose subjects were not edited, perplexity on a fixed
  sample of 4,096 tokens the unedited model wrote, and the n-gram entropy of
  generations from 20 fixed prompts (ROME's fluency metric);
* the time of the batch.

``--layers``, ``--energy``, ``--l2`` (AlphaEdit's ``null_space_energy`` and
``l2``) and ``--key-match`` override the defaults and name the file
(``_L1-2-..._e0.3_l2-10_averaged``).
Rows are written to ``--out/sequential_{method}.csv`` as they come, so a run cut
short keeps what it measured. ``--figure`` draws docs/figures/sequential.png
from those files.

``--sweep`` instead writes the first batch with AlphaEdit at several
``null_space_energy`` and ``l2`` values, and with MEMIT, and measures the same
things (the targets z are computed once and shared); with the sequential runs
it chose the defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tables import data_argument, data_file

import rome_lens
from rome_lens.core.corpus import Corpus, token_batches
from rome_lens.core.generation import sample_text
from rome_lens.core.predict import predict_next
from rome_lens.editing import (
    AlphaEditHyperParams,
    EditMissWarning,
    SequentialEditor,
    editors,
    get_editor,
)
from rome_lens.evaluation import case_scores, load_counterfact, without_conflicts
from rome_lens.evaluation.metrics import generation_scores, n_gram_entropy
from rome_lens.stats.keys import key_second_moment
from rome_lens.stats.moments import next_token_loss

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "figures" / "sequential.png"
METHODS = ("alphaedit", "memit", "rome")  # run and drawn by default; --only takes any editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--only", choices=sorted(editors()), action="append")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--figure", action="store_true", help="only draw the figure")
    parser.add_argument("--figure-to", type=Path, default=FIGURE, help="where to draw it")
    parser.add_argument("--sweep", action="store_true", help="only the one-batch sweep")
    parser.add_argument("--energies", default="0.01,0.03,0.1,0.3")
    parser.add_argument("--l2s", default="1,10")
    parser.add_argument("--energy", type=float, help="AlphaEdit null_space_energy")
    parser.add_argument("--l2", type=float, help="AlphaEdit l2")
    parser.add_argument(
        "--layers", help="MEMIT/AlphaEdit layers, e.g. 3,4,5,6,7,8 (default: theirs)"
    )
    parser.add_argument(
        "--key-match", choices=("averaged", "both"), help="keys per request (default: both)"
    )
    parser.add_argument("--rewind", action="store_true", help="targets on the starting weights")
    parser.add_argument("--early-stop", choices=("nll", "most_probable"), help="δ's early stop")
    parser.add_argument("--value-norm", action="store_true", help="anchor the values' norm")
    parser.add_argument("--anchor", type=float, help="weight of ‖W − W₀‖² in the solve")
    parser.add_argument("--history", action="store_true", help="MEMIT keeps earlier keys")
    parser.add_argument("--norm-ridge", type=float, help="MEMIT's weight of ‖ΔW‖²")
    parser.add_argument(
        "--preserve-known", action="store_true",
        help="preserve the keys of half the known facts' prompts (the other half is held out)",
    )  # fmt: skip
    data_argument(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.layer_list = [int(x) for x in args.layers.split(",")] if args.layers else None
    args.suffix = f"_L{args.layers.replace(',', '-')}" if args.layers else ""
    given = {"null_space_energy": args.energy, "l2": args.l2}
    args.alphaedit = {name: value for name, value in given.items() if value is not None}
    short = {"null_space_energy": "e", "l2": "l2-"}
    args.alphaedit_suffix = "".join(f"_{short[n]}{v:g}" for n, v in args.alphaedit.items())
    args.key_suffix = f"_{args.key_match}" if args.key_match else ""
    options = {"rewind": args.rewind or None, "early_stop": args.early_stop,
               "value_norm_anchor": args.value_norm or None, "anchor": args.anchor}  # fmt: skip
    args.options = {name: value for name, value in options.items() if value is not None}
    memit_only = {"history": args.history or None, "norm_ridge": args.norm_ridge}
    args.memit_options = {name: value for name, value in memit_only.items() if value is not None}
    short = {"rewind": "rewind", "early_stop": "", "value_norm_anchor": "vnorm", "anchor": "anchor",
             "history": "history", "norm_ridge": "ridge"}  # fmt: skip
    named = args.options | args.memit_options | {"preserve": args.preserve_known or None}
    args.option_suffix = "".join(
        f"_{short.get(n, n)}" + ("" if v is True else f"{v:g}" if isinstance(v, float) else str(v))
        for n, v in named.items() if v is not None
    )  # fmt: skip
    if not args.figure:
        model = rome_lens.load_model()
        cases = without_conflicts(load_counterfact(data_file(args.data, "counterfact_val.json")))
        cases = cases[: args.cases]
        ability = Ability(model, args.data, {case.request.subject for case in cases})
        if args.sweep:
            sweep(model, cases[: args.batch], ability, args)
            return
        for method in args.only or METHODS:
            run(model, method, cases, ability, args)
    figure(args.out, args.figure_to)


def sweep(model, cases, ability: Ability, args) -> None:
    """One batch, AlphaEdit at each (energy, l2) and MEMIT; z computed once and cached."""
    from rome_lens.editing import alphaedit_edit, default_memit_layers, edited, memit_edit

    layers = args.layer_list or default_memit_layers(model)  # the same layers for all
    requests = [case.request for case in cases]
    rows = [{"editor": "unedited"} | scores(model, cases) | ability.measure()]
    grid = [(float(e), float(l2)) for e in args.energies.split(",") for l2 in args.l2s.split(",")]
    variants = [("memit", None)] + [
        (f"alphaedit energy={e} l2={l2}", AlphaEditHyperParams(null_space_energy=e, l2=l2))
        for e, l2 in grid
    ]
    for name, hparams in variants:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EditMissWarning)
            if hparams is None:
                edit = memit_edit(model, requests, layers=layers, progress=False)
            else:
                edit = alphaedit_edit(
                    model, requests, layers=layers, hparams=hparams, progress=False
                )
        seconds = time.perf_counter() - started
        with edited(model, edit):
            row = {"editor": name, "seconds": seconds} | scores(model, cases) | ability.measure()
        rows.append(row)
        print(json.dumps(row), flush=True)
        pd.DataFrame(rows).to_csv(args.out / f"sequential_sweep{args.suffix}.csv", index=False)


def scores(model, cases) -> dict[str, float]:
    """ES, PS and NS (percent) of ``cases`` on the model as it stands."""
    now = case_scores(model, cases)
    return {
        "ES": 100 * now.efficacy_score.mean(),
        "PS": 100 * now.paraphrase_score.mean(),
        "NS": 100 * now.neighborhood_score.mean(),
    }


class Ability:
    """What the model could do before any edit, measured again after each batch."""

    def __init__(self, model, data: Path, edited_subjects: set[str]) -> None:
        known = json.loads(data_file(data, "known_smollm2.json").read_text())
        kept = [k for k in known if k["subject"] not in edited_subjects]
        self.prompts = [k["prompt"] for k in kept]
        self.answers = [" " + k["attribute"] for k in kept]
        # Even facts' prompts may be preserved (--preserve-known); odd ones never are.
        self.preservable = self.prompts[::2]
        self.fluency_prompts = self.prompts[:20]
        self.chunks = Corpus.read(None).chunks(model, n_tokens=4096, seed=123, progress=False)
        self.model = model

    def measure(self) -> dict[str, float]:
        model = self.model
        known = predict_next(model, self.prompts, targets=self.answers).target_is_top
        with torch.inference_mode():
            loss, count = 0.0, 0
            for batch in token_batches(model, self.chunks, 32):
                logits = model(batch.tokens)
                loss += float(next_token_loss(logits, batch.tokens, batch.real, "empirical", None))
                count += int(batch.real[:, 1:].sum())
        texts = sample_text(model, self.fluency_prompts, 50, seed=0, top_k=5)
        return {
            "known_accuracy": 100 * float(known.float().mean()),
            "known_held_out": 100 * float(known[1::2].float().mean()),
            "known_facts": len(self.prompts),
            "perplexity": math.exp(loss / count),
            "entropy": float(np.mean([n_gram_entropy(t) for t in texts])),
        }


def run(model, method: str, cases, ability: Ability, args) -> None:
    chosen = get_editor(method)
    suffix = args.suffix if chosen.batched else ""
    suffix += args.alphaedit_suffix if method == "alphaedit" else ""
    suffix += args.option_suffix if chosen.batched else ""
    path = args.out / f"sequential_{method}{suffix}{args.key_suffix}.csv"
    baseline = case_scores(model, cases)
    unedited = {"method": method, "edits": 0, "seconds": 0.0} | ability.measure()
    rows = [unedited]
    pd.DataFrame(rows).to_csv(path, index=False)
    layers = args.layer_list if chosen.batched else None
    given = dict(args.alphaedit) if method == "alphaedit" else {}
    given |= {"key_match": args.key_match} if args.key_match else {}
    given |= args.options if chosen.batched else {}
    given |= args.memit_options if method == "memit" else {}
    hparams = chosen.settings_type(**given)
    editor = SequentialEditor(model, chosen, layers=layers, hparams=hparams, progress=False)
    edited_layers = editor.layers
    key_stats = functools.partial(key_second_moment, model, n_tokens=10**6, progress=False)
    editor.held_out = {layer: key_stats(layer, corpus=ability.prompts[1::2])
                       for layer in edited_layers}  # fmt: skip
    if args.preserve_known and chosen.batched:
        preserve = {layer: key_stats(layer, corpus=ability.preservable) for layer in edited_layers}
        editor = SequentialEditor(model, chosen, layers=layers, hparams=hparams, progress=False,
                                  preserve=preserve, held_out=editor.held_out)  # fmt: skip
    norms_path = path.with_name(path.stem + "_norms.csv")
    try:
        for start in range(0, len(cases), args.batch):
            batch = cases[start : start + args.batch]
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EditMissWarning)
                editor.edit([case.request for case in batch])
            seconds = time.perf_counter() - started
            n = start + len(batch)
            now = case_scores(model, cases[:n])
            row = {"method": method, "edits": n, "seconds": seconds}
            row |= {
                "ES": 100 * now.efficacy_score.mean(),
                "PS": 100 * now.paraphrase_score.mean(),
                "NS": 100 * now.neighborhood_score.mean(),
                "NS_unedited": 100 * baseline.neighborhood_score[:n].mean(),
                "batch_ES": 100 * now.efficacy_score[start:].mean(),
            }
            # Generation success on this batch's cases (all of them would dominate the run).
            generated = generation_scores(model, batch)
            row |= {
                "batch_gen_ES": 100 * generated.generation_efficacy.mean(),
                "batch_gen_PS": 100 * generated.generation_paraphrase.mean(),
                "batch_gen_NS": 100 * generated.generation_neighborhood.mean(),
            }
            row |= ability.measure()
            rows.append(row)
            pd.DataFrame(rows).to_csv(path, index=False)
            editor.layer_dataframe().to_csv(norms_path, index=False)
            print(json.dumps(row), flush=True)
    finally:
        editor.revert_all()


def figure(out: Path, to: Path = FIGURE) -> None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    paths = sorted(p for m in METHODS for p in out.glob(f"sequential_{m}*.csv"))
    runs = [path for path in paths if not path.stem.endswith("_norms")]
    tables = [pd.read_csv(path).assign(label=run_label(path)) for path in runs]
    runs = [path for path, table in zip(runs, tables, strict=True) if "ES" in table]
    tables = [table for table in tables if "ES" in table]  # a run with edits measured
    if not tables:
        return
    fig = Figure(figsize=(14.4, 3.2), layout="constrained")
    axes = fig.subplots(1, 6)
    panels = [("ES", "efficacy (ES, %)"), ("PS", "paraphrase (PS, %)"),
              ("NS", "neighbourhood (NS, %)"), ("known_accuracy", "known facts right (%)"),
              ("perplexity", "perplexity")]  # fmt: skip
    for table in tables:
        for ax, (column, title) in zip(axes[:5], panels, strict=True):
            shown = table.dropna(subset=[column])
            line = ax.plot(shown.edits, shown[column], marker="o", ms=3, label=table.label[0])
            if column == "NS":
                ax.plot(shown.edits, shown.NS_unedited, ls="--", color=line[0].get_color())
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("edits")
            if column != "perplexity":
                ax.set_ylim(0, 100)
    for path, table in zip(runs, tables, strict=True):
        norms = path.with_name(f"{path.stem}_norms.csv")
        if norms.exists():
            drift = pd.read_csv(norms).groupby("batch").drift.mean()
            axes[5].plot((drift.index + 1) * table.edits.diff().max(), drift, marker="o", ms=3)
    axes[5].set_title("mean ‖W − W₀‖ / ‖W₀‖", fontsize=10)
    axes[5].set_xlabel("edits")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls="--", color="grey"))
    labels.append("NS of the same cases, unedited")
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(to, dpi=150, bbox_inches="tight")


def run_label(path: Path) -> str:
    """``sequential_alphaedit_L1-2-3_e0.3_l2-10.csv`` -> ``alphaedit L1-3 e0.3 l2 10``."""
    method, *settings = path.stem.removeprefix("sequential_").split("_")
    words = [method]
    for setting in settings:
        if setting.startswith("L"):
            layers = setting[1:].split("-")
            setting = f"L{layers[0]}-{layers[-1]}"
        words.append(setting.replace("l2-", "l2 ").replace("averaged", "averaged key"))
    return " ".join(words) if settings else f"{method} (defaults)"


if __name__ == "__main__":
    main()
