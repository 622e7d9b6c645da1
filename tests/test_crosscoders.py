"""Crosscoders: one sparse code for L stacked sites `[B, L, D]`. Planted data: site l = codes @ W_l,
with latents that write only to site 0 (a "base model" latent), only to site 1 (a "fine-tuned"
latent) or to both; the relative decoder norm must tell them apart."""

from __future__ import annotations

import pytest
import torch
from helpers import grads

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.dictionaries import AutoEncoderNew, BatchTopKCrossCoder, CrossCoder, relative_decoder_norms
from dictionary_learning.sparse import SparseCode
from dictionary_learning.trainers import BatchTopKCrossCoderTrainer, CrossCoderTrainer

N, D, L = 48, 32, 2
ONLY_0, ONLY_1, SHARED = slice(0, 16), slice(16, 32), slice(32, 48)
COMMON = dict(activation_dim=D, dict_size=96, num_layers=L, warmup_steps=20, seed=0, device="cpu")
RECIPES = {
    CrossCoderTrainer: dict(COMMON, lr=3e-3, l1_penalty=0.3, sparsity_warmup_steps=50),
    BatchTopKCrossCoderTrainer: dict(COMMON, k=4, threshold_start_step=50),
}


class PlantedSites:
    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        W = torch.nn.functional.normalize(torch.randn(L, N, D, generator=gen), dim=-1)
        W[1, ONLY_0] = 0
        W[0, ONLY_1] = 0
        self.W_LND = W

    def batches(self, n: int, batch_size: int = 256, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            codes = (torch.rand(batch_size, N, generator=gen) < 0.06) * (0.5 + torch.rand(batch_size, N, generator=gen))
            yield torch.einsum("bn,lnd->bld", codes, self.W_LND)

    def best_latents(self, ae) -> tuple[torch.Tensor, torch.Tensor]:
        """Per planted latent: the cosine of the closest learned latent (over all sites) and its index."""
        learned = torch.nn.functional.normalize(ae.decoder_FD().detach(), dim=-1)
        planted = torch.nn.functional.normalize(self.W_LND.transpose(0, 1).reshape(N, -1), dim=-1)
        return (planted @ learned.T).max(dim=1)


@pytest.mark.parametrize("cls", list(RECIPES))
def test_a_crosscoder_recovers_planted_latents_and_tells_the_sites_apart(cls):
    data = PlantedSites()
    trainer = cls(steps=1000, **RECIPES[cls])
    for step, batch in enumerate(data.batches(1000)):
        trainer.update(step, batch)
    cosine, index = data.best_latents(trainer.ae)
    assert int((cosine > 0.9).sum()) >= 0.9 * N, cosine
    relative = relative_decoder_norms(trainer.ae)[index]
    assert relative[ONLY_0].max() < 0.1 and relative[ONLY_1].min() > 0.85  # which model a latent belongs to
    assert ((relative[SHARED] - 0.5).abs() < 0.15).float().mean() > 0.9
    x = next(data.batches(1, 2048, seed=9))
    with torch.no_grad():
        x_hat, f = trainer.ae(x, output_features=True)
    assert x_hat.shape == x.shape and f.shape == (2048, 96)
    assert 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum() > 0.95
    target, _, _, losses = trainer.loss(x, step=1000, logging=True)
    assert target.shape == (2048, L * D) and losses["loss"] > 0


@pytest.mark.parametrize("cls", list(RECIPES))
def test_crosscoder_sparse_and_dense_paths_give_the_same_gradients(cls):
    batch = next(PlantedSites().batches(1, batch_size=64))
    config = dict(RECIPES[cls], steps=100, warmup_steps=0)
    config |= {"sparsity_warmup_steps": 0} if cls is CrossCoderTrainer else {}
    sparse, dense = cls(**config, sparse=True), cls(**config, sparse=False)
    if cls is CrossCoderTrainer:
        with torch.no_grad():
            sparse.ae.encoder.bias.fill_(-0.5)  # few latents fire: the sparse path is taken
    dense.ae.load_state_dict(sparse.ae.state_dict())
    (out_s, g_s), (out_d, g_d) = grads(sparse, batch), grads(dense, batch)
    assert isinstance(out_s.f, SparseCode) and isinstance(out_d.f, torch.Tensor)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("make", [lambda: CrossCoder(D, 64, 3), lambda: BatchTopKCrossCoder(D, 64, 3, 5)])
@pytest.mark.parametrize("safetensors", [False, True])
def test_crosscoder_files_round_trip_and_are_not_mistaken_for_saes(tmp_path, make, safetensors):
    ae = make()
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_()
        if isinstance(ae, BatchTopKCrossCoder):
            ae.threshold.fill_(0.7)
    ae.save_pretrained(tmp_path / "c", safetensors=safetensors)
    loaded, config = load_dictionary(tmp_path / "c")
    assert type(loaded) is type(ae) and loaded.num_layers == 3 and config["trainer"]["num_layers"] == 3
    x = torch.randn(7, 3, D)
    torch.testing.assert_close(loaded(x), ae(x))
    torch.testing.assert_close(loaded(x.flatten(1)), ae(x).flatten(1))  # flat rows in, flat rows out
    (tmp_path / "c" / "config.json").unlink()  # the class is then read from the keys and shapes
    assert type(load_dictionary(tmp_path / "c")[0]) is type(ae)
    sae = AutoEncoderNew(D, 64)  # the same keys as a CrossCoder, 2-D weights
    sae.save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "config.json").unlink()
    assert type(load_dictionary(tmp_path / "s")[0]) is AutoEncoderNew


