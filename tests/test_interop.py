"""SAELens and sparsify folders: fixtures written by the real packages load with their outputs, our
dictionaries round-trip through both formats, and bad folders fail with errors naming the field.

With `DL_SAELENS_PYTHON` pointing at a venv holding sae-lens and eai-sparsify (CI builds one with
tools/setup_saelens_venv.sh), the real `sae_lens` and `sparsify` also load what we export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomized
from safetensors.torch import load_file, save_file

from dictionary_learning import load_dictionary
from dictionary_learning.checkpoint import CheckpointError
from dictionary_learning.dictionaries import (
    AbsTopKSAE,
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
    MatchingPursuitSAE,
    MatryoshkaBatchTopKSAE,
)
from dictionary_learning.interop import load_saelens, load_sparsify, save_saelens, save_sparsify

FIXTURES = Path(__file__).parent / "fixtures"
SAELENS_CASES = sorted(p.name for p in (FIXTURES / "saelens").iterdir() if p.is_dir())
EXPECTED_CLASS = {
    "standard": AutoEncoder,
    "standard_no_b_dec_in": AutoEncoderNew,
    "gated_no_b_dec_in": GatedAutoEncoder,
    "jumprelu": JumpReluAutoEncoder,
    "jumprelu_no_b_dec_in": JumpReluAutoEncoder,
    "topk": AutoEncoderTopK,
    "topk_rescaled_no_b_dec_in": AutoEncoderTopK,
    "batchtopk_training": BatchTopKSAE,
}
D, F = 8, 16


def _outputs(ae, x):
    with torch.no_grad():
        return ae.encode(x), ae(x)


def _random(cls):
    torch.manual_seed(0)
    ae = {
        AutoEncoderTopK: lambda: cls(D, F, 3),
        BatchTopKSAE: lambda: cls(D, F, 3),
        AbsTopKSAE: lambda: cls(D, F, 3),
        MatchingPursuitSAE: lambda: cls(D, F, 3),
        MatryoshkaBatchTopKSAE: lambda: cls(D, F, 3, [4, 12]),
    }.get(cls, lambda: cls(D, F))()
    return randomized(ae)


def test_every_saelens_fixture_has_an_expectation():
    assert set(SAELENS_CASES) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_saelens_folders_load_with_saelens_outputs(case):
    folder = FIXTURES / "saelens" / case
    expected = load_file(str(folder / "expected.safetensors"))
    ae, cfg = load_dictionary(folder)  # found by its files, no sae_lens needed
    assert type(ae) is EXPECTED_CLASS[case] and cfg["architecture"] in case
    feats, out = _outputs(ae, expected["x"])
    torch.testing.assert_close(feats, expected["feature_acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected["sae_out"], rtol=1e-5, atol=1e-5)


def test_sparsify_folder_loads_with_sparsify_outputs():
    folder = FIXTURES / "sparsify" / "topk"
    expected = load_file(str(folder / "expected.safetensors"))
    ae, cfg = load_dictionary(folder)
    assert type(ae) is AutoEncoderTopK and ae.active_k == cfg["k"] == 3
    feats, out = _outputs(ae, expected["x"])
    torch.testing.assert_close(feats, expected["feature_acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected["sae_out"], rtol=1e-5, atol=1e-5)


ROUND_TRIP = [
    *(AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE),
    *(AbsTopKSAE, MatchingPursuitSAE),
]


@pytest.mark.parametrize("cls", ROUND_TRIP, ids=lambda c: c.__name__)
def test_ours_to_saelens_to_ours_is_exact(cls, tmp_path):
    ae = _random(cls)
    save_saelens(ae, tmp_path, metadata={"model_name": "tiny", "hook_name": "blocks.0"})
    back, cfg = load_saelens(tmp_path)
    assert cfg["metadata"]["hook_name"] == "blocks.0"
    x = torch.randn(32, D)
    for a, b in zip(_outputs(ae, x), _outputs(back, x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_matryoshka_exports_as_its_threshold_inference(tmp_path):
    ae = _random(MatryoshkaBatchTopKSAE)
    save_saelens(ae, tmp_path)
    back, _ = load_saelens(tmp_path)
    assert type(back) is JumpReluAutoEncoder
    x = torch.randn(32, D)
    for a, b in zip(_outputs(ae, x), _outputs(back, x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_saelens_to_ours_to_saelens_keeps_outputs(case, tmp_path):
    ae, _ = load_dictionary(FIXTURES / "saelens" / case)
    save_saelens(ae, tmp_path / "out")
    again, _ = load_dictionary(tmp_path / "out")
    expected = load_file(str(FIXTURES / "saelens" / case / "expected.safetensors"))
    torch.testing.assert_close(_outputs(again, expected["x"])[1], expected["sae_out"], rtol=1e-5, atol=1e-5)


def test_sparsify_round_trip(tmp_path):
    ae = _random(AutoEncoderTopK)
    save_sparsify(ae, tmp_path)
    back, _ = load_sparsify(tmp_path)
    x = torch.randn(32, D)
    torch.testing.assert_close(_outputs(ae, x)[1], _outputs(back, x)[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="TopK SAEs only"):
        save_sparsify(_random(AutoEncoder), tmp_path / "no")


def test_unexported_threshold_is_refused(tmp_path):
    ae = BatchTopKSAE(D, F, 3)  # threshold still -1: never estimated
    with pytest.raises(ValueError, match="threshold_start_step"):
        save_saelens(ae, tmp_path)


# ------------------------------------------------------------------------------------- bad folders
def _copy_case(case: str, tmp_path: Path) -> Path:
    folder = tmp_path / case
    shutil.copytree(FIXTURES / "saelens" / case, folder)
    return folder


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"architecture": "temporal"}, "architecture 'temporal' is not supported"),
        ({"d_sae": 32}, "'W_enc' has shape"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"activation_fn": "tanh"}, "activation_fn='tanh'"),
        ({"k": 0}, "k=0"),
    ],
)
def test_bad_saelens_config_names_the_field(tmp_path, changes, message):
    folder = _copy_case("topk", tmp_path)
    _edit_cfg(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_dictionary(folder)


def test_missing_or_truncated_saelens_weights(tmp_path):
    folder = _copy_case("jumprelu", tmp_path)
    state = load_file(str(folder / "sae_weights.safetensors"))
    del state["threshold"]
    save_file(state, str(folder / "sae_weights.safetensors"))
    with pytest.raises(CheckpointError, match="no 'threshold'"):
        load_dictionary(folder)
    data = (FIXTURES / "saelens" / "jumprelu" / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_dictionary(folder)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"activation": "groupmax"}, "activation='groupmax'"),
        ({"skip_connection": True}, "skip_connection=True"),
        ({"transcode": True}, "transcode=True"),
        ({"d_in": 9}, "'encoder.weight' has shape"),
    ],
)
def test_bad_sparsify_config_names_the_field(tmp_path, changes, message):
    folder = tmp_path / "topk"
    shutil.copytree(FIXTURES / "sparsify" / "topk", folder)
    _edit_cfg(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_dictionary(folder)


# --------------------------------------------------------------------- sae_lens.from_pretrained route
class _FakeSAE:
    """Stands in for `sae_lens.SAE`: `from_pretrained` reads a fixture folder instead of the Hub."""

    calls: list = []

    def __init__(self, cfg, state):
        self.cfg, self._state = cfg, state

    @classmethod
    def from_pretrained(cls, release, sae_id, device="cpu", **kwargs):
        cls.calls.append((release, sae_id))
        folder = FIXTURES / "saelens" / "jumprelu_no_b_dec_in"
        return cls(json.loads((folder / "cfg.json").read_text()), load_file(str(folder / "sae_weights.safetensors")))

    def state_dict(self):
        return self._state


def test_jumprelu_from_sae_lens_release(monkeypatch):
    import types

    fake = types.ModuleType("sae_lens")
    fake.SAE = _FakeSAE
    monkeypatch.setitem(sys.modules, "sae_lens", fake)
    ae = JumpReluAutoEncoder.from_pretrained(
        load_from_sae_lens=True, release="gemma-scope-2b-pt-res", sae_id="layer_0/width_16k/average_l0_105"
    )
    assert _FakeSAE.calls[-1] == ("gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105")
    expected = load_file(str(FIXTURES / "saelens" / "jumprelu_no_b_dec_in" / "expected.safetensors"))
    torch.testing.assert_close(_outputs(ae, expected["x"])[1], expected["sae_out"], rtol=1e-5, atol=1e-5)


def test_jumprelu_from_sae_lens_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install sae-lens"):
        JumpReluAutoEncoder.from_pretrained(load_from_sae_lens=True, release="r", sae_id="s")


# ----------------------------------------------------------------- the real libraries load our files
SIDE_PYTHON = os.environ.get("DL_SAELENS_PYTHON")
CHECK_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file
from sae_lens import SAE
from sparsify import SparseCoder
out = {}
for folder in sys.argv[1:]:
    x = load_file(folder + "/input.safetensors")["x"]
    with torch.no_grad():
        if folder.endswith("sparsify"):
            sae = SparseCoder.load_from_disk(folder)
            enc = sae.encode(x)
            y = sae.decode(enc.top_acts, enc.top_indices)
        else:
            y = SAE.load_from_disk(folder)(x)
    out[folder] = y.tolist()
print(json.dumps(out))
"""


