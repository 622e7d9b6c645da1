"""Ground truth on synthetic data: the synthetic model's statistics, `ground_truth_metrics` on
dictionaries whose answer is known, its bad inputs, and (with DL_SAELENS_PYTHON) equality with
SAELens's own `sae_lens.synthetic.evals` on the same samples."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from dictionary_learning import AutoEncoder, AutoEncoderTopK, CrossCoder
from dictionary_learning.evaluation import ground_truth_metrics
from dictionary_learning.synthetic import SyntheticModel

SIDE_PYTHON = os.environ.get("DL_SAELENS_PYTHON")


def model_and_samples(n=4000, **kwargs):
    model = SyntheticModel(n_features=96, d=32, mean_l0=4, seed=0, **kwargs)
    codes, x = model.sample(n, torch.Generator().manual_seed(1))
    return model, codes, x


def test_the_synthetic_model_fires_as_asked_and_children_need_their_parents():
    model, codes, _ = model_and_samples(n=20000, child_fraction=0.2)
    fires = codes > 0
    assert abs(float(fires.sum(1).float().mean()) - 4) < 0.5
    children = (model.parent >= 0).nonzero().squeeze(1)
    assert len(children) == int(0.2 * 96)
    assert not bool((fires[:, children] & ~fires[:, model.parent[children]]).any())
    assert torch.allclose(model.directions.norm(dim=1), torch.ones(96))


def test_a_dictionary_made_of_the_true_features_scores_perfectly():
    model, codes, x = model_and_samples()
    ae = AutoEncoder(32, 96)
    with torch.no_grad():  # a decoder whose rows are the true directions, an encoder that reads the codes
        ae.decoder.weight.copy_(model.directions.T)
        ae.bias.zero_()
        ae.encoder.weight.copy_(torch.linalg.pinv(model.directions).T)
        ae.encoder.bias.zero_()
    m = ground_truth_metrics(ae, x, codes, model.directions)
    assert m["mcc"] == pytest.approx(1.0) and m["uniqueness"] == pytest.approx(1.0)
    assert m["fve"] > 0.5 and m["true_l0"] == pytest.approx(float((codes > 0).sum(1).float().mean()))
    shuffled = AutoEncoder(32, 96)
    m_random = ground_truth_metrics(shuffled, x, codes, model.directions)
    assert m_random["mcc"] < 0.5 and m_random["f1"] < m["f1"]


def test_bad_inputs_are_named():
    model, codes, x = model_and_samples(n=100)
    ae = AutoEncoder(32, 96)
    with pytest.raises(
        ValueError, match="widths differ: the dictionary has activation_dim=32, activations have width 31"
    ):
        ground_truth_metrics(ae, x[:, :31], codes, model.directions)
    with pytest.raises(
        ValueError, match=r"true_codes has shape \[100, 95\], expected \[n_samples=100, n_features=96\]"
    ):
        ground_truth_metrics(ae, x, codes[:, :95], model.directions)
    with pytest.raises(ValueError, match="true_codes are all zero"):
        ground_truth_metrics(ae, x, torch.zeros_like(codes), model.directions)
    with pytest.raises(ValueError, match="true_directions must be a 2-D tensor"):
        ground_truth_metrics(ae, x, codes, model.directions[0])
    with pytest.raises(ValueError, match="CrossCoder is not one"):
        ground_truth_metrics(CrossCoder(32, 96, num_layers=2), x, codes, model.directions)


SAELENS_SCORE = r"""
import json, sys, torch
from sae_lens import SAE
from sae_lens.synthetic.evals import (ClassificationMetricsCalculator, DeadLatentsCalculator, L0Calculator,
    ShrinkageCalculator, mean_correlation_coefficient, feature_uniqueness)
from sae_lens.evals import ExplainedVarianceCalculator
data = torch.load(sys.argv[2])
sae = SAE.load_from_disk(sys.argv[1])
x, codes, directions = data["x"], data["codes"], data["directions"]
with torch.no_grad():
    latents = sae.encode(x)
    out = sae.decode(latents)
calcs = dict(l0=L0Calculator(), true_l0=L0Calculator(), dead=DeadLatentsCalculator(sae.W_dec.shape[0]),
             shrinkage=ShrinkageCalculator(), fve=ExplainedVarianceCalculator())
