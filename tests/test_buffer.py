"""ActivationBuffer on tiny random models: exact values, masking, io modes, several sites, bad input."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from helpers import canonical, drain, hook_rows
from tiny_models import SENTENCES

from dictionary_learning import trainSAE
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.trainers import StandardTrainer


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize("io", ["out", "in"])
def test_buffer_rows_equal_forward_hook_values(family, io):
    model = getattr(tiny_models, family)()
    layers = model.gpt_neox.layers if family == "gpt_neox" else model.model.layers
    texts = SENTENCES[:12]
    for site, module in ((layers[1].mlp, layers[1].mlp._module), (layers[0], layers[0]._module)):
        buffer = ActivationBuffer(
            iter(texts), model, site, io=io, n_ctxs=64, ctx_len=32, refresh_batch_size=5, out_batch_size=7, pack=False
        )
        got = drain(buffer)
        expected = hook_rows(model, module, texts, io=io)
        assert got.shape == expected.shape  # every real token once: no padding, nothing dropped
        torch.testing.assert_close(canonical(got), canonical(expected), rtol=1e-5, atol=1e-5)


def test_remove_bos_drops_bos_and_only_bos():
    model = tiny_models.llama()  # its tokenizer prepends <s>, distinct from EOS
    texts = SENTENCES[:10]
    buffer = ActivationBuffer(
        iter(texts),
        model,
        model.model.layers[0],
        n_ctxs=32,
        ctx_len=32,
        refresh_batch_size=4,
        out_batch_size=50,
        remove_bos=True,
        pack=False,
    )
    got = drain(buffer)
    expected = hook_rows(model, model.model.layers[0]._module, texts, drop_first=True)
    torch.testing.assert_close(canonical(got), canonical(expected), rtol=1e-5, atol=1e-5)


def test_remove_bos_when_bos_equals_eos_keeps_document_separators():
    model = tiny_models.gpt_neox()  # GPT-2 style: one id for BOS and EOS
    eot = model.tokenizer.eos_token
    buffer = ActivationBuffer(
        iter([f"{eot}first doc.{eot}second doc."]),
        model,
        model.gpt_neox.layers[0],
        n_ctxs=4,
        ctx_len=32,
        refresh_batch_size=1,
        out_batch_size=100,
        remove_bos=True,
        pack=False,
    )
    ids = model.tokenizer(f"{eot}first doc.{eot}second doc.")["input_ids"]
    assert drain(buffer).shape[0] == len(ids) - 1  # the leading one goes, the separator stays


def test_token_id_inputs_and_truncation_to_ctx_len():
    model = tiny_models.gpt_neox()
    sequences = [model.tokenizer(t)["input_ids"] for t in SENTENCES[:6]]
    from_ids = ActivationBuffer(
        iter([torch.tensor(s) for s in sequences]),
        model,
        model.gpt_neox.layers[1],
        n_ctxs=16,
        ctx_len=5,
        refresh_batch_size=3,
        out_batch_size=100,
        pack=False,
    )
    assert drain(from_ids).shape[0] == sum(min(len(s), 5) for s in sequences)


def test_in_to_out_yields_input_and_output_pairs():
    model = tiny_models.llama()
    mlp = model.model.layers[0].mlp
    buffer = ActivationBuffer(
        iter(SENTENCES[:4]),
        model,
        mlp,
        io="in_to_out",
        n_ctxs=8,
        ctx_len=32,
        refresh_batch_size=4,
        out_batch_size=1000,
        pack=False,
    )
    got = drain(buffer)
    assert got.shape[1:] == (2, 32)
    torch.testing.assert_close(canonical(got[:, 1]), canonical(hook_rows(model, mlp._module, SENTENCES[:4])))
    torch.testing.assert_close(canonical(got[:, 0]), canonical(hook_rows(model, mlp._module, SENTENCES[:4], io="in")))


def test_several_sites_from_one_pass_stay_aligned():
    model = tiny_models.llama()
    layer1 = model.model.layers[1]
    # both inputs are the residual stream after layer 0: aligned rows must be identical
    buffer = ActivationBuffer(
        iter(SENTENCES[:8]),
        model,
        {"resid": layer1, "ln": layer1.input_layernorm},
        io="in",
        n_ctxs=16,
        ctx_len=32,
        refresh_batch_size=3,
        out_batch_size=20,
        pack=False,
    )
    batches = list(buffer)
    assert set(batches[0]) == {"resid", "ln"} and buffer.d_submodule == [32, 32]
    for batch in batches:
        torch.testing.assert_close(batch["resid"], batch["ln"])


def test_trainsae_routes_site_batches_by_submodule_name():
    model = tiny_models.llama()
    layers = model.model.layers
    buffer = ActivationBuffer(
        iter(SENTENCES * 20),
        model,
        {"l0": layers[0], "l1": layers[1]},
        n_ctxs=32,
        ctx_len=16,
        refresh_batch_size=8,
        out_batch_size=64,
        pack=False,
    )
    common = dict(
        trainer=StandardTrainer, activation_dim=32, dict_size=64, warmup_steps=2, sparsity_warmup_steps=2, device="cpu"
    )
    dicts = trainSAE(
        buffer, [dict(common, submodule_name="l0"), dict(common, submodule_name="l1")], steps=10, progress=False
    )
    assert len(dicts) == 2
    with pytest.raises(ValueError, match=r"submodule_name 'l7'.*\['l0', 'l1'\]"):
        trainSAE(buffer, [dict(common, submodule_name="l7")], steps=10, progress=False)


def test_exhausted_data_serves_everything_then_stops():
    model = tiny_models.gpt_neox()
    texts = SENTENCES[:30]
    buffer = ActivationBuffer(
        iter(texts),
        model,
        model.gpt_neox.layers[0],
        n_ctxs=4,
        ctx_len=32,
        refresh_batch_size=3,
        out_batch_size=16,
        pack=False,
    )
    total = sum(len(model.tokenizer(t)["input_ids"]) for t in texts)
    assert drain(buffer).shape[0] == total  # several refreshes; leftovers of each LM batch are kept
    with pytest.raises(StopIteration, match="End of data stream"):
        next(buffer)


def test_float_n_ctxs_bf16_storage_and_seeded_order():
    model = tiny_models.gpt_neox()

    def make():
        return ActivationBuffer(
            iter(SENTENCES),
            model,
            model.gpt_neox.layers[0],
            n_ctxs=3e1,
            ctx_len=8,
            refresh_batch_size=10,
            out_batch_size=32,
            dtype=torch.bfloat16,
            seed=3,
            pack=False,
        )

    a, b = make(), make()
    assert a.capacity == 240 and next(a).dtype == torch.bfloat16
    torch.testing.assert_close(next(a), (next(b), next(b))[1])


def test_high_norm_positions_are_dropped():
    model = tiny_models.gpt_neox()
    buffer = ActivationBuffer(
        iter([]), model, model.gpt_neox.layers[0], n_ctxs=1, ctx_len=4, max_activation_norm_multiple=10, pack=False
    )
    acts = torch.ones(2, 4, 8)
    acts[1, 2] *= 100
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = buffer.keep_mask(torch.zeros(2, 4, dtype=torch.long), mask, [acts])
    assert keep.tolist() == [[True, True, True, False], [True, True, False, True]]


def test_bad_input_is_named():
    model = tiny_models.gpt_neox()
    layer = model.gpt_neox.layers[0]
    with pytest.raises(ValueError, match=r"d_submodule=16 but .* have width \[32\]"):
        ActivationBuffer(iter(SENTENCES), model, layer, d_submodule=16, pack=False)
    with pytest.raises(ValueError, match="io must be one of"):
        ActivationBuffer(iter(SENTENCES), model, layer, io="middle", pack=False)
    with pytest.raises(ValueError, match="no submodule 'gpt_neox.layers.9'"):
        ActivationBuffer(iter(SENTENCES), model, "gpt_neox.layers.9", pack=False)
    with pytest.raises(ValueError, match="not a submodule of this model"):
        ActivationBuffer(iter(SENTENCES), model, torch.nn.Linear(2, 2), pack=False)
    with pytest.raises(
        TypeError, match="item 0 of the data is dict .*must yield documents \\(strings\\) or token-id sequences"
    ):
        next(ActivationBuffer(iter([{"text": "hi"}]), model, layer, n_ctxs=2, ctx_len=4, pack=False))
    assert ActivationBuffer(iter(SENTENCES), model, "gpt_neox.layers.0", pack=False).submodule._module is layer._module


def test_head_buffer_splits_attention_output_by_head_and_trainsae_trains_one_per_head():
    from dictionary_learning.buffer import HeadActivationBuffer

    model = tiny_models.llama()
    o_proj = model.model.layers[1].self_attn.o_proj
    buffer = HeadActivationBuffer(
        iter(SENTENCES * 10),
        model,
        layer=1,
        n_ctxs=16,
        ctx_len=16,
        refresh_batch_size=8,
        out_batch_size=32,
        seed=0,
        pack=False,
    )
    batch = next(buffer)
    assert batch.shape == (32, 4, 8) and buffer.config["n_heads"] == 4  # 4 heads of 32 / 4
    mapped = HeadActivationBuffer(
        iter(SENTENCES),
        model,
        layer=1,
        n_ctxs=16,
        ctx_len=16,
        refresh_batch_size=8,
        out_batch_size=1000,
        apply_W_O=True,
        pack=False,
    )
    per_head = drain(mapped)
    assert per_head.shape[1:] == (4, 32)
    # the heads' contributions add up to the projection's output (no bias in Llama's o_proj)
    expected = hook_rows(model, o_proj._module, SENTENCES)
    torch.testing.assert_close(canonical(per_head.sum(1)), canonical(expected), rtol=1e-4, atol=1e-5)
    common = dict(
        trainer=StandardTrainer, activation_dim=8, dict_size=16, warmup_steps=2, sparsity_warmup_steps=2, device="cpu"
    )
    dicts = trainSAE(buffer, [common] * 4, steps=5, activations_split_by_head=True, progress=False)
    assert len(dicts) == 4
    with pytest.raises(ValueError, match="5 trainers but only 4 heads"):
        trainSAE(buffer, [common] * 5, steps=5, activations_split_by_head=True, progress=False)