def test_trainsae_trains_crosscoders_and_resumes_exactly(tmp_path):
    data = PlantedSites()
    configs = [
        dict(trainer=CrossCoderTrainer, **dict(RECIPES[CrossCoderTrainer], warmup_steps=5, sparsity_warmup_steps=5)),
        dict(trainer=BatchTopKCrossCoderTrainer, **dict(RECIPES[BatchTopKCrossCoderTrainer], warmup_steps=5,
                                                         threshold_start_step=5)),
    ]  # fmt: skip
    full = trainSAE(data.batches(40), configs, 40, save_dir=tmp_path / "full", progress=False,
                    normalize_activations=True)  # fmt: skip
    loaded, config = load_dictionary(tmp_path / "full" / "trainer_1")
    x = next(data.batches(1, 16, seed=5))
    torch.testing.assert_close(loaded(x), full[1](x))  # the normalisation is folded into the saved file
    assert config["trainer"]["num_layers"] == L and float(loaded.threshold) > 0
    trainSAE(data.batches(20), configs, 40, save_dir=tmp_path / "half", progress=False, normalize_activations=True,
             backup_steps=10)  # fmt: skip
    resumed = trainSAE(data.batches(40), None, 40, resume_from=tmp_path / "half", progress=False)
    for a, b in zip(full, resumed):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_one_site_crosscoders_keep_the_input_shape():
    ae = CrossCoder(D, 64, 1)
    for shape in [(1, D), (5, D), (5, 1, D), (1, 1, D)]:
        x = torch.randn(shape)
        assert ae(x).shape == shape and ae.encode(x).shape == (*shape[: -1 if len(shape) == 2 else -2], 64)
    two = CrossCoder(D, 64, 2)
    assert two(torch.randn(2, D)).shape == (2, D) and two(torch.randn(3, 2 * D)).shape == (3, 2 * D)


def test_crosscoder_errors_are_named():
    trainer = CrossCoderTrainer(steps=10, **dict(RECIPES[CrossCoderTrainer], warmup_steps=1, sparsity_warmup_steps=1))
    with pytest.raises(
        ValueError,
        match=r"takes \[B, 2, 32\] stacked sites \(or flat \[B, 64\] rows\), .* yields \[8, 32\]: .*stack_sites=True",
    ):
        trainer.update(0, torch.randn(8, D))
    with pytest.raises(ValueError, match="reads \\[batch, num_layers=2, activation_dim=32\\] activations"):
        trainer.ae.encode(torch.randn(8, 3, D))
    with pytest.raises(ValueError, match="transcoder=True does not apply"):
        BatchTopKCrossCoderTrainer(steps=10, transcoder=True, **RECIPES[BatchTopKCrossCoderTrainer])
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        CrossCoder(D, 64, 0)


