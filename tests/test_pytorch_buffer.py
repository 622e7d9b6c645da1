"""The reference's PyTorch-hooks buffer (`dictionary_learning.pytorch_buffer`) on a plain Hugging Face
model: the same rows as forward hooks and as our nnsight buffer, and it trains a dictionary."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from helpers import canonical, drain, hook_rows
from tiny_models import SENTENCES

from dictionary_learning import trainSAE
from dictionary_learning.buffer import ActivationBuffer as NNsightBuffer
from dictionary_learning.pytorch_buffer import ActivationBuffer, collect_activations
from dictionary_learning.trainers import TopKTrainer


@pytest.mark.parametrize("io", ["out", "in"])
def test_rows_equal_forward_hooks_and_the_nnsight_buffer(io):
    wrapped = tiny_models.llama()
    hf, mlp = wrapped._module, wrapped._module.model.layers[1].mlp
    texts = SENTENCES[:10]
    kwargs = dict(io=io, n_ctxs=64, ctx_len=32, refresh_batch_size=4, out_batch_size=7, pack=False)
    got = drain(ActivationBuffer(iter(texts), hf, mlp, tokenizer=wrapped.tokenizer, **kwargs))
    expected = hook_rows(wrapped, mlp, texts, io=io)
    assert got.shape == expected.shape
    torch.testing.assert_close(canonical(got), canonical(expected), rtol=1e-5, atol=1e-5)
    via_nnsight = drain(NNsightBuffer(iter(texts), wrapped, wrapped.model.layers[1].mlp, **kwargs))
    torch.testing.assert_close(canonical(got), canonical(via_nnsight), rtol=1e-5, atol=1e-5)


def test_collect_activations_stops_after_the_module_and_returns_its_output():
    wrapped = tiny_models.llama()
    hf = wrapped._module
    inputs = wrapped.tokenizer(SENTENCES[:3], return_tensors="pt", padding=True)
    layer0 = hf.model.layers[0]
    later = []
    handle = hf.model.layers[1].register_forward_hook(lambda *args: later.append(1))
    got = collect_activations(hf, layer0, dict(inputs))
    handle.remove()
    assert later == []  # the forward pass stopped after layer 0
    with torch.no_grad():
        full = hf(**inputs, output_hidden_states=True).hidden_states[1]  # layer 0's output
    torch.testing.assert_close(got, full)


def test_trains_a_dictionary_and_names_a_missing_tokenizer():
    wrapped = tiny_models.llama()
    hf = wrapped._module
    buffer = ActivationBuffer(
        iter(SENTENCES * 4), hf, "model.layers.1.mlp", tokenizer=wrapped.tokenizer, n_ctxs=32, ctx_len=16,
        refresh_batch_size=8, out_batch_size=32,
    )  # fmt: skip
    config = dict(trainer=TopKTrainer, activation_dim=buffer.d_submodule, dict_size=64, k=4, warmup_steps=2)
    ae = trainSAE(buffer, [dict(config, device="cpu")], 10, progress=False)[0]
    assert ae.activation_dim == 32
    hf.name_or_path = ""
    with pytest.raises(ValueError, match="pass tokenizer="):
        ActivationBuffer(iter(SENTENCES), hf, "model.layers.1.mlp")
