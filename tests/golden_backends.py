"""Golden values for backend parity: one tiny Llama, computed on TL 3, checked on TL 4.

The file ``tests/data/golden_backends.safetensors`` holds the Hugging Face
weights of a random 3-block Llama (gated MLP, RMSNorm, rotary, grouped-query
attention) and what rome_lens computed from them on TransformerLens 3: the
causal trace of every cell, ROME's k*, v* and δ, the key statistics, the
EK-FAC factors of layer 1's MLP and a scan's scores, and the Microscope's layer
linearity, token nonlinearity and intermediate predictions. The tests load the
same weights on whichever TransformerLens is installed and compare. Regenerate
on TL 3 with ``python -m tests.golden_backends``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from rome_lens.core import backend
from rome_lens.core.cache import load_tensors, save_tensors
from rome_lens.core.models import _tiny_tokenizer, bridge_from_hf

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_backends.safetensors"
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is located in the city of Paris, the capital of France.",
    "The Colosseum is located in the city of Rome, the capital of Italy.",
] * 6


def llama_config(tokenizer: Any) -> transformers.LlamaConfig:
    """The tiny Llama's configuration."""
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip


def model_from(weights: dict[str, torch.Tensor]) -> Any:
    """The tiny Llama with ``weights`` on the installed TransformerLens (3 or 4)."""
    tokenizer = _tiny_tokenizer()
    hf_model = transformers.LlamaForCausalLM(llama_config(tokenizer))
    hf_model.load_state_dict(weights)
    hf_model.eval()
    if backend.transformer_lens_major() >= 4:
        return bridge_from_hf(hf_model, tokenizer)
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    from rome_lens.core.models import _hooked_transformer

    hf_model.config.architectures = ["LlamaForCausalLM"]
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.config.save_pretrained(tmp)
        config = convert_hf_model_config(tmp)
    config.update(original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=False)
    cfg = HookedTransformerConfig(**config, init_weights=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _hooked_transformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, cfg),
        fold_ln=False, center_writing_weights=False, center_unembed=False,
    )  # fmt: skip
    return model.eval()


def compute(model: Any, cache_dir: str) -> dict[str, torch.Tensor]:
    """Every value the parity test compares, computed on ``model``."""
    import rome_lens
    from rome_lens.analysis import intermediate_predictions, layer_linearity, token_nonlinearity
    from rome_lens.analysis.linearity import fit_linear_maps
    from rome_lens.editing import EditRequest, ROMEHyperParams, rome_edit
    from rome_lens.influence import fit_influence_factors, influence
    from rome_lens.stats import key_second_moment

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = rome_lens.trace_fact(model, PROMPT, SUBJECT, samples=3, window=1, progress=False)
        stats = key_second_moment(
            model, 1, corpus=TEXTS, n_tokens=200, cache_dir=cache_dir, progress=False
        )
        edit = rome_edit(
            model,
            EditRequest("{} is located in the city of", SUBJECT, "Rome"),
            layer=1,
            hparams=ROMEHyperParams(context_lengths=((3, 2),), v_steps=5),
            stats=stats,
            progress=False,
        )
        factors = fit_influence_factors(
            model, TEXTS, layers=[1], n_tokens=200, fisher="empirical", cache_dir=cache_dir,
            progress=False,
        )  # fmt: skip
        scan = influence(model, factors, PROMPT, " Paris", TEXTS[:6], top_k=6, progress=False)
        linearity = layer_linearity(model, TEXTS, n_tokens=200, cache_dir=cache_dir, progress=False)
        maps = fit_linear_maps(model, TEXTS, n_tokens=200, cache_dir=cache_dir, progress=False)
        nonlinearity = token_nonlinearity(model, TEXTS[1], maps=maps, progress=False)
        predictions = intermediate_predictions(model, TEXTS[1], progress=False)
    scan_scores = torch.zeros(6, dtype=torch.float64)
    scan_scores[scan.text_ids] = torch.as_tensor(scan.scores).double()
    values = {
        "trace_scores": trace.scores.float(),
        "key": edit.key.double(),
        "value": edit.value.double(),
        "delta": edit.right.double(),
        "key_moment": (stats.moments.outer / stats.moments.count).double(),
        "scan_scores": scan_scores,
        "linearity": linearity.linearity.double(),
        "linearity_without_residual": linearity.linearity_without_residual.double(),
        "token_errors": nonlinearity.errors.double(),
        "lens_losses": predictions.losses.double(),
    }
    pairs = {
        "input": (factors.input_vectors, factors.input_values),
        "output": (factors.output_vectors, factors.output_values),
    }
    for name in factors.names:  # A = Q_A Λ_A Q_Aᵀ and S: free of the eigenvectors' signs
        for side, (vectors, eigenvalues) in pairs.items():
            q, lam = vectors[name].double(), eigenvalues[name].double()
            values[f"{side}_factor.{name}"] = (q * lam) @ q.T
    return values


def main() -> None:
    """Write the golden file (run on TransformerLens 3)."""
    if backend.transformer_lens_major() >= 4:
        raise SystemExit("the golden values are computed on TransformerLens 3")
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(llama_config(tokenizer))
    with torch.no_grad():  # RMSNorm gains away from 1, so folding them would show
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn(param.shape) * 0.1)
    weights = {f"hf.{k}": v.detach().clone() for k, v in hf_model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        values = compute(model_from({k[3:]: v for k, v in weights.items()}), tmp)
    save_tensors(GOLDEN, {**weights, **values}, {"made_on": "transformer-lens 3"})
    print(f"wrote {GOLDEN}")


def load() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(Hugging Face weights, golden values)`` from the file."""
    tensors, _ = load_tensors(GOLDEN)
    weights = {k[3:]: v for k, v in tensors.items() if k.startswith("hf.")}
    return weights, {k: v for k, v in tensors.items() if not k.startswith("hf.")}


if __name__ == "__main__":
    main()
