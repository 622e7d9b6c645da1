"""The command line on a tiny model: cache, train (from the cache and from the model), eval, errors."""

from __future__ import annotations

import json

import pytest
import tiny_models

from dictionary_learning import load_dictionary
from dictionary_learning.cli import build_parser, main


@pytest.fixture
def tiny(tmp_path):
    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, sentence in enumerate(tiny_models.SENTENCES * 3):
        (texts / f"{i:03d}.txt").write_text(sentence)
    return ["--model", str(tmp_path / "tiny"), "--texts", str(texts), "--ctx-len", "16"]


def test_cache_then_train_then_eval(tmp_path, tiny, capsys):
    main(["cache", *tiny, "--layer", "1", "--site", "mlp", "--tokens", "800", "--out", str(tmp_path / "cache")])
    main(
        [
            "train",
            "--cache",
            str(tmp_path / "cache"),
            "--trainer",
            "TopKTrainer",
            "--trainer",
            "BatchTopKTrainer",
            "--set",
            "k=4",
            "--set",
            "warmup_steps=2",
            "--set",
            "dict_size=64",
            "--steps",
            "10",
            "--batch-size",
            "32",
            "--layer",
            "1",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    ae, config = load_dictionary(tmp_path / "run" / "trainer_1")
    assert type(ae).__name__ == "BatchTopKSAE" and config["trainer"]["k"] == 4 and ae.dict_size == 64
    assert config["buffer"]["cache"] == str(tmp_path / "cache")
    capsys.readouterr()
    main(
        [
            "eval",
            str(tmp_path / "run" / "trainer_0"),
            *tiny,
            "--layer",
            "1",
            "--site",
            "mlp",
            "--batch-texts",
            "4",
            "--n-batches",
            "1",
            "--json",
        ]
    )
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["l0"] <= 4 and "frac_recovered" in metrics


def test_train_from_the_model_with_a_yaml_config(tmp_path, tiny):
    (tmp_path / "sweep.yaml").write_text(
        "trainers:\n"
        "  - {trainer: StandardTrainer, l1_penalty: 0.1, warmup_steps: 1, sparsity_warmup_steps: 1}\n"
        "  - {trainer: JumpReluTrainer, target_l0: 4, warmup_steps: 1, sparsity_warmup_steps: 1}\n"
    )
    args = [
        "train",
        *tiny,
        "--layer",
        "0",
        "--site",
        "resid",
        "--config",
        str(tmp_path / "sweep.yaml"),
        "--steps",
        "4",
        "--batch-size",
        "32",
        "--n-ctxs",
        "8",
        "--out",
        str(tmp_path / "run"),
    ]
    main(args)
    assert load_dictionary(tmp_path / "run" / "trainer_1")[1]["trainer"]["trainer_class"] == "JumpReluTrainer"
    with pytest.raises(SystemExit, match="already holds results; pass --overwrite"):
        main(args)
    main([*args, "--overwrite"])


def test_train_end_to_end_and_resume(tmp_path, tiny):
    args = [
        "train",
        *tiny,
        "--layer",
        "0",
        "--site",
        "mlp",
        "--trainer",
        "TopKTrainer",
        "--set",
        "k=4",
        "--set",
        "warmup_steps=1",
        "--steps",
        "4",
        "--lm-batch-size",
        "4",
        "--backup-steps",
        "2",
        "--e2e",
        "--kl-weight",
        "1",
        "--downstream-layers",
        "1",
        "--downstream-weight",
        "0.5",
        "--out",
        str(tmp_path / "run"),
    ]
    main(args)
    ae, config = load_dictionary(tmp_path / "run" / "trainer_0")
    assert config["e2e"] == {
        "site": "model.layers.0.mlp",
        "io": "out",
        "kl_weight": 1.0,
        "local_weight": 0.0,
        "downstream": {"model.layers.1": 0.5},
    }
    assert config["buffer"] == {"kind": "tokens", "batch_size": 4, "ctx_len": 16} and ae.activation_dim == 32
    main([*args, "--resume"])  # the finished run resumes with the same objective (a different one is refused)
    with pytest.raises(SystemExit, match="--e2e trains through the model"):
        main([*args[:-1], str(tmp_path / "other"), "--cache", str(tmp_path)])


def test_bad_arguments_are_named(tmp_path, tiny):
    with pytest.raises(SystemExit, match="unknown trainer 'TopK'"):
        (tmp_path / "c.json").write_text(json.dumps({"trainer": "TopK"}))
        main(
            [
                "train",
                *tiny,
                "--layer",
                "0",
                "--config",
                str(tmp_path / "c.json"),
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(SystemExit, match="expects key=value"):
        main(
            [
                "train",
                *tiny,
                "--layer",
                "0",
                "--trainer",
                "TopKTrainer",
                "--set",
                "k",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(SystemExit, match="error: .*layer 9 is out of range.*run with --debug"):
        main(["cache", *tiny, "--layer", "9", "--tokens", "10", "--out", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        main(["--debug", "cache", *tiny, "--layer", "9", "--tokens", "10", "--out", str(tmp_path / "c")])
    help_text = build_parser().format_help()
    assert all(command in help_text for command in ("train", "cache", "eval", "download"))


def test_download_subcommand_reports_an_unreachable_source(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("DL_PRETRAINED_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(SystemExit) as exit_info:
        main(["download", str(tmp_path / "dest")])
    assert exit_info.value.code == 1 and "could not download" in capfd.readouterr().err


def test_eval_reads_the_site_from_a_published_folder_name(tmp_path, tiny, capsys):
    from dictionary_learning import AutoEncoder

    folder = tmp_path / "dictionaries" / "tiny" / "mlp_out_layer1" / "10_32768"
    AutoEncoder(32, 64).save_pretrained(folder)
    main(["eval", str(folder), *tiny, "--batch-texts", "4", "--n-batches", "1"])
    out = capsys.readouterr().out
    assert "Var. expl. %" in out and "% CE rec." in out and "10_32768" in out
    embed = tmp_path / "dictionaries" / "tiny" / "embed" / "10_32768"
    AutoEncoder(32, 64).save_pretrained(embed)
    main(["eval", str(embed), *tiny, "--batch-texts", "4", "--n-batches", "1", "--json"])


@pytest.mark.parametrize("size", ["0", "-3", "many"])
def test_a_batch_size_that_is_not_a_positive_int_is_refused(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--trainer", "TopKTrainer", "--steps", "2", "--batch-size", size, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "argument --batch-size: expected a positive integer" in capsys.readouterr().err


def test_bad_configs_and_texts_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    from dictionary_learning import cli

    def no_model(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    train = ["train", "--layer", "0", "--steps", "2", "--out", str(tmp_path / "run")]
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must hold a trainer config"):
        main([*train, "--config", str(tmp_path / "list.json")])
    with pytest.raises(SystemExit, match=r"TopKTrainer: lr must be a number, got 'fast'"):
        main([*train, "--trainer", "TopKTrainer", "--set", "lr=fast"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SystemExit, match="empty.txt holds no text"):
        main([*train, "--trainer", "TopKTrainer", "--texts", str(tmp_path / "empty.txt")])
    with pytest.raises(SystemExit, match="missing does not exist: give a checkpoint folder"):
        main(["eval", str(tmp_path / "missing"), "--layer", "0"])