def test_abstopk_codes_are_signed_and_matching_pursuit_early_stopping_is_refused(tmp_path):
    ae = _random(AbsTopKSAE)
    f = ae.encode(torch.randn(64, D))
    assert (f < 0).any() and (f > 0).any() and ((f != 0).sum(-1) == 3).all()
    mp = _random(MatchingPursuitSAE)
    save_saelens(mp, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["max_iterations"], cfg["residual_threshold"], cfg["stop_on_duplicate_support"]) == (3, 0.0, False)
    cfg["residual_threshold"] = 0.01  # SAELens's default: stops when the residual is small, no fixed k
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="runs exactly k steps: set residual_threshold=0"):
        load_saelens(tmp_path)


@pytest.mark.skipif(not SIDE_PYTHON, reason="set DL_SAELENS_PYTHON to a venv with sae-lens and eai-sparsify")
def test_real_sae_lens_and_sparsify_load_our_exports(tmp_path):
    x = torch.randn(16, D)
    expected = {}
    for cls in [*ROUND_TRIP, MatryoshkaBatchTopKSAE]:
        ae = _random(cls)
        folder = tmp_path / cls.__name__
        save_saelens(ae, folder)
        save_file({"x": x}, str(folder / "input.safetensors"))
        expected[str(folder)] = _outputs(ae, x)[1]
    folder = tmp_path / "topk_sparsify"
    save_sparsify(_random(AutoEncoderTopK), folder)
    save_file({"x": x}, str(folder / "input.safetensors"))
    expected[str(folder)] = _outputs(_random(AutoEncoderTopK), x)[1]
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    run = subprocess.run(
        [SIDE_PYTHON, str(script), *expected], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for folder, want in expected.items():
        torch.testing.assert_close(torch.tensor(got[folder]), want, rtol=1e-5, atol=1e-5, msg=folder)
