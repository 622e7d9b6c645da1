"""The reference's names that wrap ours (tests/test_api_surface.py checks that they exist with the
reference's parameters; these check that they do what the reference's do)."""

from __future__ import annotations

import queue

import pytest
import torch
from helpers import LEARN_PENALISED, LEARN_TOPK

from dictionary_learning import AutoEncoder, GatedAutoEncoder, IdentityDict
from dictionary_learning.ops import RectangleFunction, geometric_median
from dictionary_learning.trainers import BatchTopKTrainer, PAnnealTrainer, StandardTrainer, TopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import apply_temperature
from dictionary_learning.training import get_norm_factor, log_stats


def test_topk_reference_methods():
    trainer = TopKTrainer(steps=100, k_anneal_steps=10, **dict(LEARN_TOPK, warmup_steps=5))
    trainer.update_annealed_k(10, trainer.ae.activation_dim, 10)
    assert trainer.ae.active_k == LEARN_TOPK["k"]
    trainer.update_threshold(torch.tensor([[0.5, 0.7], [0.3, 0.9]]))
    assert float(trainer.ae.threshold) == pytest.approx(0.4)  # first estimate: mean of the row minima
    points = torch.randn(20, 4)
    torch.testing.assert_close(TopKTrainer.geometric_median(points), geometric_median(points))
    trainer.num_tokens_since_fired.fill_(10**9)  # every latent dead: AuxK reconstructs the residual
    residual, acts = torch.randn(8, trainer.ae.activation_dim), torch.rand(8, trainer.ae.dict_size)
    assert float(trainer.get_auxiliary_loss(residual, acts).detach()) > 0
    trainer.num_tokens_since_fired.zero_()
    assert float(trainer.get_auxiliary_loss(residual, acts).detach()) == 0


def test_batch_topk_threshold_from_the_whole_code():
    trainer = BatchTopKTrainer(steps=100, **dict(LEARN_TOPK, warmup_steps=5))
    trainer.update_threshold(torch.tensor([[0.0, 0.6], [0.2, 0.0]]))
    assert float(trainer.ae.threshold) == pytest.approx(0.2)  # the smallest positive activation


def test_penalised_resample_neurons_and_lp_norm():
    trainer = StandardTrainer(steps=100, resample_steps=10, **dict(LEARN_PENALISED, warmup_steps=5))
    before = trainer.ae.encoder.weight.detach().clone()
    dead = torch.zeros(trainer.ae.dict_size, dtype=torch.bool)
    dead[:3] = True
    trainer.resample_neurons(dead, torch.randn(16, trainer.ae.activation_dim))
    changed = (trainer.ae.encoder.weight != before).any(-1)
    assert changed[:3].all() and not changed[3:].any() and trainer.resampled_features == 3
    anneal = PAnnealTrainer(steps=100, sparsity_function="Lp^p", **dict(LEARN_PENALISED, warmup_steps=5))
    f = torch.tensor([[1.0, 2.0, 0.0]])
    assert float(anneal.lp_norm(f, 2.0)) == pytest.approx(5.0)


def test_functions_of_the_reference():
    x = torch.tensor([-1.0, -0.2, 0.3, 0.8], requires_grad=True)
    y = RectangleFunction.apply(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 1.0, 1.0, 0.0] and x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert apply_temperature([0.2, 0.8], 1.0) == pytest.approx([0.2, 0.8])
    sharp = apply_temperature([0.2, 0.8], 0.5)
    assert sum(sharp) == pytest.approx(1.0) and sharp[1] > 0.8
    batches = [torch.full((4, 3), 2.0)] * 5 + [torch.full((4, 3), 100.0)]
    assert get_norm_factor(iter(batches), steps=5) == pytest.approx(2.0 * 3**0.5)  # reads 5 batches only


def test_log_stats_feeds_the_reference_queues():
    trainers = [TopKTrainer(steps=100, **dict(LEARN_TOPK, warmup_steps=5)) for _ in range(2)]
    queues = [queue.Queue(), queue.Queue()]
    records = log_stats(trainers, 3, torch.randn(16, LEARN_TOPK["activation_dim"]), False, False, queues)
    assert [q.get_nowait()["l0"] for q in queues] == [r["l0"] for r in records]


def test_reference_argument_orders_of_from_pretrained(tmp_path):
    GatedAutoEncoder(8, 16).save_pretrained(tmp_path / "g")
    loaded = GatedAutoEncoder.from_pretrained(tmp_path / "g", "cpu")  # (path, device) as in the reference
    assert loaded.encoder.weight.device.type == "cpu"
    AutoEncoder(8, 16).save_pretrained(tmp_path / "a")
    assert AutoEncoder.from_pretrained(tmp_path / "a", torch.float64).encoder.weight.dtype == torch.float64
    assert IdentityDict.from_pretrained(8, "unused").activation_dim == 8
    assert IdentityDict.from_pretrained(tmp_path, 8).activation_dim == 8  # a path first: the older order
    with pytest.raises(ValueError, match="ghost_mask must be None"):
        IdentityDict(8)(torch.randn(2, 8), ghost_mask=torch.ones(2, 8))
