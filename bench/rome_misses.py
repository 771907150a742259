"""Why some ROME edits miss their own prompt: the averaged key k* against the prompt's own key.

    python bench/rome_misses.py       # after bench_rome.py --only main (~8 min)

For each case that ROME missed in ``bench/results/rome_cases.csv``, and as many
that it wrote, edit as :func:`rome_lens.rome_edit` does (k* averaged over the
bare prompt and its contexts, in both u and the denominator), then record

* ``reach = left · k_bare``: the share of the update that reaches the bare
  prompt's own key (1 for k* itself);
* the case's scores with that edit, and with the original ROME form, which maps
  k_bare itself to v* (the same u and v*, divided by u · k_bare).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tables import SHARED_DATA, report

import rome_lens
from rome_lens.editing import RankOneEdit, edited, rome_edit
from rome_lens.editing.memory import subject_activations
from rome_lens.evaluation import case_scores, load_counterfact

DATA = SHARED_DATA / "counterfact_val.json"
RESULTS = Path(__file__).resolve().parent / "results"
SCORES = ["efficacy_score", "paraphrase_score", "neighborhood_score"]


def main() -> None:
    rows = pd.read_csv(RESULTS / "rome_cases.csv").query("method == 'rome'")
    missed = set(rows[rows.post_efficacy_score < 1].case_id)
    written = set(rows[rows.post_efficacy_score == 1].case_id.iloc[: len(missed)])
    model = rome_lens.load_model()
    out = []
    for case in load_counterfact(DATA):
        if case.case_id in missed | written:
            edit = rome_edit(model, case.request, progress=False)
            out.append({"case_id": case.case_id, "missed": case.case_id in missed})
            out[-1].update(compare(model, case, edit))
    table = pd.DataFrame(out)
    report(RESULTS, "rome_misses", table)
    print(table.groupby("missed").mean(numeric_only=True).drop(columns="case_id").to_string())


def compare(model, case, edit: RankOneEdit) -> dict[str, float]:
    """reach and cosine of k_bare against k*, and the scores with each form of the update."""
    request, layer = case.request, edit.layer
    text = [(request.text, request.subject, request.subject_start)]
    k_bare = subject_activations(model, text, f"blocks.{layer}.mlp.hook_post")[0]
    left = edit.left.double()
    reach = float(left @ k_bare)
    row = {"reach": reach, "cosine": float(torch.cosine_similarity(k_bare, edit.key, dim=0))}
    with edited(model, edit):
        row.update(case_scores(model, [case]).iloc[0][SCORES].add_prefix("averaged_key_"))
    mlp = model.blocks[layer].mlp
    original = mlp.W_out.data.clone()
    right = edit.value.double() - (mlp.W_out.double().T @ k_bare + mlp.b_out.double())
    try:
        mlp.W_out.data += torch.outer(left / reach, right).to(original.dtype)
        row.update(case_scores(model, [case]).iloc[0][SCORES].add_prefix("bare_key_"))
    finally:
        mlp.W_out.data.copy_(original)
    return row


if __name__ == "__main__":
    main()
