"""Golden values for the editors: what ROME, MEMIT and AlphaEdit compute on the default model.

``tests/data/golden_editors.safetensors`` holds the demo trace and, on the
default model with BOS, the default ROME edit of the demo fact, one MEMIT batch
of the first ten CounterFact sample cases and one AlphaEdit batch of the same
ten: each edit's keys, targets and what each ΔW writes for those keys
(``K ΔW``), with ΔW's norms. ``tests/test_golden_editors.py`` recomputes them
and compares to 1e-5 of each tensor's largest entry, so a reorganisation of the
editing room is checked to change no number. Regenerate with
``python -m tests.golden_editors`` (a few minutes on two cores).

The key statistics behind ΔW read the sample shipped with the package for the
default model (``rome_lens/core/data/``), so every machine sums the same text;
only float32 rounding of the forward passes differs between CPUs.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

import rome_lens
from rome_lens.core.backend import Model
from rome_lens.core.cache import save_tensors
from rome_lens.editing import EditRequest, alphaedit_edit, memit_edit, rome_edit
from rome_lens.evaluation import load_counterfact_sample
from rome_lens.tracing import trace_fact

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_editors.safetensors"
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
N_CASES = 10


def demo_request() -> EditRequest:
    """The demo fact, moved to Rome."""
    return EditRequest("{} is located in the city of", SUBJECT, "Rome")


def batch_requests() -> list[EditRequest]:
    """The first ten cases of the CounterFact sample shipped with rome_lens."""
    return [case.request for case in load_counterfact_sample(limit=N_CASES)]


def computed(model: Model, folder: str) -> dict[str, Tensor]:
    """Every golden number, computed by today's code (z not cached: ``folder`` is fresh)."""
    values: dict[str, Tensor] = {}
    trace = trace_fact(model, PROMPT, SUBJECT, progress=False)
    values["trace_scores"] = trace.scores.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = rome_edit(model, demo_request(), progress=False)
        for name in ("key", "value", "left", "right"):
            values[f"rome_{name}"] = getattr(edit, name).double()
        for method, run in (("memit", memit_edit), ("alphaedit", alphaedit_edit)):
            batch = run(model, batch_requests(), cache_dir=folder, use_cache=False,
                        progress=False)  # fmt: skip
            values[f"{method}_targets"] = batch.targets.double()
            for layer in batch.layers:
                keys = batch.keys[layer].double()
                values[f"{method}_keys_{layer}"] = keys
                values[f"{method}_writes_{layer}"] = keys @ batch.delta[layer].double()
                values[f"{method}_norm_{layer}"] = batch.delta[layer].double().norm().reshape(1)
    return {name: value.detach().cpu().contiguous() for name, value in values.items()}


def main() -> None:
    """Compute the golden numbers and write them to ``tests/data``."""
    torch.set_grad_enabled(True)
    model = rome_lens.load_model(prepend_bos=True)
    with tempfile.TemporaryDirectory() as folder:
        save_tensors(GOLDEN, computed(model, folder), {"model": "SmolLM2-135M-Instruct, BOS"})
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
