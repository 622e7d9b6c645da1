"""ActivationCache: build -> read round trip, shuffling, seeking, resume, and bad folders."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from helpers import TEXTS, canonical, hook_rows
from helpers import build_cache as build

from dictionary_learning import trainSAE
from dictionary_learning.cache import ActivationCache, CacheError
from dictionary_learning.trainers import TopKTrainer


def all_rows(cache):
    return torch.cat(list(cache))


def test_round_trip_equals_forward_hook_values(tmp_path):
    model = tiny_models.gpt_neox()
    cache = build(tmp_path / "c", model, pack=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) > 3 and manifest["sites"][0]["d"] == 32
    expected = hook_rows(model, model.gpt_neox.layers[1]._module, TEXTS)
    reader = ActivationCache(tmp_path / "c", batch_size=64)
    got = all_rows(reader)
    assert got.shape == expected.shape == (cache.n_tokens, 32)
    torch.testing.assert_close(canonical(got), canonical(expected), rtol=1e-5, atol=1e-5)
    assert reader.mean_squared_norm() == pytest.approx(float(expected.pow(2).sum(-1).mean()), rel=1e-4)
    assert reader.config["n_tokens"] == cache.n_tokens


def test_token_budget_and_token_ids(tmp_path):
    model = tiny_models.gpt_neox()
    cache = build(tmp_path / "c", model, n_tokens=150)
    assert cache.n_tokens == 150
    from safetensors.torch import load_file

    first = load_file(str(tmp_path / "c" / "shard_00000.safetensors"))
    ids = model.tokenizer(TEXTS[0])["input_ids"]
    assert first["tokens"][: len(ids)].tolist() == ids


def test_shuffling_is_seeded_and_every_row_is_served_once_per_epoch(tmp_path):
    build(tmp_path / "c")
    a = list(ActivationCache(tmp_path / "c", batch_size=50, seed=1))
    b = list(ActivationCache(tmp_path / "c", batch_size=50, seed=1))
    c = list(ActivationCache(tmp_path / "c", batch_size=50, seed=2))
    plain = list(ActivationCache(tmp_path / "c", batch_size=50, shuffle=False))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], plain[0])
    torch.testing.assert_close(canonical(torch.cat(a)), canonical(torch.cat(plain)))
    looping = iter(ActivationCache(tmp_path / "c", batch_size=50, seed=1, loop=True))
    epochs = [next(looping) for _ in range(2 * len(a) + 1)]
    assert all(e.shape[0] == 50 for e in epochs)  # batches run on across the epoch boundary


def test_skip_batches_jumps_to_the_same_batch(tmp_path):
    build(tmp_path / "c")
    stream = iter(ActivationCache(tmp_path / "c", batch_size=40, loop=True, seed=4))
    expected = [next(stream) for _ in range(12)]
    seeker = ActivationCache(tmp_path / "c", batch_size=40, loop=True, seed=4)
    seeker.skip_batches(9)
    assert torch.equal(next(iter(seeker)), expected[9])


def test_trainsae_resumes_from_a_cache_without_replaying(tmp_path):
    build(tmp_path / "c")
    config = dict(
        trainer=TopKTrainer,
        activation_dim=32,
        dict_size=64,
        k=4,
        warmup_steps=2,
        threshold_start_step=2,
        device="cpu",
        seed=0,
    )
    full = trainSAE(ActivationCache(tmp_path / "c", batch_size=32, loop=True), [config], 40, progress=False)

    class Crash(ActivationCache):
        def __iter__(self):
            for i, x in enumerate(super().__iter__()):
                if i == 25:
                    raise RuntimeError("crash")
                yield x

    with pytest.raises(RuntimeError):
        trainSAE(
            Crash(tmp_path / "c", batch_size=32, loop=True),
            [config],
            40,
            save_dir=tmp_path / "run",
            backup_steps=10,
            progress=False,
        )
    resumed = trainSAE(
        ActivationCache(tmp_path / "c", batch_size=32, loop=True),
        None,
        40,
        resume_from=tmp_path / "run",
        progress=False,
    )
    for key, value in full[0].state_dict().items():
        assert torch.equal(resumed[0].state_dict()[key], value), key
    config_json = json.loads((tmp_path / "run" / "trainer_0" / "config.json").read_text())
    assert config_json["buffer"]["cache"] == str(tmp_path / "c")


def test_interrupted_build_resumes_to_the_same_cache(tmp_path):
    model = tiny_models.gpt_neox()

    def crashing():
        for i, text in enumerate(TEXTS):
            if i == 70:
                raise RuntimeError("crash")
            yield text

    with pytest.raises(RuntimeError):
        ActivationCache.build(
            tmp_path / "c",
            model,
            model.gpt_neox.layers[1],
            crashing(),
            10_000,
            ctx_len=32,
            refresh_batch_size=8,
            shard_tokens=100,
            progress=False,
        )
    with pytest.raises(CacheError, match="partial cache"):
        ActivationCache(tmp_path / "c")
    build(tmp_path / "c", model)
    build(tmp_path / "ref", model)
    resumed = all_rows(ActivationCache(tmp_path / "c", shuffle=False))
    reference = all_rows(ActivationCache(tmp_path / "ref", shuffle=False))
    assert torch.equal(resumed, reference)


def test_several_sites_and_bfloat16(tmp_path):
    model = tiny_models.llama()
    layers = model.model.layers
    build(
        tmp_path / "c",
        model,
        submodule={"resid": layers[1], "ln": layers[1].input_layernorm},
        io="in",
        dtype=torch.bfloat16,
    )
    cache = ActivationCache(tmp_path / "c", batch_size=30, dtype=torch.float32)
    batch = next(iter(cache))
    assert set(batch) == {"resid", "ln"} and batch["resid"].dtype == torch.float32
    assert torch.equal(batch["resid"], batch["ln"])
    only = next(iter(ActivationCache(tmp_path / "c", batch_size=30, sites=["ln"])))
    assert only.dtype == torch.bfloat16 and only.shape == (30, 32)


def test_bad_cache_folders(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        ActivationCache(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CacheError, match="not a dictionary_learning activation cache"):
        ActivationCache(tmp_path / "foreign")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="has no manifest.json"):
        ActivationCache(tmp_path / "empty")
    build(tmp_path / "c")
    with pytest.raises(CacheError, match="holds activations of 'gpt_neox-.*', not 'EleutherAI/pythia-70m'"):
        ActivationCache(tmp_path / "c", expected_model="EleutherAI/pythia-70m")
    with pytest.raises(CacheError, match="no site"):
        ActivationCache(tmp_path / "c", sites=["nope"])
    other = tiny_models.llama()
    with pytest.raises(CacheError, match="already holds a cache with model="):
        build(tmp_path / "c", other, submodule=other.model.layers[1])
    (tmp_path / "c" / "shard_00001.safetensors").unlink()
    with pytest.raises(CacheError, match="shard_00001.safetensors listed in the manifest is missing"):
        ActivationCache(tmp_path / "c")
