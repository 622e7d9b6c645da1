"""The Activault reader against a real S3-compatible server: moto's server mode, started by the test
as its own process on a free local port (no mock object: every read is an HTTP request)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from dictionary_learning.activault_s3_buffer import (  # noqa: E402
    ActivaultS3ActivationBuffer,
    S3RCache,
    create_s3_client,
)

pytestmark = pytest.mark.slow
B, L, D = 4, 8, 16  # sequences, tokens per sequence, width of each megabatch


@pytest.fixture(scope="module")
def s3():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = create_s3_client("testing", "testing", endpoint_url=f"http://127.0.0.1:{port}")
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    client.create_bucket(Bucket="acts")
    yield client
    server.terminate()
    server.wait(timeout=10)


def put(client, key, obj):
    data = json.dumps(obj).encode() if isinstance(obj, dict) and "shape" in obj else None
    if data is None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
    client.put_object(Bucket="acts", Key=key, Body=data)


@pytest.fixture(scope="module")
def run(s3):
    """Three megabatches under run/layer3 whose token i of file j has value 100 * j + i everywhere."""
    files = []
    for j in range(3):
        states = (100 * j + torch.arange(B * L, dtype=torch.float32)).view(B, L, 1).expand(B, L, D).contiguous()
        files.append(states)
        put(s3, f"run/layer3/{j:04d}.saved.pt", {"states": states, "input_ids": torch.arange(B * L).view(B, L)})
    put(s3, "run/layer3/metadata.json", {"shape": [B, L, D], "dtype": "torch.float32", "input_ids_shape": [B, L]})
    s3.put_object(Bucket="acts", Key="run/cfg.json", Body=json.dumps({"total_tokens": 3 * B * L}).encode())
    return files


def test_the_cache_yields_every_megabatch_in_order(s3, run):
    cache = S3RCache(s3, "run/layer3", bucket_name="acts", shuffle=False, preserve_file_order=True, chunk_size=300)
    got = list(cache)  # chunk_size 300 bytes: each file arrives in many ranged requests
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, run))
    assert cache.config["total_tokens"] == 3 * B * L and cache.current_file_index == 3
    with_ids = list(S3RCache(s3, "run/layer3", bucket_name="acts", preserve_file_order=True, return_ids=True))
    assert torch.equal(with_ids[1]["states"], run[1]) and with_ids[1]["input_ids"].shape == (B, L)
    cache.set_file_index(2)
    assert len(list(cache)) == 1  # resumes at the third file


def test_shuffling_permutes_tokens_and_files_reproducibly(s3, run):
    a = list(S3RCache(s3, "run/layer3", bucket_name="acts", seed=1, n_workers=2, buffer_size=1))
    b = list(S3RCache(s3, "run/layer3", bucket_name="acts", seed=1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    values = sorted(float(v) for m in a for v in m[..., 0].flatten())
    assert values == sorted(float(v) for m in run for v in m[..., 0].flatten())
    assert not all(torch.equal(x, y) for x, y in zip(a, run))


def test_the_buffer_serves_every_token_once_across_files(s3, run):
    cache = S3RCache(s3, "run/layer3", bucket_name="acts", shuffle=False, preserve_file_order=True)
    buffer = ActivaultS3ActivationBuffer(cache, batch_size=20)
    batches = list(buffer)
    assert [b.shape for b in batches] == [(20, D)] * 4  # 96 tokens: 4 full batches, 16 left at the end
    seen = torch.cat(batches)[:, 0].tolist()
    assert len(set(seen)) == 80 and set(seen) <= {100 * j + i for j in range(3) for i in range(B * L)}
    assert buffer.config["d_submodule"] == D


def test_training_from_the_s3_buffer(s3, run, tmp_path):
    from dictionary_learning import trainSAE
    from dictionary_learning.trainers import TopKTrainer

    cache = S3RCache(s3, "run/layer3", bucket_name="acts")
    config = dict(trainer=TopKTrainer, activation_dim=D, dict_size=32, k=4, warmup_steps=0, device="cpu")
    trainSAE(ActivaultS3ActivationBuffer(cache, batch_size=16), [config], steps=5, save_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "trainer_0" / "config.json").read_text())
    assert record["buffer"]["type"] == "activault_s3" and (tmp_path / "run" / "trainer_0" / "ae.pt").exists()


@pytest.fixture(scope="module")
def long_run(s3):
    """12 megabatches of random tokens under resume/layer3 (384 tokens: 24 batches of 16)."""
    generator = torch.Generator().manual_seed(0)
    for j in range(12):
        put(s3, f"resume/layer3/{j:04d}.saved.pt", {"states": torch.randn(B, L, D, generator=generator)})
    put(s3, "resume/layer3/metadata.json", {"shape": [B, L, D], "dtype": "torch.float32"})


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_run_on_the_s3_buffer_stopped_from_outside_resumes_exactly(s3, long_run, how, tmp_path, monkeypatch):
    import sources
    from helpers import assert_same_weights, weights

    monkeypatch.setenv("DL_TEST_S3_ENDPOINT", s3.meta.endpoint_url)
    uninterrupted = weights(sources.train("activault", tmp_path))
    sources.stop_child_mid_run("activault", tmp_path, tmp_path / "run", how, tmp_path)
    assert json.loads((tmp_path / "run" / "resume.json").read_text())["next_step"] < sources.STEPS
    assert_same_weights(uninterrupted, weights(sources.train("activault", tmp_path, tmp_path / "run", resume=True)))


def test_a_cache_without_a_seed_warns_and_is_refused_for_resume(s3, long_run, tmp_path, caplog, monkeypatch):
    from sources import sigusr1_at_step

    from dictionary_learning import TrainingInterrupted, trainSAE
    from dictionary_learning.trainers import TopKTrainer

    config = dict(trainer=TopKTrainer, activation_dim=D, dict_size=32, k=4, warmup_steps=0, device="cpu")
    cache = S3RCache(s3, "resume/layer3", bucket_name="acts", seed=None)
    with pytest.raises(TrainingInterrupted), sigusr1_at_step(2, monkeypatch):
        trainSAE(ActivaultS3ActivationBuffer(cache, batch_size=16), [config], 5, save_dir=tmp_path, progress=False)
    assert "backups cannot be resumed exactly: its S3RCache has seed=None" in caplog.text
    with pytest.raises(ValueError, match="cannot be resumed exactly: its S3RCache has seed=None.*seed=42"):
        trainSAE(ActivaultS3ActivationBuffer(cache, batch_size=16), None, 5, resume_from=tmp_path, progress=False)


def test_bad_data_is_named(s3, run):
    with pytest.raises(OSError, match="s3://acts/nothing/here/metadata.json"):
        S3RCache(s3, "nothing/here", bucket_name="acts")
    s3.put_object(Bucket="acts", Key="broken/layer3/0000.saved.pt", Body=b"not a torch file")
    put(s3, "broken/layer3/metadata.json", {"shape": [B, L, D], "dtype": "torch.float32"})
    with pytest.raises(OSError, match="broken/layer3/0000.saved.pt is not a readable megabatch"):
        list(S3RCache(s3, "broken/layer3", bucket_name="acts"))
    put(s3, "wide/layer3/metadata.json", {"shape": [B, L, 2 * D], "dtype": "torch.float32"})
    put(s3, "wide/layer3/0000.saved.pt", torch.zeros(B, L, 2 * D))
    with pytest.raises(ValueError, match="prefixes hold different activations"):
        S3RCache(s3, ["run/layer3", "wide/layer3"], bucket_name="acts")
    s3.put_object(Bucket="acts", Key="notjson/layer3/metadata.json", Body=b"{shape: oops")
    with pytest.raises(ValueError, match="s3://acts/notjson/layer3/metadata.json is not valid JSON"):
        S3RCache(s3, "notjson/layer3", bucket_name="acts")
    s3.put_object(Bucket="acts", Key="noshape/layer3/metadata.json", Body=json.dumps({"dtype": "torch.float32"}))
    with pytest.raises(ValueError, match=r"noshape/layer3/metadata.json needs \"shape\": \[b, l, d\]"):
        S3RCache(s3, "noshape/layer3", bucket_name="acts")