# ------------------------------------------------------------------- real activations of tiny models
def _texts():
    import tiny_models

    return [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]


def test_two_layers_of_one_model_train_a_crosscoder(tmp_path):
    import tiny_models

    from dictionary_learning import ActivationBuffer

    model = tiny_models.llama()
    layers = [model.model.layers[0], model.model.layers[1]]
    buffer = ActivationBuffer(_texts(), model, layers, n_ctxs=64, ctx_len=16, out_batch_size=32, loop=True,
                              stack_sites=True)  # fmt: skip
    batch = next(buffer)
    assert batch.shape == (32, 2, 32)
    config = dict(trainer=BatchTopKCrossCoderTrainer, activation_dim=32, dict_size=64, num_layers=2, k=4,
                  warmup_steps=2, threshold_start_step=2, seed=0)  # fmt: skip
    trainSAE(buffer, [config], 20, save_dir=tmp_path / "run", progress=False)
    _, saved = load_dictionary(tmp_path / "run" / "trainer_0")
    assert saved["site"]["module"] == ["model.layers.0", "model.layers.1"] and saved["site"]["layer"] == [0, 1]
    with pytest.raises(ValueError, match="stack_sites=True stacks several sites of one width"):
        ActivationBuffer(_texts(), model, layers[0], n_ctxs=64, ctx_len=16, stack_sites=True)


def test_the_paired_buffer_reads_two_models_on_the_same_tokens(tmp_path):
    import tiny_models

    from dictionary_learning import PairedActivationBuffer
    from dictionary_learning.buffer import ActivationReader

    base, tuned = tiny_models.llama(seed=0), tiny_models.llama(seed=1)
    buffer = PairedActivationBuffer(_texts(), base, tuned, "model.layers.1", n_ctxs=64, ctx_len=16,
                                    out_batch_size=32, loop=True, remove_bos=True)  # fmt: skip
    tokens = buffer.tokenize(_texts()[:3])
    (pairs,) = buffer.read(tokens)
    alone = [
        ActivationReader([], m, "model.layers.1", ctx_len=16, remove_bos=True).read(tokens)[0] for m in (base, tuned)
    ]
    torch.testing.assert_close(pairs[:, 0], alone[0])
    torch.testing.assert_close(pairs[:, 1], alone[1])
    assert not torch.allclose(pairs[:, 0], pairs[:, 1])  # different weights, different activations
    assert next(buffer).shape == (32, 2, 32)
    config = dict(trainer=CrossCoderTrainer, activation_dim=32, dict_size=64, num_layers=2, warmup_steps=2,
                  sparsity_warmup_steps=2, seed=0)  # fmt: skip
    (ae,) = trainSAE(buffer, [config], 20, save_dir=tmp_path / "diff", progress=False)
    assert relative_decoder_norms(ae).shape == (64,)
    _, saved = load_dictionary(tmp_path / "diff" / "trainer_0")
    assert saved["buffer"]["paired_model"] and saved["site"]["module"] == ["model.layers.1", "model.layers.1"]
    with pytest.raises(ValueError, match="PairedActivationBuffer reads one site of each model"):
        PairedActivationBuffer(_texts(), base, tuned, ["model.layers.0", "model.layers.1"], ctx_len=16)


