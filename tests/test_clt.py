"""Cross-layer transcoders: planted cross-layer latents are recovered by every recipe, the sparse
decoder equals the dense one (values and gradients), files round-trip, trainSAE trains one from a
tiny model's buffer and resumes it exactly, `train --clt` and `--layer all` work from the command
line, and bad input is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import CLT_CONFIGS, tiny_cli_folder

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.cli import main
from dictionary_learning.dictionaries import (
    BatchTopKCrossLayerTranscoder,
    JumpReluCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from dictionary_learning.files import CheckpointError
from dictionary_learning.trainers import BatchTopKCLTTrainer, JumpReluCLTTrainer, TopKCLTTrainer

L, D, PER_LAYER = 4, 32, 12  # 48 planted latents, 12 per source layer


class PlantedCLT:
    """MLP inputs `x_s = codes_s @ A_s` and outputs `y_l = sum_(s <= l) codes_s @ W_s[:, l - s]`:
    latent (s, j) reads direction A[s, j] at layer s and writes to layers s..L-1."""

    def __init__(self, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.A = F.normalize(torch.randn(L, PER_LAYER, D, generator=gen), dim=-1)
        self.W = [torch.randn(PER_LAYER, L - s, D, generator=gen) / D**0.5 for s in range(L)]
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch(self, n: int = 512) -> torch.Tensor:
        codes = (torch.rand(n, L, PER_LAYER, generator=self.gen) < 0.08) * (
            0.5 + 2.5 * torch.rand(n, L, PER_LAYER, generator=self.gen)
        )
        x = torch.einsum("nsj,sjd->nsd", codes, self.A)
        y = torch.zeros(n, L, D)
        for s in range(L):
            y[:, s:] += torch.einsum("nj,jtd->ntd", codes[:, s], self.W[s])
        return torch.stack([x, y], dim=2)  # [n, L, 2, D]

    def recovered(self, ae, threshold: float = 0.9) -> int:
        found = 0
        for s in range(L):
            learned = F.normalize(ae.W_dec[s].detach().flatten(1), dim=-1)
            true = F.normalize(self.W[s].flatten(1), dim=-1)
            found += int(((true @ learned.T).max(-1).values > threshold).sum())
        return found


RECIPES = [TopKCLTTrainer, BatchTopKCLTTrainer, JumpReluCLTTrainer]


def clt_trainer(cls, steps: int, **kwargs):
    return cls(steps=steps, **(CLT_CONFIGS[cls.__name__] | kwargs))


@pytest.mark.parametrize("cls", list(RECIPES))
def test_a_clt_recovers_planted_cross_layer_latents(cls):
    data = PlantedCLT()
    trainer = clt_trainer(cls, 600)
    assert data.recovered(trainer.ae) < 3  # not found by the initialisation
    first = float(trainer.loss(data.batch()).loss.detach())
    for step in range(600):
        trainer.update(step, data.batch())
    out = trainer.loss(data.batch())
    assert float(out.losses["normalised_mse"].detach()) < 0.15 * first
    assert data.recovered(trainer.ae) >= 42, data.recovered(trainer.ae)
    if cls is JumpReluCLTTrainer:
        assert float(out.losses["l0"]) < 8 and bool((trainer.ae.threshold > 0).all())
    if cls is BatchTopKCLTTrainer:  # the tracked thresholds keep about k (1) latents per layer at inference
        l0 = (trainer.ae.encode(data.batch(2048)[:, :, 0]) > 0).sum(-1).float().mean(0)
        assert bool((trainer.ae.threshold > 0).all()) and bool(((l0 > 0.5) & (l0 < 2)).all()), l0


def test_the_sparse_decoder_equals_the_dense_one_in_values_and_gradients():
    torch.manual_seed(0)
    ae = TopKCrossLayerTranscoder(D, 32, L, k=4)
    x = PlantedCLT().batch(16)[:, :, 0]
    values, indices, pre = ae.topk(x)
    sparse = ae.decode_sparse(indices, values)
    dense = ae.decode(torch.zeros_like(pre).scatter(-1, indices, values))
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(ae(x), dense)
    (g_sparse,) = torch.autograd.grad(sparse.pow(2).sum(), [ae.W_dec[1]])
    (g_dense,) = torch.autograd.grad(dense.pow(2).sum(), [ae.W_dec[1]])
    torch.testing.assert_close(g_sparse, g_dense)
    f = torch.zeros_like(pre).scatter(-1, indices, values)
    f[0, 1] = 0  # a row with no latent in one layer, and rows with more than k in another
    f[1:4, 2, :8] = torch.rand(3, 8) + 0.1
    f.requires_grad_(True)
    active, dense = ae.decode_active(f), ae.decode(f)
    torch.testing.assert_close(active, dense)
    g_active = torch.autograd.grad(active.pow(2).sum(), [ae.W_dec[2], ae.b_dec, f])
    g_dense = torch.autograd.grad(dense.pow(2).sum(), [ae.W_dec[2], ae.b_dec, f])
    torch.testing.assert_close(g_active[:2], g_dense[:2])
    torch.testing.assert_close(g_active[2], g_dense[2] * (f != 0))  # the zeros are not read: no gradient
    # layer s writes nothing to the layers before it
    f = torch.zeros(1, L, 32)
    f[0, 2, 5] = 1.0
    out = ae.decode(f) - ae.b_dec
    assert out[0, :2].abs().max() == 0 and out[0, 2:].abs().min() > 0
    assert ae.decoder_norms_by_target().shape == (L, 32, L)


@pytest.mark.parametrize("cls", [TopKCrossLayerTranscoder, BatchTopKCrossLayerTranscoder, JumpReluCrossLayerTranscoder])
@pytest.mark.parametrize("safetensors", [False, True])
def test_clt_files_round_trip(tmp_path, cls, safetensors):
    torch.manual_seed(0)
    ae = cls(D, 32, L) if cls is JumpReluCrossLayerTranscoder else cls(D, 32, L, 4)
    with torch.no_grad():
        ae.b_enc.normal_()
        ae.b_dec.normal_()
        if cls is BatchTopKCrossLayerTranscoder:
            ae.threshold.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    ae.save_pretrained(tmp_path / "clt", safetensors=safetensors)
    loaded, config = load_dictionary(tmp_path / "clt")
    assert type(loaded) is cls and loaded.num_layers == L and config["trainer"]["num_layers"] == L
    x = torch.randn(3, L, D)
    torch.testing.assert_close(loaded(x), ae(x))
    assert set(loaded.state_dict()) == set(ae.state_dict()) and "W_dec.3" in loaded.state_dict()


def test_a_clt_checkpoint_with_a_decoder_missing_or_misshapen_is_named(tmp_path):
    ae = TopKCrossLayerTranscoder(D, 32, L, 4)
    state = ae.state_dict()
    del state["W_dec.2"]
    with pytest.raises(CheckpointError, match=r"missing \['W_dec.2'\]"):
        TopKCrossLayerTranscoder.from_state_dict(state)
    state = dict(ae.state_dict())
    state["W_dec.1"] = state["W_dec.1"][:, :2]
    with pytest.raises(CheckpointError, match=r"W_dec.1 should be \[32, 3, 32\]"):
        TopKCrossLayerTranscoder.from_state_dict(state)


def test_clt_batches_of_the_wrong_layout_are_named():
    trainer = clt_trainer(TopKCLTTrainer, 30)
    with pytest.raises(ValueError, match=r"the data holds 3 layers but num_layers=4"):
        trainer.update(0, torch.randn(8, 3, 2, D))
    with pytest.raises(ValueError, match=r"one activation per layer: read each MLP's input and output"):
        trainer.update(0, torch.randn(8, L, D))
    with pytest.raises(ValueError, match=r"reads MLP inputs of shape \[..., num_layers=4, 32\], got \(8, 32\)"):
        trainer.ae.encode(torch.randn(8, D))
    with pytest.raises(TypeError, match="unknown config keys 'transcoder'"):
        TopKCLTTrainer(steps=10, activation_dim=D, dict_size=32, num_layers=L, k=4, transcoder=True)


def test_trainsae_trains_a_clt_on_every_mlp_of_a_tiny_model_and_resumes_exactly(tmp_path):
    import tiny_models

    from dictionary_learning.buffer import ActivationBuffer

    model = tiny_models.llama(n_layers=3)
    texts = [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]
    mlps = [model.model.layers[i].mlp for i in range(3)]

    buffer = ActivationBuffer(texts, model, mlps, io="in_and_out", stack_sites=True, n_ctxs=64, ctx_len=16,
                              out_batch_size=32, loop=True, seed=0)  # fmt: skip
    batches = [next(buffer) for _ in range(20)]
    assert batches[0].shape == (32, 3, 2, 32)
    config = dict(trainer=TopKCLTTrainer, activation_dim=32, dict_size=16, num_layers=3, k=2, warmup_steps=2, seed=0)
    (full,) = trainSAE(batches, [config], 20, save_dir=tmp_path / "full", progress=False, normalize_activations=True)
    loaded, saved = load_dictionary(tmp_path / "full" / "trainer_0")
    x = batches[0][:, :, 0]
    torch.testing.assert_close(loaded(x), full(x))  # the normalisation is folded into the saved file
    assert saved["steps_trained"] == 20 and saved["trainer"]["num_layers"] == 3
    trainSAE(batches[:10], [config], 20, save_dir=tmp_path / "half", progress=False, normalize_activations=True,
             backup_steps=5)  # fmt: skip
    (resumed,) = trainSAE(batches, None, 20, resume_from=tmp_path / "half", progress=False)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_train_clt_and_a_transcoder_per_layer_from_the_command_line(tmp_path, capsys):
    tiny = tiny_cli_folder(tmp_path)
    common = [*tiny, "--set", "dict_size=16", "--steps", "4", "--batch-size", "16", "--n-ctxs", "8"]
    main(["train", *common, "--layer", "all", "--transcoder", "--trainer", "TopKTrainer:k=2",
          "--out", str(tmp_path / "set")])  # fmt: skip
    configs = [load_dictionary(tmp_path / "set" / f"trainer_{i}")[1] for i in range(2)]
    assert [c["site"]["module"] for c in configs] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    main(["train", *common, "--layer", "0-1", "--clt", "--trainer", "TopKCLTTrainer:k=2",
          "--out", str(tmp_path / "clt")])  # fmt: skip
    ae, config = load_dictionary(tmp_path / "clt" / "trainer_0")
    assert type(ae) is TopKCrossLayerTranscoder and ae.num_layers == 2 and config["site"]["layer"] == [0, 1]
    capsys.readouterr()
    main(["eval", str(tmp_path / "clt" / "trainer_0"), *tiny, "--n-batches", "1", "--batch-texts", "4", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["l0"] == [2.0, 2.0] and result["n_contexts"] == 4 and "frac_recovered" in result
    with pytest.raises(SystemExit, match="--layer all reads every layer for train and cache"):
        main(["eval", str(tmp_path / "clt" / "trainer_0"), *tiny, "--layer", "all"])
    with pytest.raises(SystemExit, match="a cross-layer transcoder reads consecutive layers"):
        main(["train", *common, "--layer", "1", "--clt", "--trainer", "TopKCLTTrainer:k=2",
              "--out", str(tmp_path / "x")])  # fmt: skip
    with pytest.raises(SystemExit):
        main(["train", *common, "--layer", "one", "--clt", "--trainer", "TopKCLTTrainer:k=2",
              "--out", str(tmp_path / "x")])  # fmt: skip
    assert "expected a layer (3), a range (0-29) or 'all', got 'one'" in capsys.readouterr().err


def test_clt_dashboards_show_where_each_latent_reads_and_writes(tmp_path, capsys):
    import tiny_models

    from dictionary_learning.dashboard import collect_feature_stats, feature_page
    from dictionary_learning.reader import ActivationReader

    model = tiny_models.llama(n_layers=3)
    texts = [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]
    torch.manual_seed(0)
    ae = TopKCrossLayerTranscoder(32, 8, 3, k=2)
    mlps = [model.model.layers[i].mlp for i in range(3)]
    reader = ActivationReader(texts, model, mlps, io="in", ctx_len=16)
    stats = collect_feature_stats(ae, reader, reader.data, batch_size=4, max_contexts=8)
    kept = 2 * 3 * stats.n_tokens  # k per layer and token, less the few top-k values that ReLU zeroes
    assert stats.n_features == 24 and 0.9 * kept < len(stats.values) <= kept
    assert torch.equal(stats.layer_norms, ae.decoder_norms_by_target().flatten(0, 1))
    assert stats.name(13) == "Latent 5 of layer 1" and stats.layer_norms[13, 0] == 0  # writes nothing before layer 1
    page = feature_page(stats, 13)
    assert "Decoder norm by output layer" in page and "layer 2: " in page
    with pytest.raises(ValueError, match="reads every layer's MLP input: give a reader of those 3 MLPs"):
        collect_feature_stats(ae, ActivationReader(texts, model, mlps[0], io="in", ctx_len=16), texts)

    tiny = tiny_cli_folder(tmp_path)
    main(["train", *tiny, "--layer", "all", "--clt", "--trainer", "TopKCLTTrainer:k=2", "--set", "dict_size=8",
          "--steps", "4", "--batch-size", "16", "--n-ctxs", "8", "--out", str(tmp_path / "clt")])  # fmt: skip
    capsys.readouterr()
    main(["features", str(tmp_path / "clt" / "trainer_0"), *tiny, "--features", "0", "9", "--out", str(tmp_path / "f")])
    index = (tmp_path / "f" / "index.html").read_text()
    assert "every MLP" in index and "reads layer" in index and "writes most to" in index
    assert "Latent 1 of layer 1" in (tmp_path / "f" / "feature_9.html").read_text()
    with pytest.raises(SystemExit, match="reads every layer's MLP: drop --layer and --site"):
        main(["features", str(tmp_path / "clt" / "trainer_0"), *tiny, "--layer", "0"])


def test_a_clt_layer_by_layer_equals_its_whole_forward():
    torch.manual_seed(0)
    batch_topk = BatchTopKCrossLayerTranscoder(D, 32, L, k=4)
    batch_topk.threshold.fill_(0.05)
    jump_relu = JumpReluCrossLayerTranscoder(D, 32, L, threshold=0.1)
    for ae in (TopKCrossLayerTranscoder(D, 32, L, k=4), jump_relu, batch_topk):
        x = PlantedCLT().batch(16)[:, :, 0]
        with torch.no_grad():
            codes = [ae.encode_layer(x[:, s], s) for s in range(L)]
            by_layer = torch.stack([ae.decode_layer(codes, layer) for layer in range(L)], 1)
            torch.testing.assert_close(by_layer, ae(x))
            torch.testing.assert_close(torch.stack(codes, 1), ae.encode(x))


def test_batch_topk_clt_keeps_k_per_layer_over_the_batch_until_its_thresholds_are_set():
    torch.manual_seed(0)
    ae = BatchTopKCrossLayerTranscoder(D, 32, L, k=4)
    x = PlantedCLT().batch(64)[:, :, 0]
    f = ae.encode(x)  # thresholds unset: the batch rule, k * 64 per layer
    assert (f > 0).sum((0, 2)).tolist() == [4 * 64] * L and (f > 0).sum(-1).max() > 4
    values, indices, pre = ae.topk(x)
    torch.testing.assert_close(torch.zeros_like(pre).scatter(-1, indices, values), f)
    torch.testing.assert_close(ae.decode_sparse(indices, values), ae(x))
    ae.threshold.copy_(torch.tensor([0.0, 0.1, 0.2, 1e9]))
    f = ae.encode(x)
    assert bool((f[:, 3] == 0).all()) and bool(((f[:, 1] == 0) | (f[:, 1] > 0.1)).all())
    torch.testing.assert_close(f[:, 0], torch.relu(ae.pre_activations(x))[:, 0])


def test_the_replacement_model_of_a_tiny_model():
    import tiny_models

    from dictionary_learning.replacement import evaluate_replacement, mlp_replacements
    from dictionary_learning.splice import run_model

    model = tiny_models.llama(n_layers=3)
    texts = [" ".join(tiny_models.SENTENCES[i : i + 5]) for i in range(0, 35, 2)]
    ids = model.tokenizer(texts[:2], return_tensors="pt", padding=True).input_ids
    mlps = [copy.deepcopy(model.model.layers[i].mlp._module) for i in range(3)]  # copies: no hook of their own
    clean, _ = run_model(model, ids)
    same, _ = run_model(model, ids, transcode=mlp_replacements(model, mlps))  # each MLP standing in for itself
    torch.testing.assert_close(same, clean)
    clt = TopKCrossLayerTranscoder(32, 16, 3, k=2)
    result = evaluate_replacement(model, clt, texts, n_contexts=6, ctx_len=16, batch_size=4)
    assert result["n_contexts"] == 6 and len(result["fve"]) == 3 and result["l0"] == [2.0, 2.0, 2.0]
    with torch.no_grad():
        for W in clt.W_dec:
            W.zero_()
        clt.b_dec.zero_()
    silent = evaluate_replacement(model, clt, texts, n_contexts=6, ctx_len=16, batch_size=4)
    assert silent["ce_replaced"] == pytest.approx(silent["ce_zero"]) and silent["frac_recovered"] == pytest.approx(0)
    with pytest.raises(ValueError, match="the replacement has 2 layers, the model 3: replace every MLP"):
        evaluate_replacement(model, TopKCrossLayerTranscoder(32, 16, 2, k=2), texts)


def test_train_clt_from_a_cache_of_every_mlp(tmp_path):
    tiny = tiny_cli_folder(tmp_path)
    main(["cache", *tiny, "--layer", "all", "--site", "mlp", "--io", "in_and_out", "--stack-sites",
          "--tokens", "400", "--out", str(tmp_path / "cache")])  # fmt: skip
    main(["train", "--cache", str(tmp_path / "cache"), "--clt", "--trainer", "TopKCLTTrainer:k=2", "--set",
          "dict_size=16", "--steps", "4", "--batch-size", "16", "--out", str(tmp_path / "clt")])  # fmt: skip
    ae, config = load_dictionary(tmp_path / "clt" / "trainer_0")
    assert ae.num_layers == 2 and config["site"]["layer"] == [0, 1]
    main(["cache", *tiny, "--layer", "all", "--site", "mlp", "--stack-sites", "--tokens", "400",
          "--out", str(tmp_path / "outputs")])  # fmt: skip
    with pytest.raises(ValueError, match="one activation per layer: read each MLP's input and output"):
        main(["train", "--cache", str(tmp_path / "outputs"), "--clt", "--trainer", "TopKCLTTrainer:k=2",
              "--set", "dict_size=16", "--steps", "4", "--batch-size", "16", "--out", str(tmp_path / "x"),
              "--debug"])  # fmt: skip


def test_the_decoder_s_gradients_are_those_of_the_plain_sum():
    from dictionary_learning.dictionaries.clt import _SumWrites

    b = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    writes = [torch.randn(2, 3 - s, 4, dtype=torch.double, requires_grad=True) for s in range(3)]
    assert torch.autograd.gradcheck(_SumWrites.apply, (b, *writes))
    plain = b + sum(F.pad(w, (0, 0, s, 0)) for s, w in enumerate(writes))
    torch.testing.assert_close(_SumWrites.apply(b, *writes), plain)


def test_clt_seams_refuse_what_would_be_reinterpreted():
    ae = TopKCrossLayerTranscoder(D, 32, L, k=4)
    with pytest.raises(ValueError, match=r"reads codes of shape \[..., num_layers=4, 32\], got \(8, 128\)"):
        ae.decode(torch.zeros(8, L * 32))  # flat codes would reshape into [2, 4, 32] silently
    with pytest.raises(ValueError, match=r"layer 4 of 4: expected MLP inputs \[..., 32\]"):
        ae.encode_layer(torch.zeros(8, D), 4)
    with pytest.raises(ValueError, match=r"decode_sparse takes indices and values \[N, 4, K\]"):
        ae.decode_sparse(torch.zeros(8, L, 4, dtype=torch.long), torch.zeros(8, L, 3))
    other = TopKCrossLayerTranscoder(D, 32, L, k=2)
    other.load_state_dict(ae.state_dict())  # the cached k follows the loaded buffer
    assert other.active_k == 4 and other.encode(torch.randn(3, L, D)).count_nonzero(-1).max() <= 4


def test_a_replacement_refuses_saes_standing_in_for_mlps():
    import tiny_models

    from dictionary_learning.dictionaries import AutoEncoderTopK
    from dictionary_learning.replacement import mlp_replacements

    model = tiny_models.llama(n_layers=2)
    with pytest.raises(ValueError, match="layer 0: a AutoEncoderTopK SAE cannot stand in for an MLP"):
        mlp_replacements(model, [AutoEncoderTopK(32, 16, 2), AutoEncoderTopK(32, 16, 2, transcoder=True)])
