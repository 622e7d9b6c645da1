"""The reference's helpers that are ours too: evaluation.loss_recovered, the mixed and packed dataset
generators of utils, utils.truncate_model and interp.feature_umap (on local data and tiny models)."""

from __future__ import annotations

import json
import random

import pytest
import tiny_models
import torch
from tiny_models import SENTENCES

from dictionary_learning.dictionaries import AutoEncoder, IdentityDict
from dictionary_learning.evaluation import evaluate, loss_recovered
from dictionary_learning.models import get_submodule
from dictionary_learning.utils import (
    hf_mixed_dataset_to_generator,
    hf_sequence_packing_dataset_to_generator,
    randomly_remove_system_prompt,
    simple_hf_mixed_dataset_to_generator,
    truncate_model,
)


# --------------------------------------------------------------------------------- loss_recovered
def test_loss_recovered_matches_evaluate_and_is_exact_for_identity():
    model = tiny_models.llama()
    site = model.model.layers[0].mlp
    texts = SENTENCES[:8]
    original, reconstructed, zero = loss_recovered(texts, model, site, IdentityDict(32), max_len=16)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in (original, reconstructed, zero))
    assert float(reconstructed) == pytest.approx(float(original)) and float(zero) != pytest.approx(float(original))

    ae = AutoEncoder(32, 64)
    triple = loss_recovered(texts, model, site, ae, max_len=16)

    from dictionary_learning.buffer import ActivationBuffer

    buffer = ActivationBuffer(iter(texts), model, site, n_ctxs=8, ctx_len=16, refresh_batch_size=8, pack=False)
    metrics = evaluate(ae, buffer, max_len=16, batch_size=8)
    assert {k: float(v) for k, v in metrics.items()}  # every value a number, as the reference's callers expect
    assert metrics["ce_diff_lo"] <= metrics["ce_diff_pooled"] <= metrics["ce_diff_hi"]
    expected = (metrics["loss_original"], metrics["loss_reconstructed"], metrics["loss_zero"])
    assert [float(v) for v in triple] == pytest.approx(expected, rel=1e-5)


def test_loss_recovered_reads_the_input_side_and_takes_token_ids():
    model = tiny_models.gpt_neox()
    site = model.gpt_neox.layers[1]
    ids = model.tokenizer(SENTENCES[:4], return_tensors="pt", padding=True)["input_ids"]
    original, reconstructed, _ = loss_recovered(ids, model, site, IdentityDict(32), io="in")
    assert float(reconstructed) == pytest.approx(float(original))
    with pytest.raises(ValueError, match="needs a dictionary"):
        loss_recovered(ids, model, site, None)


