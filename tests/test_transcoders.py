"""Transcoders: the TopK family, Standard (both L1 recipes) and JumpReLU encode an input and
reconstruct another output, with an input bias of their own and an optional linear skip path.
Planted data: input = codes @ A, output = codes @ B (+ a linear map of the input for the skip test)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import LEARN_TOPK, LEARNING_CONFIGS, grads, randomized

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.dictionaries import AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder
from dictionary_learning.sparse import SparseCode
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    StandardTrainer,
    StandardTrainerAprilUpdate,
    TopKTrainer,
)

D_IN, D_OUT, N_FEATURES = 32, 24, 48


class PlantedMap:
    """Input `codes @ A` and output `codes @ B (+ input @ M)`: the same sparse codes seen twice."""

    def __init__(self, d_out: int = D_IN, linear: float = 0.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.A = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_IN, generator=gen), dim=1)
        self.B = torch.nn.functional.normalize(torch.randn(N_FEATURES, d_out, generator=gen), dim=1)
        self.M = linear * torch.randn(D_IN, d_out, generator=gen) / D_IN**0.5
        self.seed = seed

    def pairs(self, n: int, batch_size: int = 256, seed: int | None = None):
        gen = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        for _ in range(n):
            codes = (torch.rand(batch_size, N_FEATURES, generator=gen) < 0.06) * (
                0.5 + torch.rand(batch_size, N_FEATURES, generator=gen)
            )
            x_in = codes @ self.A
            yield x_in, codes @ self.B + x_in @ self.M

    def stacked(self, n: int, **kwargs):
        return (torch.stack([x, y], dim=1) for x, y in self.pairs(n, **kwargs))

    def recovered(self, decoder_FD: torch.Tensor, threshold: float = 0.9) -> int:
        W = torch.nn.functional.normalize(decoder_FD.detach().float(), dim=1)
        return int(((self.B @ W.T).max(dim=1).values > threshold).sum())


def fve(y, y_hat):
    return float(1 - (y - y_hat).var(0).sum() / y.var(0).sum())


# The planted-feature configs of tests/test_learning.py with twice the planted count of latents: a
# transcoder's encoder starts with no relation to the input directions (an SAE's starts as its
# decoder's transpose), and TopK with 64 latents found 40-41 of the 48 in 1,000 steps.
TRANSCODER_RECIPES = [TopKTrainer, BatchTopKTrainer, StandardTrainer, StandardTrainerAprilUpdate, JumpReluTrainer]


def transcoder_config(cls) -> dict:
    return dict(LEARNING_CONFIGS[cls.__name__][0], dict_size=96)


@pytest.mark.parametrize("cls", TRANSCODER_RECIPES)
def test_a_transcoder_recovers_the_planted_output_directions(cls):
    data = PlantedMap()
    trainer = cls(steps=1000, transcoder=True, **transcoder_config(cls))
    # the pre-encoder bias is the transcoder's own (JumpReLU has none: b_enc absorbs it)
    assert trainer.ae.transcoder and (hasattr(trainer.ae, "b_in") or cls is JumpReluTrainer)
    for step, batch in enumerate(data.stacked(1000)):
        trainer.update(step, batch)
    assert data.recovered(trainer.ae.decoder_FD()) >= 0.9 * N_FEATURES
    x, y = next(data.pairs(1, 2048, seed=99))
    with torch.no_grad():
        assert fve(y, trainer.ae(x)) > 0.85
    target, *_ = trainer.loss(torch.stack([x, y], 1), step=1000, logging=True)
    assert target.shape == y.shape and torch.equal(target, y)  # logs compare with the output


@pytest.mark.parametrize("cls", [TopKTrainer, StandardTrainer, JumpReluTrainer])
def test_a_transcoder_maps_between_widths_given_as_pairs(cls):
    data = PlantedMap(d_out=D_OUT)
    trainer = cls(steps=1000, transcoder=True, output_dim=D_OUT, **transcoder_config(cls))
    assert trainer.ae.decoder_FD().shape == (96, D_OUT) and trainer.ae.encoder_FD().shape == (96, D_IN)
    for step, pair in enumerate(data.pairs(1000)):
        trainer.update(step, pair)
    assert data.recovered(trainer.ae.decoder_FD()) >= 0.9 * N_FEATURES


@pytest.mark.parametrize("cls", [TopKTrainer, StandardTrainer, JumpReluTrainer])
def test_the_skip_connection_learns_the_linear_part(cls):
    data = PlantedMap(linear=1.0)
    x, y = next(data.pairs(1, 2048, seed=99))
    scores = {}
    config = dict(LEARN_TOPK, k=3) if cls is TopKTrainer else LEARNING_CONFIGS[cls.__name__][0]
    for skip in (False, True):
        trainer = cls(steps=800, transcoder=True, skip_connection=skip, **config)
        for step, batch in enumerate(data.stacked(800)):
            trainer.update(step, batch)
        with torch.no_grad():
            scores[skip] = fve(y, trainer.ae(x))
    # the linear part no longer costs latents: the unexplained variance falls by more than a third
    assert 1 - scores[True] < 0.65 * (1 - scores[False]), scores
    assert trainer.ae.W_skip.abs().sum() > 0


def test_the_sparse_and_dense_paths_give_the_same_gradients():
    batch = next(PlantedMap(linear=0.5).stacked(1, batch_size=64))
    common = dict(steps=100, activation_dim=D_IN, dict_size=96, k=6, seed=3, device="cpu", warmup_steps=0)
    sparse = TopKTrainer(**common, transcoder=True, skip_connection=True, sparse=True)
    dense = TopKTrainer(**common, transcoder=True, skip_connection=True, sparse=False)
    dense.ae.load_state_dict(sparse.ae.state_dict())
    (out_s, g_s), (out_d, g_d) = grads(sparse, batch), grads(dense, batch)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-6, atol=1e-7)
    assert set(g_s) == set(g_d) >= {"b_in", "W_skip"}
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-5, atol=1e-6, msg=name)


def test_standard_sparse_and_dense_paths_give_the_same_transcoder_gradients():
    batch = next(PlantedMap(linear=0.5).stacked(1, batch_size=64))
    common = dict(steps=100, activation_dim=D_IN, dict_size=96, seed=3, device="cpu", warmup_steps=0,
                  sparsity_warmup_steps=0)  # fmt: skip
    sparse = StandardTrainer(**common, transcoder=True, skip_connection=True, sparse=True)
    dense = StandardTrainer(**common, transcoder=True, skip_connection=True, sparse=False)
    with torch.no_grad():
        sparse.ae.encoder.bias.fill_(-0.3)  # few latents fire: the sparse path is taken
    dense.ae.load_state_dict(sparse.ae.state_dict())
    (out_s, g_s), (out_d, g_d) = grads(sparse, batch), grads(dense, batch)
    assert isinstance(out_s.f, SparseCode) and isinstance(out_d.f, torch.Tensor)  # both paths ran
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-6, atol=1e-6)
    assert set(g_s) == set(g_d) >= {"b_in", "W_skip"}
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-5, atol=1e-6, msg=name)


TRANSCODER_CLASSES = {
    AutoEncoderTopK: lambda: AutoEncoderTopK(D_IN, 64, 4, D_OUT, True, True),
    BatchTopKSAE: lambda: BatchTopKSAE(D_IN, 64, 4, D_OUT, True, True),
    AutoEncoder: lambda: AutoEncoder(D_IN, 64, D_OUT, True, True),
    JumpReluAutoEncoder: lambda: JumpReluAutoEncoder(D_IN, 64, "cpu", D_OUT, True, True),
}


@pytest.mark.parametrize("cls", list(TRANSCODER_CLASSES))
@pytest.mark.parametrize("safetensors", [False, True])
def test_transcoder_files_round_trip(tmp_path, cls, safetensors):
    ae = TRANSCODER_CLASSES[cls]()
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_()
    if cls is AutoEncoder:
        ae.normalize_decoder()  # what loading does (function preserved), so the weights compare equal
    ae.save_pretrained(tmp_path / "t", safetensors=safetensors)
    loaded, config = load_dictionary(tmp_path / "t")
    assert type(loaded) is cls and loaded.transcoder and loaded.skip_connection and loaded.output_dim == D_OUT
    for key, value in ae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(loaded(x), ae(x))
    assert config["trainer"]["transcoder"] and config["trainer"]["output_dim"] == D_OUT


def test_trainsae_trains_transcoders_saves_and_resumes_exactly(tmp_path):
    data = PlantedMap(linear=0.5)
    configs = [
        dict(trainer=TopKTrainer, **dict(LEARN_TOPK, warmup_steps=5, threshold_start_step=5)),
        dict(
            trainer=BatchTopKTrainer, skip_connection=True, **dict(LEARN_TOPK, warmup_steps=5, threshold_start_step=5)
        ),
    ]
    full = trainSAE(data.stacked(40), configs, 40, save_dir=tmp_path / "full", transcoder=True, progress=False,
                    normalize_activations=True)  # fmt: skip
    config = json.loads((tmp_path / "full" / "trainer_1" / "config.json").read_text())
    assert config["trainer"]["transcoder"] and config["trainer"]["skip_connection"]
    loaded, _ = load_dictionary(tmp_path / "full" / "trainer_1")
    x, _ = next(data.pairs(1, 16, seed=5))
    torch.testing.assert_close(loaded(x), full[1](x))  # the normalisation is folded into the saved file
    trainSAE(data.stacked(20), configs, 40, save_dir=tmp_path / "half", transcoder=True, progress=False,
             normalize_activations=True, backup_steps=10)  # fmt: skip
    resumed = trainSAE(data.stacked(40), None, 40, resume_from=tmp_path / "half", progress=False)
    for a, b in zip(full, resumed):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_transcoder_errors_are_named():
    with pytest.raises(ValueError, match="skip_connection and output_dim are transcoder options"):
        TopKTrainer(steps=10, skip_connection=True, **dict(LEARN_TOPK, warmup_steps=1, threshold_start_step=1))
    trainer = TopKTrainer(steps=10, transcoder=True, **dict(LEARN_TOPK, warmup_steps=1, threshold_start_step=1))
    with pytest.raises(ValueError, match=r"takes \[B, 2, 32\] \(input, output\) rows .* \[8, 32\]: .*io='in_and_out'"):
        trainer.update(0, torch.randn(8, D_IN))
    with pytest.raises(ValueError, match="MatryoshkaBatchTopKTrainer does not train transcoders: use TopKTrainer"):
        MatryoshkaBatchTopKTrainer(
            steps=10, transcoder=True, **dict(LEARN_TOPK, warmup_steps=1, threshold_start_step=1)
        )
    with pytest.raises(ValueError, match="GatedSAETrainer does not train transcoders: use TopKTrainer"):
        trainSAE(PlantedMap().stacked(2), [dict(trainer="GatedSAETrainer", activation_dim=D_IN, dict_size=64)], 2,
                 transcoder=True, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="AutoEncoderNew cannot be a transcoder"):
        StandardTrainerAprilUpdate(steps=10, activation_dim=D_IN, dict_size=64, dict_class="AutoEncoderNew",
                                   transcoder=True)  # fmt: skip
    assert GatedSAETrainer.Config.__dataclass_fields__["dict_class"].default.__name__ == "GatedAutoEncoder"


def test_an_mlp_transcoder_from_the_buffer_of_a_tiny_model(tmp_path):
    import tiny_models

    from dictionary_learning.buffer import ActivationBuffer

    model = tiny_models.llama()
    texts = [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]
    buffer = ActivationBuffer(texts, model, model.model.layers[1].mlp, io="in_and_out", n_ctxs=64, ctx_len=16,
                              out_batch_size=32, loop=True)  # fmt: skip
    config = dict(trainer=TopKTrainer, activation_dim=32, dict_size=64, k=4, warmup_steps=2, threshold_start_step=2,
                  skip_connection=True, seed=0)  # fmt: skip
    (ae,) = trainSAE(buffer, [config], 30, transcoder=True, save_dir=tmp_path / "run", progress=False,
                     normalize_activations=True, log_steps=5)  # fmt: skip
    pairs = next(buffer)
    assert pairs.shape == (32, 2, 32)
    loaded, config = load_dictionary(tmp_path / "run" / "trainer_0")
    torch.testing.assert_close(loaded(pairs[:, 0]), ae(pairs[:, 0]))
    assert config["site"]["module"] == "model.layers.1.mlp" and config["site"]["io"] == "in_to_out"
    assert config["trainer"]["transcoder"] and config["steps_trained"] == 30


def test_evaluate_splices_a_transcoder_in_place_of_the_mlp_output():
    import tiny_models

    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.evaluation import _masked_ce, evaluate, loss_recovered_metrics
    from dictionary_learning.splice import run_model

    model = tiny_models.llama()
    texts = [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]
    mlp = "model.layers.1.mlp"
    buffer = ActivationBuffer(texts, model, mlp, io="in_and_out", n_ctxs=64, ctx_len=16, loop=True)
    ae = AutoEncoderTopK(32, 64, 8, transcoder=True, skip_connection=True)
    with torch.no_grad():
        ae.W_skip.normal_(0, 0.1)
    tokens = buffer.tokenize(texts[:4])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    losses, y, y_hat, f = loss_recovered_metrics(ae, buffer, tokens)
    # the spliced run is the model whose MLP output is the transcoder of the MLP's input
    with torch.no_grad():
        by_hand, _ = run_model(model, ids, mask, transcode={mlp: lambda h: ae(h.float())})
        clean, outputs = run_model(model, ids, mask, read=[(mlp, "in"), (mlp, "out")])
    assert losses["loss_reconstructed"] == pytest.approx(float(_masked_ce(by_hand, ids, mask)), rel=1e-5)
    assert losses["loss_original"] == pytest.approx(float(_masked_ce(clean, ids, mask)), rel=1e-5)
    # and the reconstruction metrics compare with the MLP's output, not its input
    torch.testing.assert_close(y, outputs[(mlp, "out")][mask.bool()])
    with torch.no_grad():
        torch.testing.assert_close(y_hat, ae(outputs[(mlp, "in")][mask.bool()]))
    result = evaluate(ae, buffer, max_len=16, batch_size=4, progress=False)
    assert result["n_tokens"] > 0 and result["loss_reconstructed"] != result["loss_original"]
    x_in, out = next(buffer).unbind(1)
    with torch.no_grad():
        fve_out = float(1 - (out - ae(x_in)).var(0).sum() / out.var(0).sum())
    pairs = iter([torch.stack([x_in, out], 1)])
    assert evaluate(ae, pairs, progress=False)["frac_variance_explained"] == pytest.approx(fve_out, abs=1e-5)


def _random_transcoder(make, skip: bool):
    torch.manual_seed(0)
    return randomized(make(skip))


SAELENS_TRANSCODERS = {
    "AutoEncoder": (lambda skip: AutoEncoder(D_IN, 64, D_OUT, True, skip), AutoEncoder, "transcoder"),
    "JumpReluAutoEncoder": (
        lambda skip: JumpReluAutoEncoder(D_IN, 64, "cpu", D_OUT, True, skip),
        JumpReluAutoEncoder,
        "jumprelu_transcoder",
    ),
    "BatchTopKSAE": (
        lambda skip: BatchTopKSAE(D_IN, 64, 4, D_OUT, True, skip),
        JumpReluAutoEncoder,
        "jumprelu_transcoder",
    ),
}


@pytest.mark.parametrize("name", list(SAELENS_TRANSCODERS))
@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_export_to_saelens_and_back(tmp_path, name, skip):
    from dictionary_learning.interop import load_saelens, save_saelens

    make, back_class, arch = SAELENS_TRANSCODERS[name]
    ae = _random_transcoder(make, skip)
    save_saelens(ae, tmp_path / "sl", metadata={"hook_name": "blocks.1.hook_mlp_in"})
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == (arch.replace("transcoder", "skip_transcoder") if skip else arch)
    assert cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    back, _ = load_saelens(tmp_path / "sl")
    assert type(back) is back_class and back.transcoder and back.skip_connection == skip
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.encode(x), ae.encode(x), rtol=1e-5, atol=1e-5)


def test_a_topk_transcoder_has_no_saelens_equivalent(tmp_path):
    from dictionary_learning.interop import save_saelens

    with pytest.raises(ValueError, match="SAELens has no 'topk' transcoder"):
        save_saelens(AutoEncoderTopK(D_IN, 64, 4, D_OUT, True), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DL_SAELENS_PYTHON"), reason="set DL_SAELENS_PYTHON to a venv with sae-lens")
def test_real_sae_lens_loads_our_transcoders(tmp_path):
    import subprocess

    from safetensors.torch import save_file

    from dictionary_learning.interop import save_saelens

    x, expected = torch.randn(16, D_IN), {}
    for name, (make, _, _) in SAELENS_TRANSCODERS.items():
        for skip in (False, True):
            ae = _random_transcoder(make, skip)
            folder = tmp_path / f"{name}_{skip}"
            save_saelens(ae, folder)
            save_file({"x": x}, str(folder / "input.safetensors"))
            with torch.no_grad():
                expected[str(folder)] = ae(x)
    script = tmp_path / "check.py"
    script.write_text(
        "import json, sys, torch\nfrom safetensors.torch import load_file\nfrom sae_lens import SAE\nout = {}\n"
        "for folder in sys.argv[1:]:\n    x = load_file(folder + '/input.safetensors')['x']\n"
        "    with torch.no_grad():\n        sae = SAE.load_from_disk(folder)\n"
        "        out[folder] = [type(sae).__name__, sae(x).tolist()]\nprint(json.dumps(out))\n"
    )
    run = subprocess.run([os.environ["DL_SAELENS_PYTHON"], str(script), *expected], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for folder, want in expected.items():
        assert "Transcoder" in got[folder][0], got[folder][0]
        torch.testing.assert_close(torch.tensor(got[folder][1]), want, rtol=1e-5, atol=1e-5, msg=folder)


def test_trainsae_takes_input_output_pairs_of_different_widths(tmp_path):
    data = PlantedMap(d_out=D_OUT)
    config = dict(transcoder_config(TopKTrainer), trainer=TopKTrainer, output_dim=D_OUT, warmup_steps=5,
                  threshold_start_step=5, skip_connection=True)  # fmt: skip
    full = trainSAE(data.pairs(30), [config], 30, transcoder=True, save_dir=tmp_path / "full", progress=False,
                    normalize_activations=True, log_steps=5)  # fmt: skip
    loaded, _ = load_dictionary(tmp_path / "full" / "trainer_0")
    x, _ = next(data.pairs(1, 16, seed=5))
    torch.testing.assert_close(loaded(x), full[0](x))
    assert loaded(x).shape == (16, D_OUT)
    trainSAE(data.pairs(15), [config], 30, transcoder=True, save_dir=tmp_path / "half", progress=False,
             normalize_activations=True, backup_steps=5)  # fmt: skip
    (resumed,) = trainSAE(data.pairs(30), None, 30, resume_from=tmp_path / "half", progress=False)
    for key, value in full[0].state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(
        ValueError, match=r"trainer 0: .* widths \(32, 24\) must be .*activation_dim=32 and output_dim=32"
    ):
        trainSAE(data.pairs(20), [dict(config, output_dim=None)], 20, transcoder=True, progress=False)
    with pytest.raises(ValueError, match=r"an \(input, output\) pair is a transcoder's batch: pass transcoder=True"):
        trainSAE(data.pairs(60), [dict(trainer=TopKTrainer, **dict(LEARN_TOPK, threshold_start_step=5))], 60,
                 progress=False)  # fmt: skip
