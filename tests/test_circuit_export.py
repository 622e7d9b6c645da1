"""Export to circuit-tracer: per-layer transcoder sets and cross-layer transcoders, TopK ones with
calibrated JumpReLU thresholds, read back by our reader and, with `DL_CIRCUIT_TRACER_PYTHON`
pointing at a venv holding circuit-tracer 0.5 (`tools/setup_circuit_tracer_venv.sh`; CI builds it),
by circuit-tracer itself: its activations and reconstructions must equal our dictionaries' own on
the same MLP inputs (given ones, and SmolLM2's with both of its backends), and it builds an
attribution graph for a prompt."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import randomized, tiny_cli_folder
from safetensors.torch import save_file

from dictionary_learning.circuit_export import (
    export_circuit_tracer,
    load_circuit_tracer,
    rate_matched_thresholds,
    transcoders_by_layer,
)
from dictionary_learning.cli import main
from dictionary_learning.dictionaries import (
    AutoEncoder,
    AutoEncoderTopK,
    BatchTopKCrossLayerTranscoder,
    BatchTopKSAE,
    JumpReluAutoEncoder,
    JumpReluCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from dictionary_learning.files import CheckpointError

SIDE_PYTHON = os.environ.get("DL_CIRCUIT_TRACER_PYTHON")
CHECK = Path(__file__).resolve().parents[1] / "tools" / "circuit_tracer_side.py"
L, D, F, K = 3, 16, 24, 4


def per_layer(make):
    torch.manual_seed(0)
    return [randomized(make()) for _ in range(L)]


def held_out_pairs(n: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, L, 2, D, generator=torch.Generator().manual_seed(seed))


def written_thresholds(folder: Path):
    """The thresholds in an exported folder: a CLT's `[L, F]`, or a set's list by layer (None: ReLU)."""
    from safetensors.torch import load_file

    layers = len(list(folder.glob("W_enc_*.safetensors")))
    if layers:
        return torch.stack([load_file(str(folder / f"W_enc_{s}.safetensors"))[f"threshold_{s}"] for s in range(layers)])
    files = [load_file(str(folder / f"layer_{i}.safetensors")) for i in range(len(list(folder.glob("layer_*"))))]
    return [tensors.get("activation_function.threshold") for tensors in files]


def expected(dictionaries, x_NLD: torch.Tensor, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """What circuit-tracer must compute, from OUR classes' own code: activations `[L, N, F]` and
    reconstructions `[L, N, D]`; a TopK dictionary as a JumpReLU of its ReLU pre-activations at the
    calibrated thresholds written in the folder (`thresholds`: the CLT's `[L, F]`, or a set's by layer)."""
    with torch.no_grad():
        if isinstance(dictionaries, (TopKCrossLayerTranscoder, JumpReluCrossLayerTranscoder)):
            ae = dictionaries
            own = isinstance(ae, BatchTopKCrossLayerTranscoder) and bool((ae.threshold >= 0).all())
            if isinstance(ae, TopKCrossLayerTranscoder) and not own:
                pre = ae.pre_activations(x_NLD)
                acts = pre * (pre > thresholds)
            else:
                acts = ae.encode(x_NLD)
            return acts.transpose(0, 1), ae.decode(acts).transpose(0, 1)
        acts, recon = [], []
        for layer, ae in enumerate(dictionaries):
            x = x_NLD[:, layer]
            if type(ae) is AutoEncoderTopK:
                a = ae.relu_pre_activations(x)
                f = a * (a > thresholds[layer])
            else:
                f = ae.encode(x)
            acts.append(f)
            recon.append(ae.decode(f) + ae.skip(x))
        return torch.stack(acts), torch.stack(recon)


def export_cases() -> dict:
    """name -> (dictionaries, held-out pairs or None)."""
    topk_set = per_layer(lambda: AutoEncoderTopK(D, F, K, transcoder=True, skip_connection=True))
    batch_topk = per_layer(lambda: BatchTopKSAE(D, F, K, transcoder=True))
    for ae in batch_topk:
        ae.threshold.fill_(0.3)  # its own inference threshold is exported
    torch.manual_seed(0)
    clt_batch_topk = randomized(BatchTopKCrossLayerTranscoder(D, F, L, K))
    clt_batch_topk.threshold.copy_(torch.tensor([0.2, 0.3, 0.4]))
    untracked = randomized(BatchTopKCrossLayerTranscoder(D, F, L, K))
    untracked.threshold.fill_(-1.0)  # never tracked: calibrated on held-out activations
    return {
        "set_relu_skip": (per_layer(lambda: AutoEncoder(D, F, transcoder=True, skip_connection=True)), None),
        "set_jumprelu": (per_layer(lambda: JumpReluAutoEncoder(D, F, transcoder=True)), None),
        "set_topk": (topk_set, {i: held_out_pairs()[:, i] for i in range(L)}),
        "set_batchtopk": (batch_topk, None),
        "clt_jumprelu": (randomized(JumpReluCrossLayerTranscoder(D, F, L)), None),
        "clt_topk": (randomized(TopKCrossLayerTranscoder(D, F, L, K)), held_out_pairs()),
        "clt_batchtopk": (clt_batch_topk, None),  # its tracked thresholds are exported
        "clt_batchtopk_untracked": (untracked, held_out_pairs()),
    }


def test_exports_read_back_by_our_reader_compute_what_our_dictionaries_compute(tmp_path):
    x = held_out_pairs(32, seed=2)[:, :, 0]
    for name, (dictionaries, held_out) in export_cases().items():
        export_circuit_tracer(dictionaries, tmp_path / name, held_out, model_name="m")
        acts, recon = expected(dictionaries, x, written_thresholds(tmp_path / name))
        loaded = load_circuit_tracer(tmp_path / name)
        with torch.no_grad():
            if isinstance(loaded, list):
                got_acts = torch.stack([ae.encode(x[:, i]) for i, ae in enumerate(loaded)])
                got_recon = torch.stack([ae(x[:, i]) for i, ae in enumerate(loaded)])
            else:
                got_acts, got_recon = loaded.encode(x).transpose(0, 1), loaded(x).transpose(0, 1)
        torch.testing.assert_close(got_acts, acts, msg=name)
        torch.testing.assert_close(got_recon, recon, msg=name)
        assert (acts > 0).any() and (acts == 0).any(), name  # the thresholds matter on these inputs


@pytest.mark.parametrize("rule", ["latent", "layer"])
def test_topk_thresholds_keep_k_latents_and_the_report_says_what_they_keep(tmp_path, rule):
    dictionaries, held_out = export_cases()["set_topk"]
    record = export_circuit_tracer(dictionaries, tmp_path / "set", held_out, calibration=rule)
    thresholds = written_thresholds(tmp_path / "set")
    for layer in range(L):
        report = record["dictionary_learning"]["calibration"][str(layer)]
        assert abs(report["l0"] - K) < 0.1 and report["threshold_median"] > 0 and report["rule"] == rule
        assert {"fve_topk", "fve_jumprelu"} <= set(report)
        assert (thresholds[layer].unique().numel() == 1) == (rule == "layer")
    clt, held_out = export_cases()["clt_topk"]
    report = export_circuit_tracer(clt, tmp_path / "clt", held_out, calibration=rule)["dictionary_learning"]
    report = report["calibration"]["clt"]
    assert all(abs(l0 - K) < 0.1 for l0 in report["l0"]) and len(report["fve_jumprelu"]) == L
    with pytest.raises(ValueError, match=r"calibration must be one of \('latent', 'layer'\), got 'rank'"):
        export_circuit_tracer(clt, tmp_path / "x", held_out, calibration="rank")


def test_rate_matched_thresholds_give_each_latent_its_topk_firing_rate():
    torch.manual_seed(0)
    ae = randomized(AutoEncoderTopK(D, F, K, transcoder=True))
    x = torch.randn(4096, D)
    with torch.no_grad():
        a, kept = ae.relu_pre_activations(x), ae.encode(x) > 0
    thresholds = rate_matched_thresholds(a, kept, chunk=7)  # chunks that do not divide F
    assert thresholds.shape == (F,) and bool((thresholds >= 0).all())
    torch.testing.assert_close((a > thresholds).sum(0), kept.sum(0), atol=0, rtol=0)  # no ties in random data
    kept = torch.zeros(8, 3, dtype=torch.bool)
    kept[:, 1] = True  # latent 1 kept on every row, 0 and 2 on none
    a = torch.rand(8, 3) + 0.1
    t = rate_matched_thresholds(a, kept)
    assert t[1] == 0 and torch.equal(t[[0, 2]], a[:, [0, 2]].max(0).values) and not (a[:, [0, 2]] > t[[0, 2]]).any()


def test_bad_exports_are_named(tmp_path):
    sae = [randomized(AutoEncoderTopK(D, F, K)) for _ in range(L)]
    with pytest.raises(ValueError, match="layer 0: a AutoEncoderTopK SAE is not a per-layer transcoder"):
        export_circuit_tracer(sae, tmp_path / "a")
    topk = per_layer(lambda: AutoEncoderTopK(D, F, K, transcoder=True))
    with pytest.raises(ValueError, match="layer 0: a AutoEncoderTopK keeps the top k latents.*give held-out MLP"):
        export_circuit_tracer(topk, tmp_path / "b")
    with pytest.raises(ValueError, match=r"held-out activations must be \[N, 2, 16\]"):
        export_circuit_tracer(topk, tmp_path / "b", {i: torch.randn(8, D) for i in range(L)})
    with pytest.raises(ValueError, match="a TopKCrossLayerTranscoder keeps .* give held-out MLP inputs and outputs"):
        export_circuit_tracer(TopKCrossLayerTranscoder(D, F, L, K), tmp_path / "c")
    with pytest.raises(ValueError, match=r"held-out activations must be \[N, 3, 2, 16\]"):
        export_circuit_tracer(topk, tmp_path / "b", torch.randn(8, L + 1, 2, D))
    record = export_circuit_tracer(topk, tmp_path / "b", held_out_pairs())  # every layer's [N, L, 2, d] at once
    assert set(record["dictionary_learning"]["calibration"]) == {"0", "1", "2"}
    wide = [JumpReluAutoEncoder(D, F, output_dim=D + 1) for _ in range(L)]
    with pytest.raises(ValueError, match="write the input's width; this one writes 17"):
        export_circuit_tracer(wide, tmp_path / "d")


def test_a_folder_edited_after_export_is_refused(tmp_path):
    export_circuit_tracer(per_layer(lambda: JumpReluAutoEncoder(D, F, transcoder=True)), tmp_path / "set")
    path = tmp_path / "set" / "layer_1.safetensors"
    edited = {"W_enc": torch.zeros(F, D), "b_enc": torch.zeros(F), "W_dec": torch.zeros(F, D), "b_dec": torch.zeros(D)}
    save_file(edited, str(path))
    with pytest.raises(CheckpointError, match="layer_1.safetensors changed since it was exported"):
        load_circuit_tracer(tmp_path / "set")
    export_circuit_tracer(per_layer(lambda: JumpReluAutoEncoder(D, F, transcoder=True)), tmp_path / "set2")
    (tmp_path / "set2" / "layer_2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="layer_2.safetensors is missing"):
        load_circuit_tracer(tmp_path / "set2")


def test_export_from_the_command_line_calibrates_topk_on_the_recorded_model(tmp_path, capsys):
    tiny = tiny_cli_folder(tmp_path)
    common = [*tiny, "--set", "dict_size=16", "--steps", "4", "--batch-size", "16", "--n-ctxs", "8"]
    main(["train", *common, "--layer", "all", "--transcoder", "--trainer", "TopKTrainer:k=2",
          "--out", str(tmp_path / "set")])  # fmt: skip
    main(["train", *common, "--layer", "all", "--clt", "--trainer", "TopKCLTTrainer:k=2",
          "--out", str(tmp_path / "clt")])  # fmt: skip
    capsys.readouterr()
    for run in ("set", "clt"):
        main(["export", str(tmp_path / run), "--format", "circuit-tracer", "--out", str(tmp_path / f"{run}_ct"),
              *tiny[2:], "--held-out-tokens", "256"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote a circuit-tracer transcoder_set of 2 layers" in printed
    assert "wrote a circuit-tracer cross_layer_transcoder of 2 layers" in printed
    assert '"l0": 2.0' in printed or '"l0": [2.0' in printed
    assert len(load_circuit_tracer(tmp_path / "set_ct")) == 2
    assert isinstance(load_circuit_tracer(tmp_path / "clt_ct"), JumpReluCrossLayerTranscoder)
    with pytest.raises(SystemExit, match="trained on .*, not 'another/model': drop --model"):
        main(["export", str(tmp_path / "clt"), "--format", "circuit-tracer", "--out", str(tmp_path / "x"),
              "--model", "another/model", *tiny[2:]])  # fmt: skip
    with pytest.raises(SystemExit, match="scored on every MLP at once"):
        main(["eval", str(tmp_path / "clt" / "trainer_0"), *tiny, "--suite", "core,absorption"])
    with pytest.raises(ValueError, match=r"no transcoder for layers \[0\]"):
        transcoders_by_layer([tmp_path / "set" / "trainer_1"])
    with pytest.raises(SystemExit, match="a cross-layer transcoder, which replaces every MLP alone"):
        main(["export", str(tmp_path / "clt"), str(tmp_path / "set"), "--format", "circuit-tracer",
              "--out", str(tmp_path / "x"), *tiny[2:]])  # fmt: skip


def run_side(mode: str, root: Path) -> dict:
    run = subprocess.run([SIDE_PYTHON, str(CHECK), mode, str(root)], capture_output=True, text=True, cwd=root,
                         timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not SIDE_PYTHON, reason="set DL_CIRCUIT_TRACER_PYTHON to a venv with circuit-tracer 0.5")
def test_real_circuit_tracer_computes_what_our_dictionaries_compute(tmp_path):
    x = held_out_pairs(32, seed=2)[:, :, 0]
    want = {}
    for name, (dictionaries, held_out) in export_cases().items():
        export_circuit_tracer(dictionaries, tmp_path / name, held_out)
        want[name] = expected(dictionaries, x, written_thresholds(tmp_path / name))
        save_file({"x": x.transpose(0, 1).contiguous()}, str(tmp_path / f"{name}.safetensors"))
    got = run_side("formats", tmp_path)
    assert set(got) == set(want)
    for name, (acts, recon) in want.items():
        kind = "cross_layer_transcoder" if name.startswith("clt") else "transcoder_set"
        assert got[name]["kind"] == kind
        torch.testing.assert_close(torch.tensor(got[name]["acts"]), acts, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(torch.tensor(got[name]["recon"]), recon, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not SIDE_PYTHON, reason="set DL_CIRCUIT_TRACER_PYTHON to a venv with circuit-tracer 0.5")
def test_circuit_tracer_builds_graphs_from_our_smollm2_exports_with_both_backends(tmp_path):
    from dictionary_learning.circuit_export import read_mlp_pairs
    from dictionary_learning.models import default_texts, load_default_model, num_layers
    from dictionary_learning.splice import run_model

    model = load_default_model()
    n_layers, width = num_layers(model), 576
    ids = model.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    reads = [(f"model.layers.{layer}.mlp", "in") for layer in range(n_layers)]
    with torch.no_grad():
        _, saved = run_model(model, ids, read=reads, logits=False)
    x = torch.stack([saved[r][0] for r in reads], dim=1)  # [N, L, D]: each MLP's input, as we train on it
    torch.manual_seed(0)
    transcoders = []
    for _ in range(n_layers):
        ae = JumpReluAutoEncoder(width, 64, transcoder=True)
        with torch.no_grad():
            ae.threshold.fill_(0.5)
            ae.W_dec.mul_(0.1)
        transcoders.append(ae)
    clt = TopKCrossLayerTranscoder(width, 32, n_layers, k=4)
    held_out = read_mlp_pairs(model, list(range(n_layers)), default_texts(split="held_out"), 2048)
    dictionaries = {"set": transcoders, "clt": clt}
    want = {}
    for name, d in dictionaries.items():
        export_circuit_tracer(d, tmp_path / name, held_out if name == "clt" else None)
        want[name] = expected(d, x, written_thresholds(tmp_path / name))[0]  # [L, N, F]
        save_file({"ids": ids[0].to(torch.int32)}, str(tmp_path / f"{name}.safetensors"))
    got = run_side("model", tmp_path)
    for key, result in got.items():
        acts = torch.tensor(result["acts"])[:, 1:]  # circuit-tracer zeroes the first (BOS) position
        ours = want[key.split("/")[0]][:, 1:]
        close = (acts - ours).abs() <= 1e-3 + 1e-3 * ours.abs()
        assert close.float().mean() > 0.999, (key, float(close.float().mean()))
        assert (ours > 0).sum() > 50, key  # latents fire: the comparison is not of zeros
        assert result["logit_error"] < 1e-3, key
        assert 0 <= result["replacement"] <= 1 and 0 <= result["completeness"] <= 1 and result["features"] > 0
