"""Benchmark: fast causal tracing against ROME's original algorithm.

The original runs one forward pass of batch ``samples + 1`` (a clean row and
``samples`` corrupted rows) for every (kind, token, layer), patching from the
clean row of the same batch. ``trace_fact`` gives the same scores from cached
runs. Both use the default model, the demo prompt and the same noise.

Each method runs in its own subprocess so that peak memory (max RSS) is its own.

    python bench/bench_trace.py            # both, on the installed TL and (if .tl3 exists) TL 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
KINDS = ("resid", "mlp", "attn")
SAMPLES, WINDOW, SEED = 10, 10, 0


def original_trace(model, noise_scale: float) -> torch.Tensor:
    """ROME's loop: one hooked forward pass per (kind, token, layer)."""
    from rome_lens.core.tokens import subject_range
    from rome_lens.tracing import window_layers

    tokens = model.to_tokens(PROMPT)
    first, last = subject_range(model, PROMPT, SUBJECT)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn((SAMPLES, last - first, model.cfg.d_model), generator=g) * noise_scale
    batch = tokens.expand(SAMPLES + 1, -1)
    target = int(model(tokens)[0, -1].argmax())

    def corrupt(act, hook):
        act = act.clone()
        act[1:, first:last] += noise
        return act

    def restore(t):
        def hook(act, hook):
            act[1:, t] = act[0, t]
            return act

        return hook

    n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
    scores = torch.zeros(len(KINDS), n_pos, n_layers)
    for k, kind in enumerate(KINDS):
        for t in range(n_pos):
            for layer in range(n_layers):
                if kind == "resid":
                    names = [f"blocks.{layer}.hook_resid_post"]
                else:
                    layers = window_layers(layer, WINDOW, n_layers)
                    names = [f"blocks.{j}.hook_{kind}_out" for j in layers]
                fwd = [("hook_embed", corrupt)] + [(n, restore(t)) for n in names]
                logits = model.run_with_hooks(batch, fwd_hooks=fwd)
                scores[k, t, layer] = logits[1:, -1].softmax(-1)[:, target].mean()
    return scores


def run_one(method: str, out: Path) -> None:
    import rome_lens
    from rome_lens.core.backend import transformer_lens_major

    model = rome_lens.load_model()
    noise_scale = rome_lens.embedding_noise_scale(model, [SUBJECT])
    start = time.perf_counter()
    with torch.inference_mode():
        if method == "original":
            scores = original_trace(model, noise_scale)
        else:
            trace = rome_lens.trace_fact(
                model,
                PROMPT,
                SUBJECT,
                kinds=KINDS,
                samples=SAMPLES,
                window=WINDOW,
                seed=SEED,
                noise_scale=noise_scale,
                progress=False,
            )
            scores = trace.scores
    seconds = time.perf_counter() - start
    torch.save(scores, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    major = transformer_lens_major()
    backend = "TL 4 TransformerBridge" if major >= 4 else "TL 3 HookedTransformer"
    print(json.dumps({"method": method, "seconds": seconds, "peak_mib": peak, "backend": backend}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["original", "fast"])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--other-tl",
        type=Path,
        default=Path(__file__).resolve().parents[1] / ".tl3",
        help="a folder holding the other TransformerLens (`make setup` fills .tl3), if present",
    )
    args = parser.parse_args()
    if args.method:
        run_one(args.method, args.out)
        return
    folders: list[Path | None] = [None]
    if (args.other_tl / "transformer_lens").exists():
        folders.append(args.other_tl)
    print(
        f"model: SmolLM2-135M-Instruct, prompt {PROMPT!r}, kinds {KINDS}, "
        f"samples {SAMPLES}, window {WINDOW}, threads {torch.get_num_threads()}"
    )
    print(f"{'backend':<24}{'method':<12}{'seconds':>10}{'peak MiB':>10}")
    summary = []
    for path in folders:
        fast, orig = _run_backend(path)
        backend = fast["backend"]
        for name, r in (("original", orig), ("trace_fact", fast)):
            print(f"{backend:<24}{name:<12}{r['seconds']:>10.1f}{r['peak_mib']:>10.0f}")
        diff = float((fast["scores"] - orig["scores"]).abs().max())
        summary.append(
            f"{backend}: speed ratio (original / trace_fact) "
            f"{orig['seconds'] / fast['seconds']:.1f}x, largest |score difference| {diff:.2e}, "
            f"peak memory ratio {fast['peak_mib'] / orig['peak_mib']:.2f}"
        )
    print("\n".join(summary))


def _run_backend(other_tl: Path | None) -> tuple[dict, dict]:
    """Both methods in subprocesses, on the installed TL or the one in ``other_tl``."""
    env = dict(os.environ)
    if other_tl is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(other_tl), env.get("PYTHONPATH")]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("fast", "original"):
            out = Path(tmp) / f"{method}.pt"
            cmd = [sys.executable, __file__, "--method", method, "--out", str(out)]
            run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results[method] = json.loads(run.stdout.strip().splitlines()[-1])
            results[method]["scores"] = torch.load(out)
    return results["fast"], results["original"]


if __name__ == "__main__":
    main()