# ----------------------------------------------------------------------------- dataset generators
@pytest.fixture
def local_datasets(tmp_path):
    """Two local datasets (folders of JSON lines that `datasets.load_dataset` opens offline)."""
    pretrain, chat = tmp_path / "pretrain", tmp_path / "chat"
    pretrain.mkdir()
    chat.mkdir()
    (pretrain / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i}."}) + "\n" for i in range(40)))
    conversations = [
        [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": f"question {i}"}] for i in range(40)
    ]
    (chat / "train.jsonl").write_text("".join(json.dumps({"conversation": c}) + "\n" for c in conversations))
    return str(pretrain), str(chat)


class ChatTokenizer:
    """The two things the generators use of a tokenizer: its special tokens and its chat template."""

    bos_token, eos_token = "<s>", "</s>"

    def apply_chat_template(self, conversation, tokenize=False):
        assert tokenize is False
        return "<s>" + "".join(f"[{m['role']}] {m['content']}" for m in conversation)


def test_sequence_packing_joins_documents_up_to_min_chars(local_datasets):
    pretrain, _ = local_datasets
    packed = list(hf_sequence_packing_dataset_to_generator(ChatTokenizer(), pretrain, min_chars=30))
    assert packed[0] == "<s>document 0.</s>document 1.</s>document 2."  # 11 + 11 + 11 >= 30 characters
    assert sum(p.count("document") for p in packed) == 40
    single = list(hf_sequence_packing_dataset_to_generator(ChatTokenizer(), pretrain, sequence_pack_pretrain=False))
    assert single[:2] == ["<s>document 0.", "<s>document 1."]


def test_mixed_generator_follows_the_fraction_and_removes_the_system_prompt(local_datasets):
    pretrain, chat = local_datasets
    mixed = list(
        hf_mixed_dataset_to_generator(
            ChatTokenizer(),
            pretrain,
            chat,
            pretrain_frac=0.75,
            sequence_pack_pretrain=False,
            system_prompt_to_remove="[system] SYSTEM",
            system_prompt_removal_freq=1.0,
        )
    )
    kinds = ["chat" if "[user]" in item else "pretrain" for item in mixed]
    assert kinds[:8] == ["pretrain"] * 3 + ["chat"] + ["pretrain"] * 3 + ["chat"]
    assert not any("SYSTEM" in item for item in mixed)
    assert len(mixed) == 53  # stops when the 40 documents run out: 13 full runs of 3 + 1, then 1 more
    with pytest.raises(ValueError, match="pretrain_frac must lie strictly between 0 and 1"):
        hf_mixed_dataset_to_generator(ChatTokenizer(), pretrain, chat, pretrain_frac=1.0)


def test_simple_mixing_and_system_prompt_removal(local_datasets):
    pretrain, _ = local_datasets
    mixed = list(simple_hf_mixed_dataset_to_generator(pretrain, pretrain, main_frac=0.5))
    assert mixed[:4] == ["document 0.", "document 0.", "document 1.", "document 1."]
    random.seed(0)
    assert randomly_remove_system_prompt("SYS hello", 1.0, "SYS ") == "hello"
    assert randomly_remove_system_prompt("SYS hello", 0.0, "SYS ") == "SYS hello"
    assert randomly_remove_system_prompt("hello", 1.0) == "hello"
    with pytest.raises(ValueError, match="does not occur"):
        randomly_remove_system_prompt("hello", 1.0, "SYS ")


# --------------------------------------------------------------------------------- truncate_model
@pytest.mark.parametrize("build", [tiny_models.llama, tiny_models.gpt_neox])
def test_truncate_model_keeps_the_activations_up_to_the_layer(build):
    model = build(n_layers=3)
    hf = model._module
    ids = model.tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)

    def block_output(saved):
        def hook(module, args, out):
            saved.append((out[0] if isinstance(out, tuple) else out).clone())

        return get_submodule(hf, 1).register_forward_hook(hook)

    seen = []
    handle = block_output(seen)
    with torch.no_grad():
        hf(**ids)
    handle.remove()
    truncated = truncate_model(hf, 1)
    assert truncated is hf and len(list(get_submodule(hf, 1).parameters())) > 0
    with pytest.raises(ValueError, match="out of range"):
        get_submodule(hf, 2)
    again = []
    handle = block_output(again)
    with torch.no_grad():
        logits = hf(**ids).logits
    handle.remove()
    assert torch.equal(again[0], seen[0])
    assert logits.shape[-1] == hf.config.hidden_size  # the unembedding is gone
    with pytest.raises(ValueError, match="out of range"):
        truncate_model(hf, 5)


# ----------------------------------------------------------------------------------- feature_umap
@pytest.mark.slow  # numba compiles UMAP on first use (about a minute)
def test_feature_umap_embeds_and_highlights_features():
    pytest.importorskip("umap")
    pytest.importorskip("plotly")
    from dictionary_learning.interp import feature_umap

    torch.manual_seed(0)
    ae = AutoEncoder(16, 64)
    fig = feature_umap(ae, feat_idxs=[3, 5])
    (trace,) = fig.data
    assert len(trace.x) == 64 and trace.marker.color[3] == "red" and trace.marker.color[4] != "red"
    fig3 = feature_umap(ae, weight="encoder", n_components=3, feat_idxs=7)
    assert len(fig3.data[0].z) == 64 and fig3.data[0].marker.color[7] == "red"
    with pytest.raises(ValueError, match="weight must be"):
        feature_umap(ae, weight="bias")


def test_feature_umap_without_its_extra_names_the_install(monkeypatch):
    import sys

    from dictionary_learning.interp import feature_umap

    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match=r"dictionary_learning\[umap\]"):
        feature_umap(AutoEncoder(8, 16))
