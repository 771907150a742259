"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: every split
computation twice, split over the ranks and on one rank alone; rank 0 writes the largest
relative differences to the JSON file named on the command line."""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist

from rome_lens.core.models import tiny_model
from rome_lens.evaluation import evaluate_edits, load_counterfact_sample
from rome_lens.influence import (
    IndexSettings,
    build_gradient_index,
    fit_influence_factors,
    influence_many,
)
from rome_lens.stats import key_second_moment
from rome_lens.tracing import average_causal_effects

TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is a museum in Paris, the capital of France.",
    "The Colosseum is in the city of Rome.",
    "Berlin is the capital of Germany.",
    "Toko Yasuda plays the guitar.",
    "Steve Jobs founded Apple.",
    "Cats sleep for most of the day.",
]  # seven texts: the ranks get unequal shares
QUERIES = [
    ("The Eiffel Tower is located in the city of", " Paris"),
    ("Steve Jobs founded", " Apple"),
]
FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower"},
    {"prompt": "Steve Jobs founded", "subject": "Steve Jobs"},
    {"prompt": "The Colosseum is in the city of", "subject": "The Colosseum"},
]


def relative(split: torch.Tensor, alone: torch.Tensor) -> float:
    scale = float(alone.double().abs().max()) or 1.0
    return float((split.double() - alone.double()).abs().max()) / scale


def factor(factors, weight: str, part: str) -> torch.Tensor:
    """A or S rebuilt from its eigendecomposition."""
    vectors = getattr(factors, f"{part}_vectors")[weight].double()
    values = getattr(factors, f"{part}_values")[weight].double()
    return (vectors * values) @ vectors.T


def both(work, *args, **kwargs):
    """``work`` split over the ranks, then on this rank alone."""
    return work(*args, **kwargs), work(*args, **kwargs, distributed=False)


def fail_on_rank_1(cache: str) -> None:
    """Rank 1 fails half way through key statistics; nothing may reach the cache."""
    from rome_lens.stats import moments

    if dist.get_rank() == 1:

        def broken(*args, **kwargs):
            raise RuntimeError("rank 1 failed on purpose")

        moments._activations = broken
    key_second_moment(tiny_model(), 1, corpus=TEXTS, n_tokens=60, cache_dir=cache, progress=False)


def main() -> None:
    dist.init_process_group("gloo")
    if sys.argv[2:3] == ["fail"]:
        fail_on_rank_1(sys.argv[3])
        return
    warnings.simplefilter("ignore")
    model = tiny_model()
    found: dict[str, float] = {}
    quiet = {"use_cache": False, "progress": False}

    for name, corpus, n_tokens in (
        ("keys", TEXTS, 60),
        ("keys_empty_shard", TEXTS[:1], 50),
        ("keys_sampled", None, 200),
    ):
        split, alone = both(key_second_moment, model, 1, corpus=corpus, n_tokens=n_tokens, **quiet)
        counts_differ = float(split.n_tokens != alone.n_tokens)
        found[name] = max(relative(split.moment, alone.moment), counts_differ)

    for fisher in ("sampled", "empirical"):
        split, alone = both(
            fit_influence_factors, model, TEXTS, layers=[1, 2], n_tokens=70, fisher=fisher, **quiet
        )
        for weight in alone.names:
            for part in ("input", "output"):
                found[f"{fisher} {weight} {part}"] = relative(
                    factor(split, weight, part), factor(alone, weight, part)
                )
            found[f"{fisher} {weight} lambda"] = relative(
                split.eigen_lambda[weight], alone.eigen_lambda[weight]
            )
        factors = alone

    split, alone = both(influence_many, model, factors, QUERIES, TEXTS, top_k=4, progress=False)
    worst = 0.0
    for s, a in zip(split, alone, strict=True):
        ranked = float(s.text_ids != a.text_ids)
        worst = max(worst, relative(s.all_scores, a.all_scores), ranked)
        worst = max(worst, relative(s.layer_scores, a.layer_scores))
    found["scan"] = worst

    folder = sys.argv[1] + ".index"  # shared by the ranks: each writes its own shards
    for per_shard, basis in ((2, "tokens"), (7, "tokens"), (2, "eigen")):  # 4 shards; 1 shard
        settings = IndexSettings(rank_in=8, rank_out=8, chunks_per_shard=per_shard, basis=basis)
        index = build_gradient_index(
            model, factors, TEXTS, f"{folder}{per_shard}{basis}", settings=settings,
            progress=False,
        )  # fmt: skip
        split, alone = both(influence_many, model, factors, QUERIES, TEXTS, top_k=4,
                            progress=False, index=index)  # fmt: skip
        worst = 0.0
        for s, a in zip(split, alone, strict=True):
            worst = max(
                worst, relative(s.all_scores, a.all_scores), float(s.text_ids != a.text_ids)
            )
        found[f"{basis} index, {per_shard} chunks a shard"] = worst

    split, alone = both(
        average_causal_effects, model, FACTS, kinds=("mlp",), samples=2, progress=False
    )
    found["causal_effects"] = relative(split.mean.nan_to_num(), alone.mean.nan_to_num())

    cases = load_counterfact_sample(limit=3)
    split, alone = both(evaluate_edits, model, cases, "none", fluency=False, progress=False)
    a, s = alone.to_dataframe(), split.to_dataframe()
    columns = [c for c in a if c.startswith(("pre_", "post_"))]
    found["evaluation"] = relative(
        torch.tensor(s[columns].to_numpy()), torch.tensor(a[columns].to_numpy())
    )
    found["evaluation_order"] = float(list(s.case_id) != list(a.case_id))

    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": dist.get_world_size(), "relative": found}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
