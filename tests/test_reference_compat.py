"""Folders written by our trainSAE load in the reference package (dictionary-learning 0.1.0) with
identical outputs. Needs a venv with that package: set DL_REFERENCE_PYTHON to its python
(tools/setup_reference_venv.sh makes one; .ci/run does so when it can)."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch

from dictionary_learning import trainSAE
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import TRAINER_REGISTRY

REFERENCE_PYTHON = os.environ.get("DL_REFERENCE_PYTHON")
pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(not REFERENCE_PYTHON, reason="set DL_REFERENCE_PYTHON to a venv with dictionary-learning"),
]

D, F, STEPS = 16, 48, 30
COMMON = dict(activation_dim=D, dict_size=F, warmup_steps=5, seed=0, layer=1, lm_name="synthetic", device="cpu")
PENALISED = dict(COMMON, sparsity_warmup_steps=5)
TOPK = dict(COMMON, k=4, threshold_start_step=5)
CONFIGS = {
    "StandardTrainer": PENALISED,
    "GatedSAETrainer": PENALISED,
    "PAnnealTrainer": dict(PENALISED, anneal_start=10),
    "GatedAnnealTrainer": dict(PENALISED, anneal_start=10),
    "TopKTrainer": TOPK,
    "BatchTopKTrainer": TOPK,
    "MatryoshkaBatchTopKTrainer": dict(TOPK, group_fractions=[0.25, 0.75]),
    "JumpReluTrainer": PENALISED,
    "StandardTrainerAprilUpdate": dict(PENALISED, dict_class="AutoEncoderNew"),
}

REFERENCE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from dictionary_learning.utils import load_dictionary
    out = {}
    x = torch.load(sys.argv[2], weights_only=True)
    for folder in sys.argv[3:]:
        ae, config = load_dictionary(folder, device="cpu")
        with torch.no_grad():
            x_hat, f = ae(x, output_features=True)
        out[folder] = {"x_hat": x_hat, "f": f, "class": type(ae).__name__}
    torch.save(out, sys.argv[1])
    """
)


@pytest.mark.parametrize("normalize", [False, True])
def test_our_folders_load_in_the_reference_with_identical_outputs(tmp_path, normalize):
    configs = [dict(trainer=TRAINER_REGISTRY[name], **cfg) for name, cfg in CONFIGS.items()]
    data = (x * 3 for x in PlantedFeatures(d=D, n_features=24).batches(STEPS, 64))
    ours = trainSAE(data, configs, STEPS, save_dir=tmp_path, normalize_activations=normalize, progress=False)
    x = next(PlantedFeatures(d=D, n_features=24).batches(1, 50, seed=5)) * 3
    torch.save(x, tmp_path / "x.pt")
    folders = [str(tmp_path / f"trainer_{i}") for i in range(len(configs))]
    subprocess.run(
        [REFERENCE_PYTHON, "-c", REFERENCE_SCRIPT, str(tmp_path / "out.pt"), str(tmp_path / "x.pt"), *folders],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    reference = torch.load(tmp_path / "out.pt", weights_only=True)
    for folder, ae in zip(folders, ours):
        assert reference[folder]["class"] == type(ae).__name__
        with torch.no_grad():
            x_hat, f = ae(x, output_features=True)
        torch.testing.assert_close(reference[folder]["x_hat"], x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reference[folder]["f"], f, rtol=1e-5, atol=1e-5)
