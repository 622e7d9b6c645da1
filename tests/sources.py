"""Every data source we ship, each as a small training run that a test can start, kill and resume
in a child process (`python sources.py NAME SAVE_DIR [--backup-steps N]`) or call in-process.
A source is built afresh for every run, seed left unset, as a user (or the CLI) builds it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tiny_models
import torch
from helpers import TEXTS, build_cache
from tiny_models import SENTENCES

from dictionary_learning import trainSAE
from dictionary_learning.buffer import ActivationBuffer, HeadActivationBuffer, PairedActivationBuffer
from dictionary_learning.e2e import E2EObjective, TokenBatches
from dictionary_learning.pytorch_buffer import ActivationBuffer as TorchActivationBuffer
from dictionary_learning.trainers import BatchTopKCrossCoderTrainer, StandardTrainer, TopKTrainer

STEPS = 24
D = 32
READ = dict(n_ctxs=6, ctx_len=16, refresh_batch_size=4, out_batch_size=24, loop=True)


def _topk(d: int = D, seed: int = 0) -> dict:
    return dict(trainer=TopKTrainer, activation_dim=d, dict_size=64, k=4, warmup_steps=2, threshold_start_step=4,
                seed=seed, device="cpu")  # fmt: skip


def _standard() -> dict:
    # resampling draws rows with torch's global generator: the resumed run must restore it too
    return dict(trainer=StandardTrainer, activation_dim=D, dict_size=64, warmup_steps=2, sparsity_warmup_steps=4,
                resample_steps=8, seed=1, device="cpu")  # fmt: skip


def build(name: str, work: Path) -> tuple[object, list[dict], dict]:
    """(data, trainer configs, trainSAE keywords) of the run called `name`; `work` holds files a
    source needs (a cache folder, built once)."""
    texts = list(SENTENCES)
    if name == "buffer":
        model = tiny_models.gpt_neox()
        return ActivationBuffer(texts, model, model.gpt_neox.layers[1], **READ), [_topk(), _standard()], {}
    if name == "torch_buffer":
        model = tiny_models.llama()
        hf, tok = model._module, model.tokenizer
        return TorchActivationBuffer(texts, hf, hf.model.layers[1], tokenizer=tok, **READ), [_topk()], {}
    if name == "transcoder":
        model = tiny_models.gpt_neox()
        data = ActivationBuffer(texts, model, model.gpt_neox.layers[1].mlp, io="in_and_out", **READ)
        return data, [_topk()], {"transcoder": True}
    if name == "stacked":
        model = tiny_models.gpt_neox()
        sites = [model.gpt_neox.layers[0], model.gpt_neox.layers[1]]
        data = ActivationBuffer(texts, model, sites, stack_sites=True, **READ)
        return data, [_crosscoder(2)], {}
    if name == "paired":
        base, tuned = tiny_models.gpt_neox(seed=0), tiny_models.gpt_neox(seed=1)
        data = PairedActivationBuffer(texts, base, tuned, base.gpt_neox.layers[1], **READ)
        return data, [_crosscoder(2)], {}
    if name == "heads":
        model = tiny_models.gpt_neox()
        data = HeadActivationBuffer(texts, model, 1, **READ)  # 4 heads of width 8
        return data, [_topk(8), _topk(8, seed=1)], {"activations_split_by_head": True}
    if name == "cache":
        folder = work / "cache"
        if not (folder / "manifest.json").exists():
            build_cache(folder, n_tokens=2000, data=TEXTS * 4)
        from dictionary_learning.cache import ActivationCache

        return ActivationCache(folder, batch_size=24, loop=True), [_topk(), _standard()], {}
    if name == "tokens":
        model = tiny_models.gpt_neox()
        e2e = E2EObjective(model, model.gpt_neox.layers[1], kl_weight=1.0, local_weight=0.5)
        data = TokenBatches(texts * 4, model, batch_size=2, ctx_len=16)
        return data, [_topk()], {"e2e": e2e}
    if name == "activault":  # the bucket test_activault.py fills on a local S3 server ($DL_TEST_S3_ENDPOINT)
        import os

        from dictionary_learning.activault_s3_buffer import ActivaultS3ActivationBuffer, S3RCache, create_s3_client

        client = create_s3_client("testing", "testing", endpoint_url=os.environ["DL_TEST_S3_ENDPOINT"])
        cache = S3RCache(client, "resume/layer3", bucket_name="acts", shuffle=False)  # the buffer shuffles
        return ActivaultS3ActivationBuffer(cache, batch_size=16), [_topk(16)], {}
    if name == "tensors":
        generator = torch.Generator().manual_seed(5)
        return [torch.randn(24, D, generator=generator) for _ in range(STEPS)], [_topk(), _standard()], {}
    raise ValueError(f"no source {name!r}")


SOURCES = ["buffer", "torch_buffer", "transcoder", "stacked", "paired", "heads", "cache", "tokens", "tensors"]


def _crosscoder(sites: int) -> dict:
    return dict(trainer=BatchTopKCrossCoderTrainer, activation_dim=D, num_layers=sites, dict_size=64, k=4,
                warmup_steps=2, threshold_start_step=4, seed=0, device="cpu")  # fmt: skip


def stop_child_mid_run(
    name: str, work: Path, run: Path, how: str, tmp_path: Path, cli: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Start the run `name` in a child, then stop it from outside: `kill -9` once step 13 is done
    (backups every 4 steps: the last is step 12's), or SIGTERM after step 9 (no backup until then).
    With `cli`, the child runs the command line `train` with these arguments (and --backup-steps)."""
    backup = ["4"] if how == "kill -9" else []
    argv = (
        [name, str(work), str(run), *backup]
        if cli is None
        else ["cli", *cli, *(["--backup-steps", *backup] if backup else [])]
    )
    err = open(tmp_path / "child.err", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "sources.py"), *argv],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=Path(__file__).parent,
    )  # fmt: skip
    last = "step 13" if how == "kill -9" else "step 9"
    for line in proc.stdout:
        if line.strip() == last:
            break
    else:
        proc.wait()
        raise AssertionError(
            f"the child ended early ({proc.returncode}): {(tmp_path / 'child.err').read_text()[-3000:]}"
        )
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=120)
    err.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", (tmp_path / "child.err").read_text())


