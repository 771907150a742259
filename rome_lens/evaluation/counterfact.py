"""CounterFact: counterfactual edits and the prompts that test them.

CounterFact (Meng et al. 2022) pairs each counterfactual edit with prompts that
test it: rewordings of the edit prompt (which should follow the edit) and
prompts about other subjects with the same true answer (which should not).
Two file formats load with :func:`load_counterfact`: ROME's
``counterfact.json`` (``requested_rewrite``, ``paraphrase_prompts``,
``neighborhood_prompts``, ``generation_prompts``) and EasyEdit's (``prompt``,
``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``). EasyEdit cases have one
paraphrase and one neighbour; their generation prompts are the edit prompt and
the paraphrase. :func:`load_counterfact_sample` reads 300 cases shipped with
the package, so examples run offline.

>>> from rome_lens.evaluation import load_counterfact_sample
>>> cases = load_counterfact_sample(limit=2)
>>> cases[0].request
EditRequest(prompt='{}, by', subject='BBC One', target_new='Sega', target_true='BBC')
>>> cases[0].neighborhood_prompts
['BBC Radio, by']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rome_lens.editing.requests import EditRequest

__all__ = [
    "SAMPLE_FILE",
    "CounterFactCase",
    "load_counterfact",
    "load_counterfact_sample",
    "without_conflicts",
]

SAMPLE_FILE = "counterfact_sample.json"


@dataclass
class CounterFactCase:
    """One CounterFact record: an edit and the prompts that test it."""

    case_id: int
    """The case's id in its file."""
    request: EditRequest
    """With target_true set."""
    paraphrase_prompts: list[str]
    """Same fact, other words: should follow the edit."""
    neighborhood_prompts: list[str]
    """Other subjects: should keep their answer."""
    neighborhood_answer: str
    """The neighbours' (true) answer."""
    generation_prompts: list[str]
    """For the fluency measure."""


def load_counterfact(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> list[CounterFactCase]:
    """Read ROME's or EasyEdit's CounterFact JSON (the format is detected per record).

    Args:
        path: a CounterFact file: ROME's ``counterfact.json`` (from
            https://rome.baulab.info) or EasyEdit's ``counterfact-val.json``.
        limit: read only the first ``limit`` cases.

    Returns:
        The cases, in file order.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read CounterFact cases from {path}: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} should hold a JSON list of cases, got {type(records).__name__}")
    return [_parse_case(record, path) for record in records[:limit]]


def load_counterfact_sample(*, limit: int | None = None) -> list[CounterFactCase]:
    """The 300 CounterFact cases shipped with rome_lens (MIT licence; see its data README).

    Args:
        limit: read only the first ``limit`` cases.

    Returns:
        The cases, in file order.
    """
    sample = resources.files("rome_lens.evaluation") / "data" / SAMPLE_FILE
    with resources.as_file(sample) as path:
        return load_counterfact(path, limit=limit)


def without_conflicts(cases: Sequence[CounterFactCase]) -> list[CounterFactCase]:
    """The cases in order, less each that gives an earlier case's subject and prompt another target.

    CounterFact has many-valued relations ("{} is a twin city of"), so two of
    its cases can rewrite one fact two ways; :func:`~rome_lens.editing.memit_edit`
    refuses such a batch, so draw batches from this.

    Args:
        cases: CounterFact cases, in the order to keep them.

    Returns:
        The cases without conflicts, in order.
    """
    targets: dict[tuple[str, str], str] = {}
    kept = []
    for case in cases:
        request = case.request
        target = targets.setdefault((request.prompt, request.subject), request.target_new.strip())
        if target == request.target_new.strip():
            kept.append(case)
    return kept


def _parse_case(record: dict[str, Any], path: Path) -> CounterFactCase:
    try:
        if "requested_rewrite" in record:
            return _rome_case(record)
        return _easyedit_case(record)
    except (KeyError, TypeError) as err:
        case = record.get("case_id", "?") if isinstance(record, dict) else "?"
        raise ValueError(f"case {case} of {path} lacks field {err}") from err


def _rome_case(record: dict[str, Any]) -> CounterFactCase:
    rewrite = record["requested_rewrite"]
    request = EditRequest(
        rewrite["prompt"],
        rewrite["subject"],
        rewrite["target_new"]["str"],
        rewrite["target_true"]["str"],
    )
    return CounterFactCase(
        case_id=int(record["case_id"]),
        request=request,
        paraphrase_prompts=list(record["paraphrase_prompts"]),
        neighborhood_prompts=list(record["neighborhood_prompts"]),
        neighborhood_answer=rewrite["target_true"]["str"],
        generation_prompts=list(record.get("generation_prompts", [])),
    )


def _easyedit_case(record: dict[str, Any]) -> CounterFactCase:
    prompt, subject = record["prompt"], record["subject"]
    if subject not in prompt:
        raise ValueError(
            f"case {record.get('case_id')}: subject {subject!r} is not in prompt {prompt!r}"
        )
    template = prompt.replace(subject, "{}", 1)
    request = EditRequest(template, subject, record["target_new"], record["ground_truth"])
    return CounterFactCase(
        case_id=int(record["case_id"]),
        request=request,
        paraphrase_prompts=[record["rephrase_prompt"]],
        neighborhood_prompts=[record["locality_prompt"]],
        neighborhood_answer=record["locality_ground_truth"],
        generation_prompts=[prompt, record["rephrase_prompt"]],
    )