calcs["l0"].add_batch(latents); calcs["true_l0"].add_batch(codes); calcs["dead"].add_batch(latents)
calcs["shrinkage"].add_batch(out, x); calcs["fve"].add_batch(out, x)
cls = ClassificationMetricsCalculator(sae.W_dec.detach(), directions); cls.add_batch(latents, codes)
c = cls.compute()
result = {k: v.compute() for k, v in calcs.items()}
result |= dict(mcc=mean_correlation_coefficient(sae.W_dec.detach(), directions),
               uniqueness=feature_uniqueness(sae.W_dec.detach(), directions),
               precision=c.precision, recall=c.recall, f1=c.f1_score, accuracy=c.accuracy)
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.skipif(not SIDE_PYTHON, reason="set DL_SAELENS_PYTHON to a venv with sae-lens")
def test_ground_truth_metrics_equal_saelens_on_the_same_samples(tmp_path):
    """A TopK dictionary trained briefly on the synthetic model, exported to SAELens's format and
    scored by SAELens's own calculators on the same samples: every metric equal to 1e-3."""
    from dictionary_learning import trainSAE
    from dictionary_learning.interop import save_saelens
    from dictionary_learning.trainers import TopKTrainer

    model, codes, x = model_and_samples()
    config = dict(trainer=TopKTrainer, activation_dim=32, dict_size=96, k=4, warmup_steps=5, seed=0, device="cpu")
    (ae,) = trainSAE(model.batches(150, batch_size=256), [config], 150, progress=False)
    assert isinstance(ae, AutoEncoderTopK)
    ours = ground_truth_metrics(ae, x, codes, model.directions)
    save_saelens(ae, tmp_path / "sae")
    torch.save({"x": x, "codes": codes, "directions": model.directions}, tmp_path / "samples.pt")
    script = tmp_path / "score.py"
    script.write_text(SAELENS_SCORE)
    out = subprocess.run([SIDE_PYTHON, str(script), str(tmp_path / "sae"), str(tmp_path / "samples.pt")],
                         check=True, capture_output=True, text=True)  # fmt: skip
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert ours["mcc"] > 0.5  # a dictionary that learned something: the metrics are not all trivial
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-3), key


def test_the_synthetic_command_scores_recipes_over_seeds(tmp_path, capsys):
    from dictionary_learning.cli import main

    args = ["synthetic", "--trainers", "TopKTrainer,JumpReluTrainer,TopKTrainer:encoder_init_norm=0.1", "--seeds", "2",
            "--steps", "40", "--batch-size", "256", "--features", "96", "--d", "32", "--dict-size", "96", "--k", "4",
            "--mean-l0", "4", "--json", str(tmp_path / "s.json")]  # fmt: skip
    if SIDE_PYTHON:
        args += ["--saelens-python", SIDE_PYTHON]
    main(args)
    out = capsys.readouterr().out
    assert "ours     TopKTrainer" in out and "ours     JumpReluTrainer" in out and "±" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert all(len(r["seeds"]) == 2 and 0 <= r["mcc"] <= 1 for r in rows)
    ours = {r["recipe"]: r for r in rows if r["library"] == "ours"}
    assert ours["TopKTrainer:encoder_init_norm=0.1"]["seeds"] != ours["TopKTrainer"]["seeds"]  # the option is used
    assert [r["library"] for r in rows].count("SAELens") == (1 if SIDE_PYTHON else 0)  # once per architecture
    assert ("SAELens     TopKTrainer" in out.replace("SAELens  TopKTrainer", "SAELens     TopKTrainer")) == bool(
        SIDE_PYTHON
    )
    with pytest.raises(SystemExit, match="unknown trainer 'TopK'"):
        main(["synthetic", "--trainers", "TopK"])
    with pytest.raises(SystemExit, match="unknown config keys 'encoder_norm' \\(did you mean 'encoder_init_norm'"):
        main(["synthetic", "--trainers", "TopKTrainer:encoder_norm=0.1"])
    with pytest.raises(SystemExit, match="seed is the run's, the same for every recipe \\(--seeds\\)"):
        main(["synthetic", "--trainers", "TopKTrainer:seed=3"])  # else every seed's run would be the same one
    with pytest.raises(SystemExit, match="encoder_init_norm must be a positive number"):
        main(["synthetic", "--trainers", "TopKTrainer,TopKTrainer:encoder_init_norm=-1"])  # before TopK trains
    with pytest.raises(SystemExit, match="expected NAME or NAME:key=value"):
        main(["synthetic", "--trainers", "TopKTrainer:0.1"])


def test_the_synthetic_command_reads_variants_in_the_trainer_option_s_syntax():
    from dictionary_learning.cli import synthetic_recipes
    from dictionary_learning.synthetic_bench import recipe_label

    recipes = synthetic_recipes("TopKTrainer, TopKTrainer:encoder_init_norm=0.1,0.3,optimizer_name=adam,signum,"
                                "BatchTopKTrainer:group_fractions=[0.5,0.5],MatchingPursuitTrainer")  # fmt: skip
    assert [recipe_label(r) for r in recipes] == [
        "TopKTrainer",
        "TopKTrainer:encoder_init_norm=0.1,optimizer_name=adam",
        "TopKTrainer:encoder_init_norm=0.1,optimizer_name=signum",
        "TopKTrainer:encoder_init_norm=0.3,optimizer_name=adam",
        "TopKTrainer:encoder_init_norm=0.3,optimizer_name=signum",
        "BatchTopKTrainer:group_fractions=[0.5,0.5]",
        "MatchingPursuitTrainer",
    ]
