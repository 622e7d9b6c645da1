"""torch.distributed training with gloo on 2 CPU processes: data parallel, trainer parallel, errors."""

from __future__ import annotations

import socket
import time

import dist_worker
import pytest
import torch
import torch.multiprocessing as mp

from dictionary_learning import load_dictionary, trainSAE

pytestmark = [
    pytest.mark.slow,  # spawns processes
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name: str, tmp_path, world_size: int = 2) -> tuple[list, list[str]]:
    mp.start_processes(
        dist_worker.run, args=(world_size, free_port(), name, str(tmp_path)), nprocs=world_size, start_method="spawn"
    )
    results = [tmp_path / f"rank{r}.pt" for r in range(world_size)]
    errors = [tmp_path / f"rank{r}.err" for r in range(world_size)]
    loaded = [torch.load(p, weights_only=True) if p.exists() else None for p in results]
    assert all(r is None or r["world_size"] == world_size for r in loaded)  # they really formed one group
    return [r and r["weights"] for r in loaded], [p.read_text() if p.exists() else "" for p in errors]


def single_process(configs=dist_worker.CONFIGS):
    return [d.state_dict() for d in trainSAE(dist_worker.batches(), configs, dist_worker.STEPS, progress=False)]


def assert_close(a, b):
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)


def test_data_parallel_equals_one_process_on_the_combined_batch(tmp_path):
    results, errors = spawn("data", tmp_path)
    assert errors == ["", ""], errors
    expected = single_process()
    for rank_result in results:  # both replicas hold the same weights, those of one process
        for got, want in zip(rank_result, expected):
            assert_close(got, want)
    for i, want in enumerate(expected):  # rank 0 alone wrote the checkpoints; they load
        ae, config = load_dictionary(tmp_path / "run" / f"trainer_{i}")
        assert_close(ae.state_dict(), want)
        assert config["trainer"]["device"] == "cpu"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "resume.json",
        "trainer_0",
        "trainer_1",
        "trainer_2",
    ]


@pytest.mark.parametrize("name", ["transcoders", "crosscoders"])
def test_data_parallel_transcoders_and_crosscoders_equal_one_process(tmp_path, name):
    results, errors = spawn(name, tmp_path)
    assert errors == ["", ""], errors
    configs = dist_worker.TRANSCODERS if name == "transcoders" else dist_worker.CROSSCODERS
    expected = trainSAE(dist_worker.paired_batches(), configs, dist_worker.STEPS, progress=False,
                        transcoder=name == "transcoders")  # fmt: skip
    per_row = expected if name == "transcoders" else expected[:1]  # BatchTopK: per-replica selection
    for rank_result in results:
        for got, want in zip(rank_result, per_row):
            assert_close(got, want.state_dict())
    for a, b in zip(*results):  # every replica holds the same weights
        assert_close(a, b)


def test_data_parallel_cross_layer_transcoders_equal_one_process(tmp_path):
    results, errors = spawn("clts", tmp_path)
    assert errors == ["", ""], errors
    expected = trainSAE(dist_worker.clt_batches(), dist_worker.CLTS, dist_worker.STEPS, progress=False)
    for rank_result in results:  # TopK and JumpReLU select per token: one process on the combined batch
        for got, want in zip(rank_result[:2], expected[:2]):
            assert_close(got, want.state_dict())
    for a, b in zip(*results):  # every replica holds the same weights, BatchTopK's thresholds included
        assert_close(a, b)
    assert bool((results[0][2]["threshold"] > 0).all())
    for i, want in enumerate(results[0]):  # rank 0 wrote the checkpoints; they load
        ae, config = load_dictionary(tmp_path / "run" / f"trainer_{i}")
        assert_close(ae.state_dict(), want)
        assert config["trainer"]["num_layers"] == 3


def test_data_parallel_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    results, errors = spawn("resume", tmp_path)
    assert errors == ["", ""], errors
    expected = single_process()
    for rank_result in results:
        for got, want in zip(rank_result, expected):
            assert_close(got, want)


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path):
    results, errors = spawn("sigterm", tmp_path)
    assert errors == ["", ""], errors
    for rank in range(2):  # both stopped, after the same step, and saved one backup
        assert "training stopped by" in (tmp_path / f"stopped{rank}.txt").read_text()
        assert "after step 6" in (tmp_path / f"stopped{rank}.txt").read_text()
    expected = single_process()
    for rank_result in results:
        for got, want in zip(rank_result, expected):
            assert_close(got, want)


def test_trainer_parallel_gives_each_trainer_its_solo_weights(tmp_path):
    results, errors = spawn("trainers", tmp_path)
    assert errors == ["", ""], errors
    assert [len(r) for r in results] == [2, 1]  # trainers 0 and 2 on rank 0, trainer 1 on rank 1
    for i, config in enumerate(dist_worker.CONFIGS):
        solo = single_process([config])[0]
        ae, _ = load_dictionary(tmp_path / "run" / f"trainer_{i}")
        assert_close(ae.state_dict(), solo)
        assert_close(results[i % 2][i // 2], solo)


def test_ranks_that_disagree_get_the_same_clear_error(tmp_path):
    _, errors = spawn("mismatch", tmp_path)
    for text in errors:
        assert "ValueError: ranks [1] disagree with rank 0 on the trainer configs" in text


def test_a_batch_that_does_not_split_evenly_is_named(tmp_path):
    _, errors = spawn("uneven", tmp_path)
    for text in errors:
        assert "a batch of 63 rows cannot be split evenly over 2 processes" in text


def test_a_dead_rank_makes_the_other_fail_instead_of_hanging(tmp_path):
    start = time.monotonic()
    _, errors = spawn("crash", tmp_path)
    assert "rank 1 lost its data" in errors[1]
    assert errors[0], "rank 0 should have failed too"
    print(errors[0].splitlines()[0])
    assert time.monotonic() - start < 120
