"""Faults a long run meets, and what each must end with: the same weights after a resume, or a
clear error naming the file and the fix. Crashes and signals are real processes killed from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, STEPS, assert_same_weights, batches, build_cache, weights

from dictionary_learning import (
    CheckpointError,
    FolderLockedError,
    NonFiniteTrainingError,
    TrainingInterrupted,
    load_dictionary,
    trainSAE,
)
from dictionary_learning.run import load_backup
from dictionary_learning.safe_io import LOCK_FILE, FolderLock

TESTS = Path(__file__).parent


def child(tmp_path: Path, body: str, *args: str) -> subprocess.Popen:
    """Start a Python process running `body` (with the tests folder importable); args in sys.argv."""
    script = tmp_path / f"child_{time.monotonic_ns()}.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(body))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.005)


def lock_holder(tmp_path: Path, folder: Path) -> subprocess.Popen:
    """A process that holds `folder`'s lock (as a cache build would) until it is killed."""
    proc = child(
        tmp_path,
        """
        import time
        from dictionary_learning.safe_io import FolderLock
        FolderLock(sys.argv[1], "cache build").acquire()
        print("locked", flush=True)
        time.sleep(600)
        """,
        str(folder),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture(scope="module")
def uninterrupted():
    return weights(trainSAE(batches(), CONFIGS, STEPS, progress=False))


# --------------------------------------------------------------------------------- crashes and signals
@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_backup_resumes_every_trainer_from_the_last_complete_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    # The child writes each trainer's resume file slowly, so the kill lands with trainer 0's new
    # state on disk and trainers 1-3's not yet written: the case that used to resume out of step.
    proc = child(
        tmp_path,
        """
        import time
        import dictionary_learning.run as run
        from dictionary_learning import trainSAE
        from helpers import CONFIGS, STEPS, batches

        write = run.atomic_torch_save
        def slow(obj, path):
            digest = write(obj, path)
            time.sleep(0.5)
            return digest
        run.atomic_torch_save = slow
        trainSAE(batches(), CONFIGS, STEPS, save_dir=sys.argv[1], backup_steps=20, progress=False)
        """,
        str(run),
    )
    wait_for(lambda: (run / "trainer_0" / "resume_40.pt").exists(), proc)
    proc.kill()  # SIGKILL from outside, during the backup of step 40
    proc.wait()
    assert not (run / "trainer_1" / "resume_40.pt").exists()
    assert json.loads((run / "resume.json").read_text())["next_step"] == 20  # the last complete backup
    assert {s["next_step"] for s in load_backup(run)} == {20}
    for i in range(len(CONFIGS)):
        load_dictionary(run / f"trainer_{i}")  # ae.pt of step 20: whole and checked
    resumed = weights(trainSAE(batches(), None, STEPS, resume_from=run, progress=False))
    assert_same_weights(uninterrupted, resumed)
    assert not (run / "trainer_0" / "resume_20.pt").exists()  # the superseded backup is gone
    assert not list(run.rglob(".*.tmp-*"))


def test_a_full_disk_during_a_backup_leaves_the_previous_backup_whole(tmp_path, monkeypatch, uninterrupted):
    import errno

    save = torch.save

    def disk_full_at_trainer_2(obj, path, *args, **kwargs):
        if "resume_40.pt" in str(path) and "trainer_2" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_trainer_2)
    with pytest.raises(OSError, match="No space left on device"):
        trainSAE(batches(), CONFIGS, STEPS, save_dir=tmp_path, backup_steps=20, progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "resume.json").read_text())["next_step"] == 20
    assert not list(tmp_path.rglob(".*.tmp-*"))  # the partial write was removed
    resumed = weights(trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False))
    assert_same_weights(uninterrupted, resumed)


