"""Fast training paths equal the plain computation: the sparse TopK path (`sparse=True`) and the fused
ReLU dictionary backward, in values and gradients."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SPARSE_D as D
from helpers import SPARSE_F as F
from helpers import SPARSE_K as K
from helpers import SPARSE_TRAINERS as TRAINERS
from helpers import grads as _grads
from helpers import sparse_dense_pair as _pair

from dictionary_learning.dictionaries import AutoEncoder, AutoEncoderNew
from dictionary_learning.sparse import batch_topk_entries, row_topk_entries
from dictionary_learning.trainers.top_k import DEAD_FEATURE_TOKENS

REPO = Path(__file__).resolve().parents[1]


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
    _, _, f, _ = sparse.loss(batches[0], step=8, logging=True)
    assert f.shape == (128, F) and (f != 0).sum(-1).float().mean() <= K + 1e-6


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
    from dictionary_learning.dictionaries.jumprelu import JumpReLUWithL0
    from dictionary_learning.ops import JumpReLUFunction, StepFunction

    torch.manual_seed(0)
    pre = torch.randn(64, 20) * 0.1
    theta = (torch.rand(20) * 0.1).requires_grad_()
    weights = torch.randn(64, 20)
    pre_a, pre_b = pre.clone().requires_grad_(), pre.clone().requires_grad_()
    row_weights = torch.randn(64)  # a per-row L0 loss (the quadratic target-L0 penalty is one)
    f, l0 = JumpReLUWithL0.apply(pre_a, theta, 0.05)
    ((f * weights).sum() + (row_weights * l0).sum()).backward()
    grads = pre_a.grad, theta.grad.clone()
    theta.grad = None
    f_ref = JumpReLUFunction.apply(pre_b, theta, 0.05)
    l0_ref = StepFunction.apply(pre_b, theta, 0.05).sum(-1)
    ((f_ref * weights).sum() + (row_weights * l0_ref).sum()).backward()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(l0, l0_ref)
    torch.testing.assert_close(grads[0], pre_b.grad)
    torch.testing.assert_close(grads[1], theta.grad)


def test_fused_gated_backward_matches_autograd():
    from dictionary_learning.dictionaries import GatedAutoEncoder
    from dictionary_learning.dictionaries.gated import gated_dictionary

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


# ------------------------------------------------------------------ sparse activations (dense recipes)
@pytest.mark.parametrize("branch", ["sampled_products", "sampled_products_csr", "sampled_products_portable"])
def test_sampled_products_and_feature_sums_equal_dense(branch):
    from dictionary_learning import sparse as engine

    torch.manual_seed(0)
    a, W = torch.randn(16, 8), torch.randn(30, 8)
    for rows, features, offsets in (
        row_topk_entries(torch.randn(16, 30), 5),  # unsorted features within a row
        engine.active_entries(torch.rand(16, 30) < 0.3, 1.0),
    ):
        if branch == "sampled_products":
            got = engine.sampled_products(a, W, rows, features, offsets)
        else:
            got = getattr(engine, branch)(a, W, features, offsets)
        torch.testing.assert_close(got, (a @ W.T)[rows, features])
        w = torch.randn(rows.shape[0])
        dense = torch.zeros(16, 30).index_put((rows, features), w)
        torch.testing.assert_close(engine.feature_sums(w, a, rows, features, 30), dense.T @ a)


def test_active_entries_declines_dense_masks_and_other_devices():
    from dictionary_learning.sparse import active_entries

    mask = torch.rand(20, 50) < 0.2
    assert active_entries(mask, 0.1) is None and active_entries(mask, 0.0) is None
    rows, features, offsets = active_entries(mask, 0.5)
    assert torch.equal(torch.zeros_like(mask).index_put((rows, features), torch.tensor(True)), mask)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(-1).cumsum(0)[:-1]]))
    assert active_entries(mask.to("meta"), 1.0) is None


def test_sparse_entries_checks_a_row_sample_before_building_the_whole_mask():
    from dictionary_learning.sparse import DENSITY_SAMPLE_ROWS, active_entries, sparse_entries

    torch.manual_seed(0)
    B = 4 * DENSITY_SAMPLE_ROWS
    x = torch.zeros(B, 3)
    for density, sparse in ((0.5, False), (0.05, True)):
        mask = torch.rand(B, 40) < density
        built = []

        def mask_of(rows, mask=mask, built=built):
            built.append(mask[rows].shape[0])
            return mask[rows]

        entries = sparse_entries(mask_of, x, 0.12)
        assert built[0] == DENSITY_SAMPLE_ROWS  # the sample comes first
        if sparse:  # then the whole mask, with active_entries' result
            assert built[1:] == [B]
            assert all(torch.equal(a, b) for a, b in zip(entries, active_entries(mask, 0.12)))
        else:  # a dense sample: the whole mask is never built
            assert entries is None and built == [DENSITY_SAMPLE_ROWS]
    assert sparse_entries(lambda rows: torch.ones(B, 40, dtype=torch.bool)[rows], x, 0.0) is None


def _perturbed(ae, scale=0.1):
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * scale)
    return ae


def _both_paths(run, params):
    """Outputs and parameter gradients of `run(max_density)` on the sparse and the dense path."""
    results = []
    for max_density in (1.0, 0.0):
        for p in params.values():
            p.grad = None
        outs = run(max_density)
        results.append((outs, {n: p.grad.clone() for n, p in params.items()}))
    return results


@pytest.mark.parametrize("cls", [AutoEncoder, AutoEncoderNew], ids=lambda c: c.__name__)
def test_sparse_relu_path_matches_dense(cls):
    from dictionary_learning.ops import lp_norm, row_sums
    from dictionary_learning.sparse import SparseCode

    torch.manual_seed(0)
    ae = _perturbed(cls(12, 40))
    with torch.no_grad():
        ae.encoder.bias.sub_(0.3)  # about a third of the features fire
    x = torch.randn(30, 12)
    norms = torch.rand(40) + 0.5

    def run(max_density):
        f, x_hat = ae.encode_decode(x, max_density)
        penalty = row_sums(f, norms).mean() + lp_norm(f, 0.5, "Lp") + lp_norm(f, 0.0, "Lp^p")
        ((x - x_hat).pow(2).sum() + 0.3 * penalty).backward()
        return f, x_hat, penalty

    (f_s, x_hat_s, pen_s), g_s = _both_paths(run, dict(ae.named_parameters()))[0]
    (f_d, x_hat_d, pen_d), g_d = _both_paths(run, dict(ae.named_parameters()))[1]
    assert isinstance(f_s, SparseCode) and not isinstance(f_d, SparseCode)
    assert 0.1 < (f_d > 0).float().mean() < 0.6
    torch.testing.assert_close(f_s.to_dense(), f_d)
    torch.testing.assert_close(x_hat_s, x_hat_d)
    torch.testing.assert_close(pen_s, pen_d)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], msg=name)


def test_sparse_jumprelu_path_matches_dense():
    from dictionary_learning.dictionaries import JumpReluAutoEncoder
    from dictionary_learning.dictionaries.jumprelu import jumprelu_dictionary

    torch.manual_seed(0)
    ae = _perturbed(JumpReluAutoEncoder(12, 40))
    x = torch.randn(64, 12)
    bw = 0.2  # wide, so that many pre-activations sit near a threshold on either side
    with torch.no_grad():
        ae.threshold.copy_((x @ ae.W_enc + ae.b_enc).quantile(0.7, dim=0))
    weights = torch.randn(64, 12)

    def run(max_density):
        f, l0, x_hat = jumprelu_dictionary(x, ae.W_enc.T, ae.b_enc, ae.threshold, ae.W_dec, ae.b_dec, bw, max_density)
        ((x_hat * weights).sum() + (torch.arange(64.0) * l0).sum()).backward()
        return f, l0, x_hat

    (s, g_s), (d, g_d) = _both_paths(run, dict(ae.named_parameters()))
    torch.testing.assert_close(s[0].to_dense(), d[0])
    torch.testing.assert_close(s[1], d[1])
    torch.testing.assert_close(s[2], d[2])
    assert g_d["threshold"].abs().sum() > 0
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], msg=name)


def test_sparse_gated_path_matches_dense():
    from dictionary_learning.dictionaries import GatedAutoEncoder
    from dictionary_learning.dictionaries.gated import gated_dictionary
    from dictionary_learning.ops import lp_norm, row_sums

    torch.manual_seed(0)
    ae = _perturbed(GatedAutoEncoder(12, 40))
    with torch.no_grad():
        ae.gate_bias.sub_(0.3)
    x = torch.randn(30, 12)

    def run(max_density):
        f, gate, x_hat, x_hat_gate = gated_dictionary(
            x, ae.encoder.weight, ae.gate_bias, ae.r_mag, ae.mag_bias, ae.decoder.weight, ae.decoder_bias, max_density
        )
        loss = (x - x_hat).pow(2).sum() + (x - x_hat_gate).pow(2).sum() + row_sums(f).sum()
        (loss + 0.7 * row_sums(gate).mean() + lp_norm(gate, 0.5)).backward()
        return f, gate, x_hat, x_hat_gate

    (s, g_s), (d, g_d) = _both_paths(run, dict(ae.named_parameters()))
    torch.testing.assert_close(s[0].to_dense(), d[0])
    torch.testing.assert_close(s[1].to_dense(), d[1])
    torch.testing.assert_close(s[2], d[2])
    torch.testing.assert_close(s[3], d[3])
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], msg=name)


DENSE_RECIPES = [
    ("StandardTrainer", {"l1_penalty": 0.5}),
    ("StandardTrainerAprilUpdate", {"l1_penalty": 0.5}),
    ("PAnnealTrainer", {"anneal_start": 2, "n_sparsity_updates": 3, "sparsity_function": "Lp^p"}),
    ("GatedSAETrainer", {"l1_penalty": 0.5}),
    ("GatedAnnealTrainer", {"anneal_start": 2, "n_sparsity_updates": 3}),
    ("JumpReluTrainer", {"target_l0": 5.0, "bandwidth": 0.1}),
]


@pytest.mark.parametrize("name,kwargs", DENSE_RECIPES, ids=[n for n, _ in DENSE_RECIPES])
def test_dense_recipes_train_the_same_on_the_sparse_path(monkeypatch, name, kwargs):
    from dictionary_learning import TRAINER_REGISTRY
    from dictionary_learning import sparse as engine

    monkeypatch.setattr(engine, "SPARSE_MAX_DENSITY", 1.0)  # always sparse when allowed
    cls = TRAINER_REGISTRY[name]
    common = dict(steps=10, activation_dim=D, dict_size=F, seed=3, device="cpu", warmup_steps=0)
    common |= dict(sparsity_warmup_steps=None, lr=1e-3) | kwargs
    sparse, dense = cls(**common, sparse=True), cls(**common, sparse=False)
    torch.manual_seed(1)
    batches = [torch.randn(128, D) + 0.3 for _ in range(6)]
    seen = []
    for step, x in enumerate(batches):
        seen.append(type(sparse.loss(x.clone(), step).f).__name__)
        sparse.update(step, x)
        dense.update(step, x)
    assert seen == ["SparseCode"] * len(batches)
    for (key, p_s), p_d in zip(sparse.ae.state_dict().items(), dense.ae.state_dict().values()):
        torch.testing.assert_close(p_s, p_d, rtol=1e-4, atol=1e-5, msg=key)
    _, _, f, _ = sparse.loss(batches[0], step=6, logging=True)
    assert f.shape == (128, F)


# ------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CI installs it)")
def test_triton_kernels_equal_the_pytorch_path():
    """The Triton kernels (run by Triton's interpreter on CPU tensors) give the PyTorch path's results:
    both backward primitives, and whole TopK, BatchTopK and Standard (sparse path) training steps."""
    env = dict(os.environ, TRITON_INTERPRET="1", DICTIONARY_LEARNING_TRITON="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("triton_parity.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "triton parity ok" in out.stdout


def test_triton_switch_needs_triton_and_a_device_it_runs_on(monkeypatch):
    from dictionary_learning import sparse as engine

    monkeypatch.setattr(engine, "USE_TRITON", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert engine._triton_kernels(torch.zeros(2)) is None  # CPU tensors stay on the PyTorch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "dictionary_learning.triton_kernels", None)  # as if triton were missing
    with pytest.raises(ImportError, match="needs the triton package"):
        engine._triton_kernels(torch.zeros(2))
