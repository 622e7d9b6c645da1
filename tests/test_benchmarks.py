"""The step benchmark runs end to end on tiny synthetic data (ours only: the side venvs are optional)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
TINY = ["--batch", "64", "--dim", "16", "--dict-size", "64", "--k", "4", "--n-batches", "2", "--device", "cpu"]


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, str(SCRIPT), *TINY, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_step_benchmark_times_ours_and_our_dense_path_alternately():
    out = run("--trainers", "StandardTrainer", "--steps", "2", "--warmup", "1", "--dense", "--repeat", "2")
    assert "fastest of 2 process(es)" in out
    line = next(line for line in out.splitlines() if line.startswith("StandardTrainer"))
    assert re.search(r"ours +\d+\.\d+ s/step", line) and re.search(r"\| dense +\d+\.\d+ .* x\d+\.\d+", line), line


@pytest.mark.slow
def test_step_benchmark_run_mode_reports_quality_and_refuses_repeats():
    out = run("--trainers", "TopKTrainer", "--run", "3", "--run-batch", "32")
    assert re.search(r"sparse-dense \|dFVE\| \d\.\d{4} \|dL0\| \d+\.\d", out), out
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--run", "3", "--repeat", "2"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--repeat" in refused.stderr


@pytest.mark.slow
def test_step_benchmark_times_transcoders_and_crosscoders():
    names = "TopKTranscoder,TopKSkipTranscoder,BatchTopKCrossCoder,CrossCoder"
    out = run("--trainers", names, "--steps", "2", "--warmup", "1", "--dense")
    for name in names.split(","):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert re.search(r"ours +\d+\.\d+ s/step", line) and "| dense" in line, line


@pytest.mark.slow
def test_clt_decoder_benchmark_times_the_three_paths():
    script = SCRIPT.parent / "clt_decoder.py"
    tiny = ["--layers", "3", "--width", "16", "--latents", "32", "--k", "4", "--tokens", "64", "--repeats", "1"]
    out = subprocess.run([sys.executable, str(script), *tiny], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert all(re.search(rf"^{name} +\d+\.\d+ s", out.stdout, re.M) for name in ("dense", "padded", "ragged"))