def test_a_legacy_backup_whose_trainers_disagree_on_the_step_is_refused(tmp_path):
    trainSAE(batches(), CONFIGS[:2], STEPS, save_dir=tmp_path, progress=False)
    index = json.loads((tmp_path / "resume.json").read_text())
    for i, entry in enumerate(index["trainers"]):  # the layout of earlier versions: trainer_i/resume.pt
        state = torch.load(tmp_path / entry["file"], weights_only=True)
        state["next_step"] = 32 if i == 0 else 30
        torch.save(state, tmp_path / f"trainer_{i}" / "resume.pt")
        (tmp_path / entry["file"]).unlink()
    (tmp_path / "resume.json").unlink()
    with pytest.raises(CheckpointError, match=r"different steps \(\[32, 30\]\).*interrupted"):
        trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_with_a_message(tmp_path, uninterrupted):
    run, marker = tmp_path / "run", tmp_path / "step25"
    proc = child(
        tmp_path,
        """
        import time
        from pathlib import Path
        from dictionary_learning import trainSAE
        from helpers import CONFIGS, STEPS, batches

        def slow():
            for i, x in enumerate(batches()):
                if i == 25:
                    Path(sys.argv[2]).touch()
                if i >= 25:
                    time.sleep(0.3)
                yield x
        trainSAE(slow(), CONFIGS, STEPS, save_dir=sys.argv[1], progress=False)  # no backup_steps
        """,
        str(run),
        str(marker),
    )
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "training stopped by SIGTERM after step" in err and "resume_from" in err
    stopped_at = json.loads((run / "resume.json").read_text())["next_step"]
    assert 26 <= stopped_at < STEPS
    resumed = weights(trainSAE(batches(), None, STEPS, resume_from=run, progress=False))
    assert_same_weights(uninterrupted, resumed)


def test_sigusr1_stops_like_the_first_ctrl_c(tmp_path, uninterrupted):
    def signalled():
        for i, x in enumerate(batches()):
            if i == 12:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield x

    with pytest.raises(TrainingInterrupted, match="stopped by SIGUSR1 after step 13"):
        trainSAE(signalled(), CONFIGS, STEPS, save_dir=tmp_path, progress=False)
    resumed = weights(trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False))
    assert_same_weights(uninterrupted, resumed)


# ---------------------------------------------------------------------------------------- NaN and Inf
def test_nan_and_all_zero_batches_are_left_out_of_the_norm_factor(tmp_path):
    clean = list(batches(STEPS))
    dirty = [x.clone() for x in clean]
    dirty[2][5, 3] = float("nan")
    dirty.insert(4, torch.zeros_like(clean[0]))
    trainSAE(dirty, CONFIGS[:1], STEPS, normalize_activations=True, save_dir=tmp_path, progress=False)
    config = json.loads((tmp_path / "trainer_0" / "config.json").read_text())
    kept = [x for i, x in enumerate(clean[:9]) if i != 2]  # 10 batches drawn: one NaN, one zero left out
    expected = float(torch.cat(kept).pow(2).sum(-1).mean().sqrt())
    assert config["trainer"]["norm_factor"] == pytest.approx(expected, rel=1e-6)
    ae, _ = load_dictionary(tmp_path / "trainer_0")
    assert all(torch.isfinite(p).all() for p in ae.parameters())
    with pytest.raises(ValueError, match="cannot measure the activation norm factor: 10 of 10"):
        trainSAE([torch.zeros(8, 32)] * 20, CONFIGS[:1], STEPS, normalize_activations=True, progress=False)


def test_a_batch_of_extreme_values_stops_the_run_naming_the_step_and_keeps_the_last_good_backup(tmp_path):
    def data():
        for i, x in enumerate(batches()):
            yield x * 1e20 if i == 33 else x

    with pytest.raises(NonFiniteTrainingError, match=r"trainer 0 \(TopKTrainer\).*NaN/Inf at step 33.*after step 30"):
        trainSAE(data(), CONFIGS, STEPS, save_dir=tmp_path, backup_steps=10, progress=False)
    assert json.loads((tmp_path / "resume.json").read_text())["next_step"] == 30
    for i in range(len(CONFIGS)):
        ae, _ = load_dictionary(tmp_path / f"trainer_{i}")
        assert all(torch.isfinite(p).all() for p in ae.parameters())


def test_a_penalty_that_is_not_a_finite_number_is_refused_before_training():
    with pytest.raises(ValueError, match="l1_penalty=nan is not a finite number"):
        trainSAE(batches(), [dict(CONFIGS[1], l1_penalty=float("nan"))], STEPS, progress=False)


