"""trainSAE: layout, normalisation folding, resume, interruption, logging and bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import CONFIGS, STEPS, CountingData, assert_same_weights, batches, resume_state, weights

from dictionary_learning import load_dictionary, trainSAE
from dictionary_learning.training import get_norm_factor


def test_layout_configs_and_returned_dictionaries(tmp_path):
    configs = [dict(c) for c in CONFIGS]
    snapshot = [dict(c) for c in configs]
    dicts = trainSAE(batches(), configs, STEPS, save_dir=tmp_path, save_steps=[0, 30], progress=False)
    assert configs == snapshot  # the caller's dicts are not mutated
    assert len(dicts) == 4
    for i, ae in enumerate(dicts):
        folder = tmp_path / f"trainer_{i}"
        config = json.loads((folder / "config.json").read_text())
        assert config["trainer"]["trainer_class"] == CONFIGS[i]["trainer"].__name__
        assert config["trainer"]["steps"] == STEPS and config["library"]["name"] == "dictionary_learning"
        loaded, _ = load_dictionary(folder)
        x = next(batches(1))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ae(x))
        for step in (0, 30):
            ckpt, _ = load_dictionary(folder / "checkpoints" / f"ae_{step}.pt")
            assert type(ckpt) is type(ae)
        assert (folder / f"resume_{STEPS}.pt").is_file()
    assert json.loads((tmp_path / "resume.json").read_text())["next_step"] == STEPS


def test_normalisation_is_folded_into_saved_and_returned_weights(tmp_path):
    data = CountingData(STEPS)
    folded = trainSAE(data, CONFIGS, STEPS, normalize_activations=True, save_dir=tmp_path, progress=False)
    assert data.drawn == STEPS  # the norm-factor batches are trained on, and no extra batch is drawn
    s = get_norm_factor(list(batches(10)))
    config = json.loads((tmp_path / "trainer_0" / "config.json").read_text())
    assert config["trainer"]["norm_factor"] == pytest.approx(s)
    plain = trainSAE((x / s for x in batches()), CONFIGS, STEPS, progress=False)
    x = next(batches(1, scale=7.0))
    for i, (a, b) in enumerate(zip(folded, plain)):
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x / s) * s, rtol=1e-4, atol=1e-4)
            loaded, _ = load_dictionary(tmp_path / f"trainer_{i}")
            torch.testing.assert_close(loaded(x), a(x), rtol=1e-5, atol=1e-5)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    full = weights(trainSAE(batches(), CONFIGS, STEPS, normalize_activations=True, progress=False))

    def crashing():
        for i, x in enumerate(batches()):
            if i == 43:
                raise RuntimeError("simulated crash")
            yield x

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainSAE(
            crashing(), CONFIGS, STEPS, save_dir=tmp_path, backup_steps=20, normalize_activations=True, progress=False
        )
    assert resume_state(tmp_path)["next_step"] == 40
    load_dictionary(tmp_path / "trainer_0")  # the crashed run's latest weights are a normal checkpoint
    resumed = weights(trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False))
    assert_same_weights(full, resumed)
    assert_same_weights(resumed, weights(load_dictionary(tmp_path / f"trainer_{i}")[0] for i in range(4)), atol=1e-5)


def test_ctrl_c_saves_a_resumable_state(tmp_path):
    full = weights(trainSAE(batches(), CONFIGS, STEPS, progress=False))

    def interrupted():
        for i, x in enumerate(batches()):
            if i == 25:
                os.kill(os.getpid(), signal.SIGINT)
            yield x

    with pytest.raises(KeyboardInterrupt):
        trainSAE(interrupted(), CONFIGS, STEPS, save_dir=tmp_path, progress=False)
    assert resume_state(tmp_path)["next_step"] == 26
    resumed = weights(trainSAE(batches(), CONFIGS, STEPS, resume_from=tmp_path, progress=False))
    assert_same_weights(full, resumed)


def test_resume_refuses_a_different_config(tmp_path):
    trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path, progress=False)
    changed = [dict(CONFIGS[0], k=5)]
    with pytest.raises(ValueError, match=r"trainer 0's config differs from the saved run in \['k'\]"):
        trainSAE(batches(), changed, STEPS, resume_from=tmp_path, progress=False)


def test_logging_does_not_change_training():
    quiet = weights(trainSAE(batches(), CONFIGS, STEPS, progress=False))
    chatty = weights(trainSAE(batches(), CONFIGS, STEPS, log_steps=1, verbose=True, progress=True))
    assert_same_weights(quiet, chatty)


def test_nan_batches_are_skipped_and_counted(caplog):
    def with_nan():
        for i, x in enumerate(batches(STEPS + 2)):
            if i in (3, 17):
                x = x.clone()
                x[0, 0] = float("nan") if i == 3 else float("inf")
            yield x

    dicts = trainSAE(with_nan(), CONFIGS, STEPS, progress=False)
    assert all(torch.isfinite(p).all() for d in dicts for p in d.parameters())
    assert "2 batches with NaN/Inf activations were skipped" in caplog.text


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="data yielded no batches"):
        trainSAE(iter([]), CONFIGS, STEPS, save_dir=tmp_path / "a", progress=False)
    with pytest.raises(
        ValueError,
        match=r"trainer 0: TopKTrainer takes \[B, 32\].*\[8, 16\]: the width 16 .*activation_dim=32",
    ):
        trainSAE([torch.randn(8, 16)], CONFIGS, STEPS, save_dir=tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="unknown config keys 'dict_sise'"):
        trainSAE(batches(), [dict(CONFIGS[0], dict_sise=3)], STEPS, save_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="warmup_steps=1000 takes more than half of the 60-step run"):
        trainSAE(batches(), [dict(CONFIGS[0], warmup_steps=1000)], STEPS, progress=False)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_bf16_autocast_keeps_fp32_master_weights():
    dicts = trainSAE(batches(), CONFIGS, STEPS, autocast_dtype=torch.bfloat16, progress=False)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for d in dicts for p in d.parameters())


def test_short_data_stops_early_with_a_warning(caplog, tmp_path):
    dicts = trainSAE(batches(10), CONFIGS[:1], STEPS, save_dir=tmp_path / "short", progress=False)
    assert len(dicts) == 1 and "data ran out after 10 of 60 steps" in caplog.text
    record = json.loads((tmp_path / "short" / "trainer_0" / "config.json").read_text())
    assert record["steps_trained"] == 10 and record["trainer"]["steps"] == STEPS  # trained vs scheduled
    assert load_dictionary(tmp_path / "short" / "trainer_0")[0] is not None  # checksums still recorded
    trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path / "full", progress=False)
    assert json.loads((tmp_path / "full" / "trainer_0" / "config.json").read_text())["steps_trained"] == STEPS


def test_verbose_without_log_steps_and_backups_without_normalisation(tmp_path, capsys):
    """Reference bugs: log_steps=None crashed with verbose; backup_steps without normalisation raised."""
    trainSAE(batches(), CONFIGS[:2], STEPS, verbose=True, backup_steps=10, save_dir=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "step 0 trainer 1: L0 = " in out and "frac_variance_explained" in out
    state = resume_state(tmp_path)
    assert state["next_step"] == STEPS and state["norm_factor"] is None
    assert load_dictionary(tmp_path / "trainer_0")[1]["trainer"]["trainer_class"] == "TopKTrainer"


def test_wandb_logs_one_run_per_trainer_with_steps(monkeypatch):
    import sys
    import types

    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, record, step):
            self.logged.append((step, record))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    trainSAE(
        batches(),
        CONFIGS[:2],
        STEPS,
        use_wandb=True,
        wandb_project="p",
        log_steps=20,
        run_cfg={"note": "x"},
        progress=False,
    )
    assert [r.kwargs["name"] for r in runs] == ["AutoEncoderTopK_trainer_0", "StandardTrainer_trainer_1"]
    assert runs[0].kwargs["config"]["note"] == "x" and runs[0].kwargs["project"] == "p"
    assert [step for step, _ in runs[1].logged] == [0, 20, 40]
    assert "frac_variance_explained" in runs[1].logged[0][1] and all(r.finished for r in runs)


def test_a_warmup_that_does_not_fit_a_short_run_is_fitted_with_a_note_or_refused_when_set(tmp_path, caplog):
    unset = {k: v for k, v in CONFIGS[0].items() if k not in ("warmup_steps", "threshold_start_step")}
    trainSAE(batches(), [unset], STEPS, save_dir=tmp_path / "a", progress=False)
    assert "TopKTrainer: a 60-step run: warmup_steps 1000 -> 3, threshold_start_step 1000 -> 6" in caplog.text
    assert "threshold_beta 0.999 -> 0.8148" in caplog.text  # a memory of 54 / 10 steps, not 1,000
    trainer = json.loads((tmp_path / "a" / "trainer_0" / "config.json").read_text())["trainer"]
    assert (trainer["warmup_steps"], trainer["threshold_start_step"], trainer["threshold_beta"]) == (3, 6, 0.8148)
    trainSAE(batches(), None, STEPS, resume_from=tmp_path / "a", progress=False)  # the same fitted values
    with pytest.raises(ValueError, match=r"TopKTrainer: warmup_steps=31 takes more than half .* warmup_steps=6"):
        trainSAE(batches(), [dict(unset, warmup_steps=31)], STEPS, progress=False)
    with pytest.raises(ValueError, match=r"sparsity_warmup_steps=40 takes more than half of the 60-step run"):
        trainSAE(batches(), [dict(CONFIGS[1], sparsity_warmup_steps=40)], STEPS, progress=False)
    trainSAE(batches(), [dict(unset, warmup_steps=30)], STEPS, progress=False)  # half the run: allowed
