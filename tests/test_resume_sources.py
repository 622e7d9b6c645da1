"""Exact resume from every data source we ship: a real child process is stopped from outside
(kill -9 after a backup, or SIGTERM mid-step), the run is resumed here, and its weights must equal
an uninterrupted run's bit for bit. Sources are built as a user builds them, with no seed: the
shuffle each one owns is saved in the backup and given back on resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import sources
import torch
from helpers import assert_same_weights, weights
from sources import sigusr1_at_step, stop_child_mid_run

from dictionary_learning import TrainingInterrupted, trainSAE
from dictionary_learning.buffer import ActivationBuffer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def uninterrupted(work):
    runs: dict[str, list] = {}

    def get(name: str) -> list:
        if name not in runs:
            runs[name] = weights(sources.train(name, work))
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
@pytest.mark.parametrize("name", sources.SOURCES)
def test_a_run_stopped_from_outside_resumes_to_the_uninterrupted_weights(name, how, work, uninterrupted, tmp_path):
    run = tmp_path / "run"
    child = stop_child_mid_run(name, work, run, how, tmp_path)
    stopped_at = json.loads((run / "resume.json").read_text())["next_step"]
    if how == "kill -9":
        assert child.returncode == -signal.SIGKILL and stopped_at == 12
    else:
        assert child.returncode != 0 and "training stopped by SIGTERM" in child.stderr
        assert 10 <= stopped_at < sources.STEPS
    resumed = weights(sources.train(name, work, run, resume=True))
    assert_same_weights(uninterrupted(name), resumed)


# ------------------------------------------------------------------------------ what resume refuses
def test_a_resume_with_other_data_settings_is_refused_naming_them(work, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        with sigusr1_at_step(5, monkeypatch):
            sources.train("buffer", work, run)
    data, _, _ = sources.build("buffer", work)
    data.out_batch_size = 12
    with pytest.raises(ValueError, match=r"data source differs .*out_batch_size: 24 then, 12 now"):
        trainSAE(data, None, sources.STEPS, resume_from=run, progress=False)


def test_the_buffer_seed_is_recorded_and_given_back(work, tmp_path):
    run = tmp_path / "run"
    sources.train("buffer", work, run)
    seed = json.loads((run / "trainer_0" / "config.json").read_text())["buffer"]["seed"]
    assert isinstance(seed, int)
    data, _, _ = sources.build("buffer", work)
    data.load_state_dict({"seed": seed})
    assert data.seed == seed
    next(data)
    with pytest.raises(ValueError, match="needs an unread buffer"):
        data.load_state_dict({"seed": seed})


def test_two_unseeded_buffers_in_one_seeded_program_shuffle_alike_and_a_seed_fixes_the_order():
    import tiny_models

    model = tiny_models.gpt_neox()
    make = lambda **kw: ActivationBuffer(list(sources.SENTENCES), model, model.gpt_neox.layers[1], **sources.READ, **kw)  # noqa: E731
    torch.manual_seed(3)
    a = next(make())
    torch.manual_seed(3)
    b = next(make())
    assert torch.equal(a, b)
    assert torch.equal(next(make(seed=7)), next(make(seed=7)))


# ------------------------------------------------------------------------------- the command line
CLI_RUNS = {
    "buffer": ["--layer", "1", "--trainer", "TopKTrainer:k=4", "--trainer", "StandardTrainer:resample_steps=8"],
    "transcoder": ["--layer", "1", "--transcoder", "--trainer", "TopKTrainer:k=4"],
    "crosscoder": ["--layer", "0", "1", "--crosscoder", "--trainer", "BatchTopKCrossCoderTrainer:k=4"],
    "cache": ["--cache", "CACHE", "--trainer", "TopKTrainer:k=4"],
    "e2e": ["--layer", "1", "--e2e", "--trainer", "TopKTrainer:k=4"],
}


@pytest.fixture(scope="module")
def cli_work(tmp_path_factory):
    from helpers import tiny_cli_folder

    from dictionary_learning.cli import main

    work = tmp_path_factory.mktemp("cli")
    tiny = tiny_cli_folder(work)
    main(["cache", *tiny, "--layer", "1", "--tokens", "500", "--out", str(work / "cache")])
    return work, tiny


def cli_args(kind: str, work: Path, tiny: list[str], out: Path) -> list[str]:
    run = [str(work / "cache") if a == "CACHE" else a for a in CLI_RUNS[kind]]
    model = [] if kind == "cache" else tiny
    return ["train", *model, *run, "--set", "warmup_steps=2", "--steps", str(sources.STEPS), "--batch-size", "16",
            "--n-ctxs", "6", "--lm-batch-size", "4", "--loop", "--out", str(out)]  # fmt: skip


def cli_weights(out: Path) -> list[dict]:
    from dictionary_learning import load_dictionary

    return [load_dictionary(folder)[0].state_dict() for folder in sorted(out.glob("trainer_*"))]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, how", [(kind, "kill -9") for kind in CLI_RUNS] + [("buffer", "SIGTERM"), ("cache", "SIGTERM")]
)
def test_a_command_line_run_stopped_from_outside_resumes_with_resume(kind, how, cli_work, tmp_path):
    from dictionary_learning.cli import main

    work, tiny = cli_work
    full, run = tmp_path / "full", tmp_path / "run"
    args = cli_args(kind, work, tiny, run)
    main(cli_args(kind, work, tiny, full))
    child = stop_child_mid_run(kind, work, run, how, tmp_path, cli=args)
    if how == "SIGTERM":
        assert child.returncode == 143 and "stopped: training stopped by SIGTERM" in child.stderr
    assert json.loads((run / "resume.json").read_text())["next_step"] < sources.STEPS
    main([*args, "--resume"])
    assert_same_weights(cli_weights(full), cli_weights(run))