@contextlib.contextmanager
def sigusr1_at_step(step: int, monkeypatch):
    """Within the block, the first trainer update of `step` sends this process SIGUSR1 (trainSAE then
    saves after the step and raises TrainingInterrupted)."""
    from dictionary_learning.trainers.trainer import SAETrainer

    update, sent = SAETrainer.update, []

    def signalled(self, at, *args, **kwargs):
        if at == step and not sent:
            sent.append(at)
            os.kill(os.getpid(), signal.SIGUSR1)
        return update(self, at, *args, **kwargs)

    monkeypatch.setattr(SAETrainer, "update", signalled)
    try:
        yield
    finally:
        monkeypatch.setattr(SAETrainer, "update", update)


def train(name: str, work: Path, save_dir: Path | None = None, resume: bool = False, **kwargs):
    """The run `name`: from the start, or (`resume`) from save_dir's last backup."""
    data, configs, options = build(name, work)
    if resume:
        configs = None
    return trainSAE(data, configs, STEPS, save_dir=save_dir, resume_from=save_dir if resume else None,
                    progress=False, **options, **kwargs)  # fmt: skip


if __name__ == "__main__":
    # The child: the run (`NAME WORK SAVE_DIR [BACKUP_STEPS]`, or `cli ARGS...` for the command line),
    # each step slowed and announced on stdout so that a kill lands mid-run.
    from dictionary_learning.trainers.trainer import SAETrainer

    update = SAETrainer.update

    def announced(self, step, *args, **kwargs):
        loss = update(self, step, *args, **kwargs)
        print(f"step {step}", flush=True)
        time.sleep(0.05)
        return loss

    SAETrainer.update = announced
    if sys.argv[1] == "cli":
        from dictionary_learning.cli import main

        main(sys.argv[2:])
    else:
        backup = int(sys.argv[4]) if len(sys.argv) > 4 else None
        train(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), backup_steps=backup)