def test_evaluate_reports_each_site_of_a_crosscoder():
    from dictionary_learning.evaluation import evaluate, frac_variance_explained

    ae = CrossCoder(D, 64, 2)
    x = next(PlantedSites().batches(1, 512))
    result = evaluate(ae, iter([x]), progress=False)
    with torch.no_grad():
        x_hat = ae(x)
    for site in range(2):
        expected = float(frac_variance_explained(x[:, site], x_hat[:, site]))
        assert result[f"frac_variance_explained_site_{site}"] == pytest.approx(expected, abs=1e-5)
    assert result["frac_variance_explained"] == pytest.approx(
        float(frac_variance_explained(x.flatten(1), x_hat.flatten(1))), abs=1e-5
    )


def test_evaluate_splices_a_crosscoder_at_each_site_of_each_model():
    import tiny_models

    from dictionary_learning import ActivationBuffer, PairedActivationBuffer
    from dictionary_learning.evaluation import _masked_ce, crosscoder_loss_metrics, evaluate
    from dictionary_learning.splice import run_model

    base, tuned = tiny_models.llama(seed=0), tiny_models.llama(seed=1)
    paired = PairedActivationBuffer(_texts(), base, tuned, "model.layers.0", n_ctxs=64, ctx_len=16, loop=True)
    ae = CrossCoder(32, 64, 2)
    tokens = paired.tokenize(_texts()[:4])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    losses, x, x_hat, f = crosscoder_loss_metrics(ae, paired, tokens)
    assert x.shape[1:] == (2, 32) and f.shape[1] == 64
    # site 1 lives in the second model: its spliced run replaces that model's layer 0 output
    _, acts = run_model(base, ids, mask, read=["model.layers.0"])
    _, acts_tuned = run_model(tuned, ids, mask, read=["model.layers.0"])
    with torch.no_grad():
        stacked_hat = ae(torch.stack([acts["model.layers.0"], acts_tuned["model.layers.0"]], dim=2))
        logits, _ = run_model(tuned, ids, mask, replace={"model.layers.0": lambda h: stacked_hat[..., 1, :]})
    assert losses["loss_reconstructed_site_1"] == pytest.approx(float(_masked_ce(logits, ids, mask)), rel=1e-5)
    result = evaluate(ae, paired, max_len=16, batch_size=4, progress=False)
    for site in (0, 1):
        for key in ("loss_original", "loss_reconstructed", "loss_zero", "frac_recovered", "frac_variance_explained"):
            assert f"{key}_site_{site}" in result
    stacked = ActivationBuffer(_texts(), base, ["model.layers.0", "model.layers.1"], n_ctxs=64, ctx_len=16,
                               loop=True, stack_sites=True)  # fmt: skip
    result = evaluate(ae, stacked, max_len=16, batch_size=4, progress=False)
    assert result["loss_original_site_0"] == pytest.approx(result["loss_original_site_1"])  # one model


def test_caches_serve_transcoder_pairs_and_stacked_sites(tmp_path):
    import tiny_models

    from dictionary_learning.cache import ActivationCache, CacheError

    model = tiny_models.llama()
    ActivationCache.build(tmp_path / "mlp", model, "model.layers.1.mlp", _texts(), 200, io="in_and_out", ctx_len=16,
                          progress=False)  # fmt: skip
    assert next(iter(ActivationCache(tmp_path / "mlp", batch_size=32))).shape == (32, 2, 32)
    ActivationCache.build(tmp_path / "two", model, ["model.layers.0", "model.layers.1"], _texts(), 200, ctx_len=16,
                          progress=False)  # fmt: skip
    stacked = ActivationCache(tmp_path / "two", batch_size=32, stack_sites=True, loop=True)
    assert next(iter(stacked)).shape == (32, 2, 32)
    config = dict(trainer=BatchTopKCrossCoderTrainer, activation_dim=32, dict_size=64, num_layers=2, k=4,
                  warmup_steps=2, threshold_start_step=2, seed=0)  # fmt: skip
    trainSAE(stacked, [config], 10, save_dir=tmp_path / "run", progress=False)
    assert load_dictionary(tmp_path / "run" / "trainer_0")[1]["site"]["layer"] == [0, 1]
    with pytest.raises(CacheError, match="stack_sites=True stacks several sites"):
        ActivationCache(tmp_path / "mlp", stack_sites=True)
