"""Fast training paths equal the plain computation: the sparse TopK path (`sparse=True`) and the fused
ReLU dictionary backward, in values and gradients."""

import pytest
import torch

from dictionary_learning.dictionaries import AutoEncoder, AutoEncoderNew
from dictionary_learning.ops import batch_topk_entries, row_topk_entries
from dictionary_learning.trainers import BatchTopKTrainer, MatryoshkaBatchTopKTrainer, TopKTrainer
from dictionary_learning.trainers.top_k import DEAD_FEATURE_TOKENS

D, F, K = 24, 96, 6


def _pair(cls, **kwargs):
    """Two identical trainers, one sparse and one dense."""
    common = dict(steps=100, activation_dim=D, dict_size=F, k=K, seed=3, device="cpu", warmup_steps=0) | kwargs
    return cls(**common, sparse=True), cls(**common, sparse=False)


def _grads(trainer, x, step=1):
    trainer.ae.zero_grad(set_to_none=True)
    out = trainer._compute(x, step)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in trainer.ae.named_parameters()}


TRAINERS = [
    (TopKTrainer, {}),
    (BatchTopKTrainer, {}),
    (MatryoshkaBatchTopKTrainer, {"group_fractions": [0.25, 0.25, 0.5]}),
]


@pytest.mark.parametrize("cls,kwargs", TRAINERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("with_dead", [False, True], ids=["live", "auxk"])
def test_sparse_path_matches_dense_values_and_gradients(cls, kwargs, with_dead):
    sparse, dense = _pair(cls, **kwargs)
    torch.manual_seed(0)
    x = torch.randn(64, D) * 2 + 0.5
    b_dec, b_enc = torch.randn(D), torch.randn(F) * 0.1
    for t in (sparse, dense):
        with torch.no_grad():  # a non-trivial b_dec and encoder bias, so that every gradient term shows
            t.ae.b_dec.copy_(b_dec)
            t.ae.encoder_weight_bias()[1].copy_(b_enc)
        if with_dead:  # every other latent has been silent long enough to count as dead
            t.tokens_seen = DEAD_FEATURE_TOKENS
            t.num_tokens_since_fired[::2] = DEAD_FEATURE_TOKENS
    out_s, g_s = _grads(sparse, x)
    out_d, g_d = _grads(dense, x)
    assert out_d.losses["auxk_loss"] > 0 if with_dead else out_d.losses["auxk_loss"] == 0
    for key in out_d.losses:
        torch.testing.assert_close(torch.as_tensor(out_s.losses[key]), torch.as_tensor(out_d.losses[key]))
    torch.testing.assert_close(out_s.f.to_dense(), out_d.f.reshape(64, F))
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(out_s.commit["counter_F"], out_d.commit["counter_F"])


@pytest.mark.parametrize("cls,kwargs", TRAINERS, ids=lambda v: getattr(v, "__name__", ""))
def test_sparse_and_dense_training_agree_over_steps(cls, kwargs):
    sparse, dense = _pair(cls, threshold_start_step=2, **kwargs)
    torch.manual_seed(1)
    batches = [torch.randn(128, D) for _ in range(8)]
    for step, x in enumerate(batches):
        sparse.update(step, x)
        dense.update(step, x)
    for (name, p_s), p_d in zip(sparse.ae.state_dict().items(), dense.ae.state_dict().values()):
        torch.testing.assert_close(p_s, p_d, rtol=1e-4, atol=1e-5, msg=name)
    log = sparse.loss(batches[0], step=8, logging=True)
    assert log.f.shape == (128, F) and (log.f != 0).sum(-1).float().mean() <= K + 1e-6


def test_batch_topk_entries_exact_with_uneven_rows():
    torch.manual_seed(0)
    pre = torch.randn(32, 64)
    pre[3] += 10  # one row holds far more than 2k of the batch's top entries
    for k in (1, 2, 5):
        rows, features, offsets = batch_topk_entries(pre, k)
        got = torch.zeros_like(pre, dtype=torch.bool)
        got[rows, features] = True
        expected = torch.zeros(pre.numel(), dtype=torch.bool)
        expected[pre.flatten().topk(k * 32).indices] = True
        assert torch.equal(got.flatten(), expected)
        assert torch.equal(offsets, torch.searchsorted(rows, torch.arange(32)))
    rows, features, offsets = row_topk_entries(pre, 3)
    assert torch.equal(features.view(32, 3).sort().values, pre.topk(3).indices.sort().values)


@pytest.mark.parametrize("cls", [AutoEncoder, AutoEncoderNew], ids=lambda c: c.__name__)
def test_fused_relu_backward_matches_autograd(cls):
    torch.manual_seed(0)
    ae = cls(12, 40)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 7, 12)

    def loss(f, x_hat):  # a penalty whose gradient depends on f, as p-annealing's does
        return (x - x_hat).pow(2).sum() + 0.3 * f.pow(1.5).sum()

    f, x_hat = ae.encode_decode(x)
    loss(f, x_hat).backward()
    fused = {n: p.grad.clone() for n, p in ae.named_parameters()}
    ae.zero_grad()
    f_ref = ae.encode(x)
    x_hat_ref = ae.decode(f_ref)
    loss(f_ref, x_hat_ref).backward()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(x_hat, x_hat_ref)
    for name, p in ae.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)


def test_fused_jumprelu_with_l0_matches_the_two_functions():
    from dictionary_learning.ops import JumpReLUFunction, StepFunction, jumprelu_with_l0

    torch.manual_seed(0)
    pre = torch.randn(64, 20) * 0.1
    theta = (torch.rand(20) * 0.1).requires_grad_()
    weights = torch.randn(64, 20)
    pre_a, pre_b = pre.clone().requires_grad_(), pre.clone().requires_grad_()
    f, l0 = jumprelu_with_l0(pre_a, theta, 0.05)
    ((f * weights).sum() + 3 * l0).backward()
    grads = pre_a.grad, theta.grad.clone()
    theta.grad = None
    f_ref = JumpReLUFunction.apply(pre_b, theta, 0.05)
    l0_ref = StepFunction.apply(pre_b, theta, 0.05).sum(-1).mean()
    ((f_ref * weights).sum() + 3 * l0_ref).backward()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(l0, l0_ref)
    torch.testing.assert_close(grads[0], pre_b.grad)
    torch.testing.assert_close(grads[1], theta.grad)


def test_fused_gated_backward_matches_autograd():
    from dictionary_learning.dictionaries import GatedAutoEncoder
    from dictionary_learning.ops import gated_dictionary

    torch.manual_seed(0)
    ae = GatedAutoEncoder(12, 40)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(30, 12)

    def loss(f, gate, x_hat, x_hat_gate):
        return (x - x_hat).pow(2).sum() + 0.7 * gate.pow(1.5).sum() + (x - x_hat_gate).pow(2).sum() + f.sum()

    outs = gated_dictionary(
        x, ae.encoder.weight, ae.gate_bias, ae.r_mag, ae.mag_bias, ae.decoder.weight, ae.decoder_bias
    )
    loss(*outs).backward()
    fused = {n: p.grad.clone() for n, p in ae.named_parameters()}
    ae.zero_grad()
    f, gate = ae.encode(x, return_gate=True)
    x_hat_gate = gate @ ae.decoder.weight.detach().T + ae.decoder_bias.detach()
    ref = (f, gate, ae.decode(f), x_hat_gate)
    loss(*ref).backward()
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)
    for name, p in ae.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)