def test_nan_that_appears_inside_training_is_caught_at_its_step(tmp_path):
    config = dict(CONFIGS[1], lr=1e30)  # a finite but absurd learning rate overflows the weights
    with pytest.raises(NonFiniteTrainingError, match=r"trainer 0 \(StandardTrainer\): .*at step \d+"):
        trainSAE(batches(), [config], STEPS, save_dir=tmp_path, progress=False)
    assert not (tmp_path / "trainer_0" / "ae.pt").exists()  # nothing non-finite was written


def test_an_endless_all_nan_stream_stops_with_an_error():
    def endless():
        while True:
            yield torch.full((8, 32), float("nan"))

    with pytest.raises(ValueError, match="last 100 batches .* all held NaN/Inf"):
        trainSAE(endless(), CONFIGS[:1], STEPS, progress=False)


# ------------------------------------------------------------------------------------------ schedules
def test_resuming_with_more_steps_is_refused_with_the_way_forward(tmp_path):
    config = dict(CONFIGS[1], decay_start=40, resample_steps=None)
    trainSAE(batches(), [config], STEPS, save_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with steps=120: the run was started with steps=60.*"):
        trainSAE(batches(2 * STEPS), None, 2 * STEPS, resume_from=tmp_path, progress=False)


def test_no_schedule_gives_a_negative_learning_rate():
    from dictionary_learning.trainers.trainer import get_lr_schedule

    schedule = get_lr_schedule(100, 10, decay_start=50)
    assert [schedule(s) for s in (0, 5, 10, 50, 75, 100)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="asked for step 101, past the 100 steps"):
        schedule(101)


# ----------------------------------------------------------------------------------- one writer a folder
@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_owner(tmp_path):
    run = tmp_path / "run"
    proc = child(
        tmp_path,
        """
        import time
        from dictionary_learning import trainSAE
        from helpers import CONFIGS, STEPS, batches

        def slow():
            for x in batches():
                time.sleep(0.05)
                yield x
        trainSAE(slow(), CONFIGS, STEPS, save_dir=sys.argv[1], progress=False)
        """,
        str(run),
    )
    wait_for(lambda: (run / LOCK_FILE).exists() and (run / "trainer_0" / "config.json").exists(), proc)
    start = time.monotonic()
    with pytest.raises(FolderLockedError, match=rf"{run} is being written by another trainSAE run \(pid {proc.pid} "):
        trainSAE(batches(), CONFIGS, STEPS, save_dir=run, overwrite=True, progress=False)
    assert time.monotonic() - start < 5
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert json.loads((run / "resume.json").read_text())["next_step"] == STEPS  # the first run is intact
    assert not (run / LOCK_FILE).exists()
    load_dictionary(run / "trainer_3")


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = lock_holder(tmp_path, tmp_path / "folder")
    with pytest.raises(FolderLockedError, match=f"pid {proc.pid} on this host"):
        FolderLock(tmp_path / "folder").acquire()
    proc.kill()
    proc.wait()
    lock = FolderLock(tmp_path / "folder").acquire()
    assert f"pid {proc.pid}" in caplog.text and "taking over the lock" in caplog.text
    lock.release()


def test_a_folder_holding_another_run_is_refused_unless_overwrite(tmp_path):
    trainSAE(batches(), CONFIGS[:3], STEPS, save_dir=tmp_path, save_steps=[10], progress=False)
    with pytest.raises(FileExistsError, match=r"already holds a run .*trainer_0.*overwrite=True"):
        trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    trainSAE(batches(), CONFIGS[1:2], STEPS, save_dir=tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "resume.json", "trainer_0"]
    assert not (tmp_path / "trainer_0" / "checkpoints").exists()  # nothing of the old run is mixed in
    assert load_dictionary(tmp_path / "trainer_0")[1]["trainer"]["trainer_class"] == "StandardTrainer"


def test_temporaries_of_dead_writers_are_removed_when_the_folder_is_next_taken(tmp_path):
    trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / "trainer_0" / f".ae.pt.tmp-{int(dead.stdout)}-0123abcd"
    leftover.write_bytes(b"half a file")
    live = tmp_path / "trainer_0" / f".ae.pt.tmp-{os.getpid()}-0123abcd"
    live.write_bytes(b"being written")
    trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False)
    assert not leftover.exists() and live.exists()


