"""The same behaviour on a GPU: trainers, trainSAE, resume and loading on CUDA (skipped without one)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import CONFIGS, LEARNING_CONFIGS, STEPS, batches

from dictionary_learning import TRAINER_REGISTRY, load_dictionary, trainSAE
from dictionary_learning.synthetic import PlantedFeatures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_GPU = [dict(c, device="cuda") for c in CONFIGS]
# the Triton kernels of the sparse backward (sparse.USE_TRITON), where triton is installed
TRITON = pytest.param(True, marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton"))


@pytest.mark.parametrize("name", sorted(LEARNING_CONFIGS))
def test_trainer_learns_on_cuda_from_cpu_batches(name):
    config, steps = LEARNING_CONFIGS[name]
    trainer = TRAINER_REGISTRY[name](steps=steps, **dict(config, device=None))  # None picks the GPU
    assert trainer.device.type == "cuda"
    for value in vars(trainer).values():  # counters live with the dictionary (reference bug 9)
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cuda"
    data = PlantedFeatures(d=32)
    for step, x in enumerate(data.batches(steps)):
        trainer.update(step, x)
    assert data.recovered(trainer.ae.decoder_FD()) >= 38


def test_trainsae_on_cuda_saves_cpu_files_that_load_anywhere(tmp_path):
    dicts = trainSAE(
        batches(),
        ON_GPU,
        STEPS,
        save_dir=tmp_path,
        normalize_activations=True,
        autocast_dtype=torch.bfloat16,
        progress=False,
    )
    x = next(batches(1))
    for i, ae in enumerate(dicts):
        assert next(ae.parameters()).device.type == "cuda"
        saved = torch.load(tmp_path / f"trainer_{i}" / "ae.pt", weights_only=True)
        assert all(t.device.type == "cpu" for t in saved.values())
        cpu_copy, _ = load_dictionary(tmp_path / f"trainer_{i}")
        gpu_copy, _ = load_dictionary(tmp_path / f"trainer_{i}", device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(cpu_copy(x), ae(x.cuda()).cpu(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gpu_copy(x.cuda()), ae(x.cuda()))


def test_resume_on_cuda(tmp_path):
    full = trainSAE(batches(), ON_GPU, STEPS, progress=False)

    def crashing():
        for i, x in enumerate(batches()):
            if i == 43:
                raise RuntimeError("simulated crash")
            yield x

    with pytest.raises(RuntimeError):
        trainSAE(crashing(), ON_GPU, STEPS, save_dir=tmp_path, backup_steps=20, progress=False)
    resumed = trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False)
    for a, b in zip(full, resumed):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_buffer_cache_and_evaluate_with_the_model_on_cuda(tmp_path):
    import tiny_models
    from helpers import canonical, hook_rows
    from tiny_models import SENTENCES

    from dictionary_learning import AutoEncoder, IdentityDict
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.cache import ActivationCache
    from dictionary_learning.evaluation import evaluate

    model = tiny_models.llama()
    model._module.cuda()
    site = model.model.layers[1].mlp
    texts = SENTENCES[:12]
    on_cpu = torch.cat(
        list(
            ActivationBuffer(
                iter(texts), model, site, n_ctxs=64, ctx_len=32, refresh_batch_size=5, out_batch_size=7, device="cpu"
            )
        )
    )
    on_gpu = torch.cat(
        list(
            ActivationBuffer(
                iter(texts), model, site, n_ctxs=64, ctx_len=32, refresh_batch_size=5, out_batch_size=7, device="cuda"
            )
        )
    )
    assert on_cpu.device.type == "cpu" and on_gpu.device.type == "cuda"
    cache = ActivationCache.build(tmp_path / "c", model, site, iter(texts), 10_000, ctx_len=32, progress=False)
    cached = torch.cat(list(ActivationCache(tmp_path / "c", batch_size=50, device="cuda")))
    buffer = ActivationBuffer(iter(texts * 4), model, site, n_ctxs=8, ctx_len=32, refresh_batch_size=8)
    perfect = evaluate(IdentityDict(32), buffer, batch_size=8, device="cuda")
    some = evaluate(AutoEncoder(32, 64), buffer, batch_size=8, device="cuda")
    model._module.cpu()
    expected = hook_rows(model, site._module, texts)
    for rows in (on_cpu, on_gpu.cpu(), cached.cpu()):
        torch.testing.assert_close(canonical(rows), canonical(expected), rtol=1e-4, atol=1e-4)
    assert cache.n_tokens == expected.shape[0]
    assert perfect["frac_recovered"] == pytest.approx(1.0, abs=1e-4) and some["loss_reconstructed"] > 0


@pytest.mark.parametrize("name", sorted(LEARNING_CONFIGS))
@pytest.mark.parametrize("triton", [False, TRITON], ids=["pytorch", "triton"])
def test_training_step_never_waits_for_the_gpu(monkeypatch, name, triton):
    """No host synchronisation in `update` after the first step (no .item(), no data-dependent shapes),
    with the PyTorch and with the Triton kernels of the sparse backward."""
    from dictionary_learning import sparse as engine

    monkeypatch.setattr(engine, "USE_TRITON", triton)
    config, steps = LEARNING_CONFIGS[name]
    trainer = TRAINER_REGISTRY[name](steps=steps, **dict(config, device="cuda"))
    batches_ = [x.cuda() for x in PlantedFeatures(d=32).batches(4)]
    trainer.update(0, batches_[0])  # step 0 may initialise from data (geometric median of b_dec)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2, 3):
            trainer.update(step, batches_[step])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("triton", [False, TRITON], ids=["pytorch", "triton"])
def test_sparse_topk_path_matches_dense_on_cuda(monkeypatch, triton):
    from helpers import SPARSE_TRAINERS as TRAINERS
    from helpers import grads as _grads
    from helpers import sparse_dense_pair as _pair

    from dictionary_learning import sparse as engine

    monkeypatch.setattr(engine, "USE_TRITON", triton)
    for cls, kwargs in TRAINERS:
        sparse, dense = _pair(cls, **kwargs, device="cuda")
        x = torch.randn(64, 24, device="cuda")
        out_s, g_s = _grads(sparse, x)
        out_d, g_d = _grads(dense, x)
        torch.testing.assert_close(out_s.x_hat, out_d.x_hat)
        for key in g_d:
            torch.testing.assert_close(g_s[key], g_d[key], rtol=1e-4, atol=1e-5)
