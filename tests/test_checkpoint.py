"""Checkpoint folders: the reference's files load with identical outputs; bad files fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import D, make_dictionary

from dictionary_learning import CheckpointError, get_nested_folders, load_dictionary
from dictionary_learning.checkpoint import atomic_torch_save, save_dictionary

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
REFERENCE_RUNS = {
    "standard": "AutoEncoder",
    "standard_april_new": "AutoEncoderNew",  # its config.json wrongly says "AutoEncoder" (reference bug)
    "gated": "GatedAutoEncoder",
    "p_anneal": "AutoEncoder",
    "gated_anneal": "GatedAutoEncoder",
    "top_k": "AutoEncoderTopK",
    "batch_top_k": "BatchTopKSAE",
    "matryoshka": "MatryoshkaBatchTopKSAE",
    "jump_relu": "JumpReluAutoEncoder",
}


@pytest.mark.parametrize("run", sorted(REFERENCE_RUNS))
def test_folders_written_by_reference_trainsae_load_with_identical_outputs(run):
    folder = FIXTURES / run / "trainer_0"
    ae, config = load_dictionary(folder)
    assert type(ae).__name__ == REFERENCE_RUNS[run]
    assert config["trainer"]["lm_name"] == "tiny"
    expected = torch.load(folder / "expected.pt", weights_only=True)
    with torch.no_grad():
        x_hat, f = ae(expected["x"], output_features=True)
    torch.testing.assert_close(x_hat, expected["x_hat"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f, expected["f"], rtol=1e-5, atol=1e-6)


def test_published_pythia_layout_without_dict_class_is_inferred_from_keys():
    folder = FIXTURES / "legacy_10_32768"
    assert "trainer" not in json.loads((folder / "config.json").read_text())
    ae, config = load_dictionary(folder)
    assert type(ae).__name__ == "AutoEncoder"
    assert config["lm_name"] == "EleutherAI/pythia-70m-deduped"
    expected = torch.load(folder / "expected.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(ae(expected["x"]), expected["x_hat"], rtol=1e-5, atol=1e-6)


def test_reference_backup_file_loads_at_raw_scale(tmp_path):
    """The reference's backup_steps overwrite ae.pt with {"ae": normalised weights, ...}."""
    ae = make_dictionary("AutoEncoderTopK")
    norm_factor = 2.0
    torch.save(
        {
            "step": 5,
            "ae": ae.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "config": {"k": 4},
            "norm_factor": norm_factor,
        },
        tmp_path / "ae.pt",
    )
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "k": 4}}))
    loaded, _ = load_dictionary(tmp_path)
    x = torch.randn(6, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ae(x / norm_factor) * norm_factor, rtol=1e-5, atol=1e-5)


def test_get_nested_folders_finds_checkpoint_folders(tmp_path):
    for sub in ("a/trainer_0", "a/trainer_1", "b/x/10_32768"):
        save_dictionary(make_dictionary("AutoEncoder"), tmp_path / sub)
    (tmp_path / "empty").mkdir()
    folders = get_nested_folders(tmp_path)
    assert all(isinstance(p, str) for p in folders)  # the reference's type: scripts do folder + "/ae.pt"
    assert [Path(p).relative_to(tmp_path).as_posix() for p in folders] == [
        "a/trainer_0",
        "a/trainer_1",
        "b/x/10_32768",
    ]


def test_device_and_dtype_arguments(tmp_path):
    save_dictionary(make_dictionary("JumpReluAutoEncoder"), tmp_path)
    ae, _ = load_dictionary(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert ae.W_enc.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------- bad input
class _Exploit:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"bias": torch.zeros(2), "payload": _Exploit()}, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=r"ae\.pt holds pickled Python objects.*run code"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    save_dictionary(make_dictionary("AutoEncoder"), tmp_path, safetensors=(suffix == "safetensors"))
    path = tmp_path / f"ae.{suffix}"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"ae\.{suffix} is (corrupted or )?truncated"):
        load_dictionary(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no weights: expected one of ae.safetensors, ae.pt"):
        load_dictionary(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dictionary(tmp_path / "nope")


def test_unknown_architecture(tmp_path):
    torch.save({"W_foo": torch.zeros(3, 3)}, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=r"ae\.pt: keys \['W_foo'\] match no known dictionary architecture"):
        load_dictionary(tmp_path)


def test_unknown_dict_class_in_config(tmp_path):
    save_dictionary(make_dictionary("AutoEncoder"), tmp_path, config={"trainer": {"dict_class": "HyperCoder"}})
    with pytest.raises(CheckpointError, match="dict_class 'HyperCoder'"):
        load_dictionary(tmp_path)


def test_shape_that_disagrees_with_config(tmp_path):
    save_dictionary(
        make_dictionary("AutoEncoder"),
        tmp_path,
        config={"trainer": {"dict_class": "AutoEncoder", "activation_dim": D, "dict_size": 999}},
    )
    with pytest.raises(CheckpointError, match="config.json says dict_size=999 but the weights have dict_size=32"):
        load_dictionary(tmp_path)


def test_inconsistent_shapes_inside_the_state_dict(tmp_path):
    sd = make_dictionary("AutoEncoder").state_dict()
    sd["bias"] = torch.zeros(D + 3)
    torch.save(sd, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=r"ae\.pt: cannot load into AutoEncoder: .*size mismatch"):
        load_dictionary(tmp_path)


def test_invalid_config_json(tmp_path):
    save_dictionary(make_dictionary("AutoEncoder"), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_dictionary(tmp_path)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_dictionary(tmp_path)


def test_interrupted_atomic_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ae.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": torch.zeros(3), "b": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ae.pt"]  # no temporary left behind


def test_copied_fixture_folder_still_loads(tmp_path):
    shutil.copytree(FIXTURES / "top_k" / "trainer_0", tmp_path / "copy")
    ae, _ = load_dictionary(tmp_path / "copy")
    assert float(ae.threshold) > 0  # the reference saved a trained, rescaled threshold
