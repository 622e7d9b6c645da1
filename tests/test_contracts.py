"""Nothing is silently reinterpreted: a batch of another layout than its trainer's, command-line
options that would override each other, text that is not valid in its encoding, and items that are
not documents each stop with one line naming the problem and the fix."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from helpers import tiny_cli_folder
from tiny_models import SENTENCES

from dictionary_learning import AutoEncoder, load_dictionary, trainSAE
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.cli import _trainer_configs, build_parser, main
from dictionary_learning.data import jsonl_to_generator, text_files_to_generator
from dictionary_learning.dictionaries.crosscoder import relative_decoder_norms
from dictionary_learning.trainers import BatchTopKCrossCoderTrainer, TopKTrainer

D = 32
TOPK = dict(trainer=TopKTrainer, activation_dim=D, dict_size=64, k=4, warmup_steps=0, device="cpu")
CROSS = dict(trainer=BatchTopKCrossCoderTrainer, activation_dim=D, dict_size=64, k=4, num_layers=2, warmup_steps=0,
             device="cpu")  # fmt: skip


# ------------------------------------------------------------------------------------ batch layouts
def test_an_sae_refuses_a_transcoders_input_output_rows():
    with pytest.raises(ValueError, match=r"TopKTrainer takes \[B, 32\] .* yields \[8, 2, 32\]: .*transcoder=True"):
        trainSAE([torch.randn(8, 2, D)] * 3, [TOPK], 3, progress=False)


def test_stacked_sites_of_input_output_pairs_are_refused_by_transcoders_and_crosscoders():
    model = tiny_models.gpt_neox()
    mlps = [model.gpt_neox.layers[0].mlp, model.gpt_neox.layers[1].mlp]
    data = ActivationBuffer(list(SENTENCES), model, mlps, io="in_and_out", stack_sites=True, n_ctxs=4, ctx_len=16,
                            out_batch_size=16)  # fmt: skip
    batch = next(data)
    assert batch.shape == (16, 2, 2, D)  # [B, sites, (input, output), d]
    with pytest.raises(ValueError, match=r"yields \[16, 2, 2, 32\]: these are 2 stacked sites of \(input, output\)"):
        trainSAE([batch], [TOPK], 1, transcoder=True, progress=False)
    with pytest.raises(ValueError, match=r"yields \[16, 2, 2, 32\]: .*a crosscoder reads io='out'"):
        trainSAE([batch], [CROSS], 1, progress=False)


def test_a_transcoder_pair_with_different_row_counts_names_the_rows():
    pair = (torch.randn(8, D), torch.randn(9, D))
    with pytest.raises(ValueError, match="different row counts; row i of each must be the same token"):
        trainSAE([pair], [TOPK], 1, transcoder=True, progress=False)


def test_an_output_dim_of_zero_is_named_as_output_dim():
    with pytest.raises(ValueError, match="output_dim must be a positive integer"):
        trainSAE([torch.randn(8, 2, D)], [dict(TOPK, output_dim=0)], 1, transcoder=True, progress=False)


def test_relative_decoder_norms_of_an_sae_is_a_clear_error():
    with pytest.raises(TypeError, match="relative_decoder_norms compares a crosscoder's .* AutoEncoder has one"):
        relative_decoder_norms(AutoEncoder(8, 16))


# -------------------------------------------------------------------------------- the command line
@pytest.fixture
def tiny(tmp_path):
    return tiny_cli_folder(tmp_path)


def train_args(tiny, out, *extra):
    return ["train", *tiny, "--steps", "4", "--batch-size", "16", "--n-ctxs", "8", "--lm-batch-size", "4",
            "--out", str(out), *extra]  # fmt: skip


def test_an_input_output_cache_trains_transcoders_and_refuses_saes(tmp_path, tiny, capsys):
    cache = tmp_path / "cache"
    main(["cache", *tiny, "--layer", "1", "--site", "mlp", "--io", "in_and_out", "--tokens", "300", "--out",
          str(cache)])  # fmt: skip
    common = ["--cache", str(cache), "--trainer", "TopKTrainer:k=4", "--set", "warmup_steps=1", "--steps", "4",
              "--batch-size", "16"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"takes \[B, 32\] activations, .* \[16, 2, 32\].*--transcoder"):
        main(["train", *common, "--out", str(tmp_path / "sae")])
    main(["train", *common, "--transcoder", "--out", str(tmp_path / "tc")])
    ae, config = load_dictionary(tmp_path / "tc" / "trainer_0")
    assert config["trainer"]["transcoder"] and config["buffer"]["io"] == "in_to_out"
    assert config["buffer"]["n_sites"] == 1 and ae.transcoder


def test_a_stacked_cache_trains_a_crosscoder(tmp_path, tiny):
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match="--stack-sites caches several sites"):
        main(["cache", *tiny, "--layer", "1", "--stack-sites", "--tokens", "300", "--out", str(cache)])
    main(["cache", *tiny, "--layer", "0", "1", "--stack-sites", "--tokens", "300", "--out", str(cache)])
    main(["train", "--cache", str(cache), "--crosscoder", "--trainer", "BatchTopKCrossCoderTrainer:k=4", "--set",
          "warmup_steps=1", "--steps", "4", "--batch-size", "16", "--out", str(tmp_path / "cc")])  # fmt: skip
    _, config = load_dictionary(tmp_path / "cc" / "trainer_0")
    assert config["buffer"]["stack_sites"] and config["buffer"]["n_sites"] == 2 and config["trainer"]["num_layers"] == 2


def parse(*argv):
    return build_parser().parse_args(["train", "--steps", "10", "--out", "x", *argv])


def test_config_and_trainer_combine(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"trainer": "StandardTrainer", "l1_penalty": 0.1}]))
    configs = _trainer_configs(parse("--config", str(tmp_path / "c.json"), "--trainer", "TopKTrainer:k=4,8"))
    assert [(c["trainer"], c.get("k"), c.get("l1_penalty")) for c in configs] == [
        ("StandardTrainer", None, 0.1),
        ("TopKTrainer", 4, None),
        ("TopKTrainer", 8, None),
    ]


def test_a_set_value_that_an_entry_overrides_is_named(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"trainer": "TopKTrainer", "k": 2, "lr": 1e-3}))
    argv = ["--trainer", "TopKTrainer:k=4", "--set", "k=8", "--set", "lr=1e-3", "--config", str(tmp_path / "c.json")]
    configs = _trainer_configs(parse(*argv))
    assert sorted(c["k"] for c in configs) == [2, 4]
    err = capsys.readouterr().err
    assert "--trainer TopKTrainer:k=4 sets k=4, which takes precedence over --set k=8" in err
    assert f"--config {tmp_path / 'c.json'} sets k=2, which takes precedence over --set k=8" in err
    assert "lr" not in err  # the same value: nothing is overridden
    configs = _trainer_configs(parse("--trainer", "TopKTrainer", "--set", "k=8"))
    assert configs[0]["k"] == 8


# ------------------------------------------------------------------------------------------ text
def test_text_that_is_not_valid_utf8_is_named_unless_an_encoding_or_handler_is_given(tmp_path, tiny):
    texts = tmp_path / "latin1"
    texts.mkdir()
    for i, sentence in enumerate(SENTENCES * 3):
        (texts / f"{i:03d}.txt").write_bytes(f"{sentence} Café {i}.".encode("latin-1"))
    with pytest.raises(ValueError, match=r"000.txt is not valid utf-8 \(byte \d+: invalid .*--encoding latin-1"):
        next(text_files_to_generator(texts))
    assert "Café 0" in next(text_files_to_generator(texts, encoding="latin-1"))
    assert "Caf\ufffd 0" in next(text_files_to_generator(texts, errors="replace"))
    tiny = [tiny[0], tiny[1], "--texts", str(texts), "--ctx-len", "16"]
    with pytest.raises(SystemExit, match=r"000.txt is not valid utf-8"):
        main(train_args(tiny, tmp_path / "a", "--layer", "1", "--trainer", "TopKTrainer:k=4"))
    main(train_args(tiny, tmp_path / "b", "--layer", "1", "--trainer", "TopKTrainer:k=4", "--encoding", "latin-1"))


def test_jsonl_lines_that_are_not_text_are_named_with_their_line(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: the 'text' field is null, not a string"):
        list(jsonl_to_generator(bad))
    bad.write_text('{"text": [1, 2]}\n')
    with pytest.raises(ValueError, match=r"line 1: the 'text' field is list \[1, 2\], not a string"):
        list(jsonl_to_generator(bad))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "ok"}\n{"text": "Café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl, line 2, is not valid utf-8"):
        list(jsonl_to_generator(latin))
    assert list(jsonl_to_generator(latin, encoding="latin-1")) == ["ok", "Café"]
    (tmp_path / "null.jsonl").write_text('{"text": null}\n' * 3)
    tiny = [tiny[0], tiny[1], "--texts", str(tmp_path / "null.jsonl"), "--ctx-len", "16", "--part", "all"]
    with pytest.raises(SystemExit, match=r"null.jsonl, line 1: the 'text' field is null"):
        main(["cache", *tiny, "--layer", "1", "--tokens", "100", "--out", str(tmp_path / "c")])


@pytest.mark.parametrize(
    "items, shown",
    [([None, None], "item 0 of the data is NoneType 'None'"), ([5, 6, 7], r"item 0 of the data is int '5'.*\[\[5, 6")],
)
def test_items_that_are_not_documents_are_named(items, shown):
    model = tiny_models.gpt_neox()
    for pack in (True, False):
        with pytest.raises(TypeError, match=shown):
            buffer = ActivationBuffer(items, model, model.gpt_neox.layers[1], n_ctxs=4, ctx_len=16, pack=pack)
            next(buffer)
