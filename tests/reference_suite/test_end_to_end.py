"""The reference's tests/test_end_to_end.py (nnsight buffer, TopK + Standard through trainSAE,
get_nested_folders, load_dictionary, evaluate) against our package, with the adaptations listed in
scenario.py; and, when DL_REFERENCE_PYTHON names a venv with the reference package, the same
scenario file run by the reference, whose metrics must pass the same checks, with ours explaining at
least as much variance (within 0.05)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import scenario

pytestmark = pytest.mark.slow
REFERENCE_PYTHON = os.environ.get("DL_REFERENCE_PYTHON")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, texts):
    save_dir = tmp_path_factory.mktemp("reference_suite") / "test_data"
    folders = scenario.train(model_dir, texts, str(save_dir), "nnsight")
    return save_dir, folders


def check_metrics(results: dict, with_ce: bool) -> None:
    assert set(results) == {"AutoEncoderTopK", "AutoEncoder"}
    for dict_class, metrics in results.items():
        expected = scenario.METRICS + (scenario.CE_METRICS if with_ce else [])
        assert set(expected) <= set(metrics), dict_class
        assert 0.5 < metrics["frac_variance_explained"] <= 1.0, (dict_class, metrics)
        assert 0.0 < metrics["relative_reconstruction_bias"] < 1.5 and metrics["frac_alive"] > 0.5
        if with_ce:
            assert metrics["loss_original"] < metrics["loss_reconstructed"] < metrics["loss_zero"]
            assert 0.0 < metrics["frac_recovered"] <= 1.0, (dict_class, metrics)
    assert results["AutoEncoderTopK"]["l0"] == pytest.approx(40.0)


def test_sae_training(trained):
    save_dir, folders = trained
    assert len(folders) == 2 and all(isinstance(f, str) for f in folders)
    for folder in folders:
        dictionary, config = scenario.load_dictionary(folder, scenario.DEVICE)
        assert dictionary is not None and config is not None
        assert config["buffer"]["ctx_len"] == 128 and config["trainer"]["layer"] == scenario.LAYER


@pytest.fixture(scope="module")
def evaluated(trained, model_dir, texts):
    save_dir, _ = trained
    return scenario.evaluate_all(model_dir, texts, str(save_dir), "nnsight")


def test_evaluation(evaluated):
    check_metrics(evaluated, with_ce=True)


@pytest.mark.skipif(not REFERENCE_PYTHON, reason="set DL_REFERENCE_PYTHON to a venv with dictionary-learning")
def test_the_reference_runs_the_same_scenario(tmp_path, model_dir, texts, evaluated):
    """The same file run by the reference package, from a folder outside our checkout so that it
    imports the reference: its metrics pass the same checks, and ours are not worse."""
    texts_json = tmp_path / "texts.json"
    texts_json.write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [REFERENCE_PYTHON, str(Path(scenario.__file__)), model_dir, str(texts_json), str(tmp_path / "ref")]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = json.loads(run.stdout.strip().splitlines()[-1])
    check_metrics(reference, with_ce=True)
    for dict_class, metrics in reference.items():
        ours = evaluated[dict_class]["frac_variance_explained"]
        assert ours >= metrics["frac_variance_explained"] - 0.05, (dict_class, ours, metrics)