# ------------------------------------------------------------------------------------------ files
def flip_a_bit(path: Path, at: float = 0.7) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file", ["trainer_0/ae.pt", "trainer_1/ae.safetensors", "trainer_0/checkpoints/ae_10.pt", "resume"]
)
def test_a_flipped_bit_in_any_file_we_write_is_named(tmp_path, file):
    trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path / "pt", save_steps=[10], progress=False)
    trainSAE(batches(), CONFIGS[:2], STEPS, save_dir=tmp_path / "st", safetensors=True, progress=False)
    run = tmp_path / ("st" if "safetensors" in file else "pt")
    path = run / (json.loads((run / "resume.json").read_text())["trainers"][0]["file"] if file == "resume" else file)
    flip_a_bit(path)
    with pytest.raises(CheckpointError, match=rf"{path} is corrupted"):
        if file == "resume":
            trainSAE(batches(), None, STEPS, resume_from=run, progress=False)
        else:
            load_dictionary(path if "checkpoints" in file else path.parent)


def test_a_flipped_bit_in_a_file_without_a_recorded_checksum_fails_its_crc(tmp_path):
    from dictionary_learning import AutoEncoder

    torch.save(AutoEncoder(32, 64).state_dict(), tmp_path / "ae.pt")  # as the reference writes it
    flip_a_bit(tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_damaged_resume_file_is_a_checkpoint_error_naming_it(tmp_path, damage):
    trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path, progress=False)
    path = tmp_path / "trainer_0" / f"resume_{STEPS}.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 100}[damage])
    with pytest.raises(CheckpointError, match=rf"{path}"):
        trainSAE(batches(), None, STEPS, resume_from=tmp_path, progress=False)


def test_a_kill_between_the_weights_and_their_recorded_checksum_leaves_a_loadable_folder(tmp_path, monkeypatch):
    from dictionary_learning import AutoEncoder, save_dictionary

    first, second = AutoEncoder(8, 16), AutoEncoder(8, 16)
    save_dictionary(first, tmp_path)
    replace = os.replace

    def die_on_the_weights(src, dst):
        if str(dst).endswith("ae.pt"):  # config.json already names the new checksum; ae.pt is the old file
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_the_weights)
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(second, tmp_path)
    monkeypatch.undo()
    assert "sha256_replaced" in json.loads((tmp_path / "config.json").read_text())
    ae, _ = load_dictionary(tmp_path)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ae(x), first(x))
    save_dictionary(second, tmp_path)  # the next write completes the change
    assert "sha256_replaced" not in json.loads((tmp_path / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(load_dictionary(tmp_path)[0](x), second(x))


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path / "a", progress=False)
        os.umask(0o077)
        trainSAE(batches(), CONFIGS[:1], STEPS, save_dir=tmp_path / "b", progress=False)
    finally:
        os.umask(old)
    for run, mode in (("a", 0o644), ("b", 0o600)):
        for name in ("ae.pt", "config.json", f"resume_{STEPS}.pt"):
            assert (tmp_path / run / "trainer_0" / name).stat().st_mode & 0o777 == mode, (run, name)
        assert (tmp_path / run / "resume.json").stat().st_mode & 0o777 == mode


# ------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_and_batches_are_named(tmp_path):
    with pytest.raises(ValueError, match="batch 3 of the data has 0 rows"):
        trainSAE([*batches(2), torch.zeros(0, 32)], CONFIGS[:1], STEPS, progress=False)
    with pytest.raises(ValueError, match="norm_factor_batches must be a positive int, got 0"):
        trainSAE(batches(), CONFIGS[:1], STEPS, normalize_activations=True, norm_factor_batches=0, progress=False)
    with pytest.raises(TypeError, match=r"lr must be a number, got '1e-3' \(str\)"):
        trainSAE(batches(), [dict(CONFIGS[0], lr="1e-3")], STEPS, progress=False)
    with pytest.raises(TypeError, match="'trainer' must be a trainer class .* got <class 'torch.nn.modules.linear"):
        trainSAE(batches(), [dict(CONFIGS[0], trainer=torch.nn.Linear)], STEPS, progress=False)
    with pytest.raises(TypeError, match="a trainer config must be a dict"):
        trainSAE(batches(), [1, 2], STEPS, progress=False)


# ------------------------------------------------------------------------------------------ caches
@pytest.fixture
def cache_folder(tmp_path):
    build_cache(tmp_path / "c", n_tokens=600)
    return tmp_path / "c"


def test_a_flipped_bit_in_a_cache_shard_is_named_when_read(cache_folder):
    from dictionary_learning.cache import ActivationCache, CacheError

    flip_a_bit(cache_folder / "shard_00001.safetensors", at=0.9)  # in the data, not the header
    cache = ActivationCache(cache_folder, batch_size=50, shuffle=False)
    with pytest.raises(CacheError, match=r"shard_00001.safetensors is corrupted: its sha256 differs"):
        list(cache)


@pytest.mark.parametrize("damage", ["truncate", "empty", "extend"])
def test_a_truncated_or_empty_shard_is_named_when_the_cache_is_opened(cache_folder, damage):
    from dictionary_learning.cache import ActivationCache, CacheError

    shard = cache_folder / "shard_00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncate": data[:-100], "empty": b"", "extend": data + b"\0" * 8}[damage])
    with pytest.raises(CacheError, match=r"shard_00002.safetensors (is truncated|is \d+ bytes but its header)"):
        ActivationCache(cache_folder)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: m.update(n_tokens=m["n_tokens"] + 1), "n_tokens is 601 but the shards listed hold 600 rows"),
        (lambda m: m.update(shards=[]), "n_tokens is 600 but the shards listed hold 0 rows"),
        (lambda m: m.pop("sites"), "the field 'sites' is missing"),
        (lambda m: m["shards"][0].update(n_tokens="100"), "a shard entry should be"),
        (lambda m: m.update(ctx_len="32"), "ctx_len should be a int"),
        (lambda m: m["shards"][0].update(n_tokens=m["shards"][0]["n_tokens"] + 1), "n_tokens is 600 but .* 601 rows"),
    ],
)
def test_an_edited_manifest_is_refused_when_the_cache_is_opened(cache_folder, edit, problem):
    from dictionary_learning.cache import ActivationCache, CacheError

    manifest = json.loads((cache_folder / "manifest.json").read_text())
    edit(manifest)
    (cache_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=rf"manifest.json is damaged or was edited: {problem}"):
        ActivationCache(cache_folder)


