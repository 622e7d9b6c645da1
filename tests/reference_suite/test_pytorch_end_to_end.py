"""The reference's tests/test_pytorch_end_to_end.py (the PyTorch-hooks buffer of
`dictionary_learning.pytorch_buffer` on a plain Hugging Face model, TopK + Standard through
trainSAE, get_nested_folders, load_dictionary, evaluate) against our package, with the adaptations
listed in scenario.py. The reference package on PyPI (0.1.0) predates pytorch_buffer, so there is no
reference side to run here."""

from __future__ import annotations

import pytest
import scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, texts):
    save_dir = tmp_path_factory.mktemp("reference_suite_pytorch") / "test_data"
    folders = scenario.train(model_dir, texts, str(save_dir), "pytorch")
    return save_dir, folders


def test_sae_training(trained):
    _, folders = trained
    assert len(folders) == 2
    for folder in folders:
        dictionary, config = scenario.load_dictionary(folder, scenario.DEVICE)
        assert dictionary is not None and config is not None


def test_evaluation(trained, model_dir, texts):
    save_dir, _ = trained
    results = scenario.evaluate_all(model_dir, texts, str(save_dir), "pytorch")
    assert set(results) == {"AutoEncoderTopK", "AutoEncoder"}
    for dict_class, metrics in results.items():
        assert set(scenario.METRICS) <= set(metrics), dict_class
        assert 0.5 < metrics["frac_variance_explained"] <= 1.0, (dict_class, metrics)
        assert metrics["frac_alive"] > 0.5
    assert results["AutoEncoderTopK"]["l0"] == pytest.approx(40.0)
