"""Metrics against hand computations; evaluate end to end on a tiny model."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch
from tiny_models import SENTENCES

from dictionary_learning import AutoEncoder, IdentityDict
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.evaluation import _masked_ce, _masked_kl, evaluate, reconstruction_metrics


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    f = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 5.0]])
    m = reconstruction_metrics(x, x_hat, f)
    assert m["l2_loss"] == pytest.approx((4.0 + 1.0) / 2)
    assert m["l1_loss"] == pytest.approx((3.0 + 5.0) / 2)
    assert m["l0"] == pytest.approx(1.5)
    # var over the batch (unbiased): x columns (3,1) (4,0) -> 2 + 8; residual columns (0,-1) (4,0) -> 0.5 + 8
    assert m["frac_variance_explained"] == pytest.approx(1 - 8.5 / 10)
    assert m["cossim"] == pytest.approx((3 / 5 + 1.0) / 2)
    assert m["l2_ratio"] == pytest.approx((3 / 5 + 2.0) / 2)
    assert m["relative_reconstruction_bias"] == pytest.approx(((9 + 4) / 2) / ((9 + 2) / 2))


def test_masked_cross_entropy_and_kl_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2) = 3/6 at position 0
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[1, 1, 0]])  # the last position is padding: its target is ignored
    assert float(_masked_ce(logits, ids, mask)) == pytest.approx(-math.log(0.5))
    assert float(_masked_kl(logits, logits, mask)) == pytest.approx(0.0, abs=1e-7)
    uniform = torch.zeros(1, 3, 4)
    expected = (0.5 * math.log(0.5 / 0.25) + 3 * (1 / 6) * math.log((1 / 6) / 0.25)) / 2  # position 1 adds 0
    assert float(_masked_kl(logits, uniform, mask)) == pytest.approx(expected, rel=1e-5)


def test_evaluate_on_a_tiny_model_end_to_end():
    model = tiny_models.llama()
    site = model.model.layers[0].mlp

    def buffer():
        return ActivationBuffer(iter(SENTENCES * 4), model, site, n_ctxs=8, ctx_len=16, refresh_batch_size=8)

    perfect = evaluate(IdentityDict(32), buffer(), batch_size=8, n_batches=2)
    assert perfect["frac_recovered"] == pytest.approx(1.0)
    assert perfect["loss_reconstructed"] == pytest.approx(perfect["loss_original"])
    assert perfect["kl_div"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_div_zero"] > 0
    assert perfect["frac_variance_explained"] == pytest.approx(1.0)

    zero = AutoEncoder(32, 64)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    nothing = evaluate(zero, buffer(), batch_size=8, n_batches=2)
    assert nothing["frac_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert nothing["l0"] == 0 and nothing["frac_alive"] == 0

    partial = AutoEncoder(32, 64)
    some = evaluate(partial, buffer(), batch_size=8)
    assert {"l2_loss", "l1_loss", "cossim", "l2_ratio", "relative_reconstruction_bias"} <= set(some)
    with pytest.raises(ValueError, match="expects width 16 but model.layers.0.mlp has width 32"):
        evaluate(AutoEncoder(16, 32), buffer())


def test_evaluate_on_plain_activation_batches():
    batches = iter([torch.randn(64, 8) for _ in range(3)])
    metrics = evaluate(IdentityDict(8), batches, n_batches=3)
    assert metrics["frac_variance_explained"] == pytest.approx(1.0) and "frac_recovered" not in metrics
    with pytest.raises(StopIteration, match="ran out before n_batches"):
        evaluate(IdentityDict(8), iter([torch.randn(4, 8)]), n_batches=2)


def test_running_metrics_pool_every_token_exactly():
    from dictionary_learning.evaluation import RunningMetrics, frac_variance_explained

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 8, generator=gen) * 3 + 1 for n in (5, 17, 40)]
    x_hats = [x + 0.5 * torch.randn(x.shape, generator=gen) for x in xs]
    fs = [torch.relu(torch.randn(x.shape[0], 12, generator=gen)) for x in xs]
    running = RunningMetrics()
    for x, x_hat, f in zip(xs, x_hats, fs):
        running.add(x, x_hat, f)
    result = running.result()
    all_x, all_hat, all_f = torch.cat(xs), torch.cat(x_hats), torch.cat(fs)
    assert result["frac_variance_explained"] == pytest.approx(float(frac_variance_explained(all_x, all_hat)), rel=1e-5)
    assert result["l0"] == pytest.approx(float((all_f != 0).sum(-1).float().mean()))
    assert result["n_activations"] == 62 and "ce_diff" not in result


def test_loss_intervals_bracket_the_pooled_values_and_vanish_for_a_perfect_splice():
    from dictionary_learning.evaluation import loss_intervals

    gen = torch.Generator().manual_seed(1)
    tokens = torch.full((30,), 10.0, dtype=torch.float64)
    clean = 3.0 * tokens + torch.randn(30, generator=gen, dtype=torch.float64)
    noise = torch.randn(30, generator=gen, dtype=torch.float64)
    rows = {"tokens": tokens, "kl_positions": tokens + 1, "clean": clean, "zero": clean + 6 * tokens,
            "spliced": clean + tokens + noise, "kl": 0.2 * tokens}  # fmt: skip
    out = loss_intervals([rows])
    assert out["n_tokens"] == 300 and out["n_sequences"] == 30
    for name in ("ce_clean", "ce_diff", "frac_recovered"):
        assert out[f"{name}_lo"] <= out[name] <= out[f"{name}_hi"]
    assert out["ce_diff"] == pytest.approx(float((rows["spliced"] - clean).sum() / 300))
    assert out["frac_recovered"] == pytest.approx(5 / 6, abs=0.02)
    perfect = loss_intervals([dict(rows, spliced=clean)])
    assert perfect["ce_diff"] == perfect["ce_diff_lo"] == perfect["ce_diff_hi"] == 0.0
    assert perfect["frac_recovered"] == 1.0


def test_the_one_softmax_losses_equal_the_direct_definitions():
    from dictionary_learning.evaluation import _losses

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    clean, zeroed, spliced = (torch.randn(3, 7, 50, generator=gen) * 3 for _ in range(3))
    losses = _losses({"ids": ids, "mask": mask, "clean": clean, "zeroed": zeroed}, spliced)
    assert losses["loss_original"] == pytest.approx(float(_masked_ce(clean, ids, mask)), rel=1e-5)
    assert losses["loss_reconstructed"] == pytest.approx(float(_masked_ce(spliced, ids, mask)), rel=1e-5)
    assert losses["loss_zero"] == pytest.approx(float(_masked_ce(zeroed, ids, mask)), rel=1e-5)
    assert losses["kl_div"] == pytest.approx(float(_masked_kl(clean, spliced, mask)), rel=1e-5)
    assert losses["kl_div_zero"] == pytest.approx(float(_masked_kl(clean, zeroed, mask)), rel=1e-5)
    rows = losses["rows"]
    assert rows["tokens"].tolist() == [6, 4, 6] and rows["kl_positions"].tolist() == [7, 5, 7]
    assert float(rows["spliced"].sum() / rows["tokens"].sum()) == pytest.approx(losses["loss_reconstructed"], rel=1e-5)