def test_shard_row_counts_are_checked_against_the_shards_themselves(cache_folder):
    from dictionary_learning.cache import ActivationCache, CacheError

    manifest = json.loads((cache_folder / "manifest.json").read_text())
    manifest["shards"][0]["n_tokens"] += 1
    manifest["shards"][1]["n_tokens"] -= 1  # the total still agrees
    (cache_folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"shard_00000.safetensors: tensor .* the shard and the manifest disagree"):
        ActivationCache(cache_folder)


def test_a_cache_of_another_model_with_the_same_architecture_is_refused(tmp_path):
    import tiny_models

    from dictionary_learning.cache import ActivationCache, CacheError, model_id

    a, b = tiny_models.gpt_neox(seed=0), tiny_models.gpt_neox(seed=1)
    assert model_id(a) == model_id(b)  # the name alone cannot tell them apart
    build_cache(tmp_path / "c", a, n_tokens=300)
    ActivationCache(tmp_path / "c", expected_model=a)
    with pytest.raises(CacheError, match="other weights or tokenizer"):
        ActivationCache(tmp_path / "c", expected_model=b)
    build_cache(tmp_path / "p", a, n_tokens=150)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(CacheError, match="already holds a cache with model_fingerprint="):
        build_cache(tmp_path / "p", b, n_tokens=300)  # resuming a partial build with another model


def test_a_cache_build_that_yields_no_tokens_is_not_marked_complete(tmp_path):
    from dictionary_learning.cache import CacheError

    with pytest.raises(CacheError, match="the data yielded no tokens"):
        build_cache(tmp_path / "c", data=iter(()), n_tokens=100)
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.slow
def test_a_second_cache_build_on_a_folder_in_use_fails_at_once(tmp_path):
    proc = lock_holder(tmp_path, tmp_path / "c")
    try:
        with pytest.raises(FolderLockedError, match=rf"c is being written by another cache build \(pid {proc.pid}"):
            build_cache(tmp_path / "c", n_tokens=300)
    finally:
        proc.kill()
        proc.wait()
    assert build_cache(tmp_path / "c", n_tokens=300).n_tokens == 300  # the dead owner's lock is taken over
