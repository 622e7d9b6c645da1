"""The command line on a tiny model: cache, train (from the cache and from the model), eval, errors."""

from __future__ import annotations

import json

import pytest
import tiny_models
from helpers import tiny_cli_folder

from dictionary_learning import load_dictionary
from dictionary_learning.cli import build_parser, main


@pytest.fixture
def tiny(tmp_path):
    return tiny_cli_folder(tmp_path)


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
    assert config["buffer"]["kind"] == "tokens" and config["buffer"]["packed"] and ae.activation_dim == 32
    assert config["buffer"]["text"]["part"] == "train" and config["buffer"]["ctx_len"] == 16
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


# ------------------------------------------------------------------------------ the CLI as a sweep tool
def test_parse_trainer_spec():
    from dictionary_learning.cli import parse_trainer_spec

    assert parse_trainer_spec("TopKTrainer") == ("TopKTrainer", {})
    assert parse_trainer_spec("TopKTrainer:k=32,64,lr=3e-4") == ("TopKTrainer", {"k": [32, 64], "lr": [3e-4]})
    assert parse_trainer_spec("MatryoshkaBatchTopKTrainer:group_fractions=[0.25,0.75],[0.5,0.5]") == (
        "MatryoshkaBatchTopKTrainer",
        {"group_fractions": [[0.25, 0.75], [0.5, 0.5]]},
    )
    with pytest.raises(SystemExit, match="expected NAME or NAME:key=value"):
        parse_trainer_spec("TopKTrainer:32")
    with pytest.raises(SystemExit, match="k is given twice"):
        parse_trainer_spec("TopKTrainer:k=1,k=2")


def test_per_trainer_sweeps_several_layers_and_short_run_warmups(tmp_path, tiny, capsys, caplog):
    out = tmp_path / "run"
    main(
        ["train", *tiny, "--layer", "0", "1", "--site", "mlp", "--trainer", "TopKTrainer:k=2,4",
         "--trainer", "StandardTrainer:l1_penalty=0.04", "--set", "dict_size=64", "--steps", "6",
         "--batch-size", "16", "--n-ctxs", "8", "--out", str(out)]
    )  # fmt: skip
    configs = [load_dictionary(out / f"trainer_{i}")[1] for i in range(6)]
    settings = sorted(
        (c["trainer"]["trainer_class"], c["trainer"].get("k"), c["trainer"].get("l1_penalty"), c["site"]["layer"])
        for c in configs
    )
    assert settings == sorted(
        [(name, k, l1, layer) for name, k, l1 in [("TopKTrainer", 2, None), ("TopKTrainer", 4, None),
         ("StandardTrainer", None, 0.04)] for layer in (0, 1)]
    )  # fmt: skip
    assert {c["site"]["module"] for c in configs} == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(c["trainer"]["warmup_steps"] == 1 for c in configs)  # 1,000 would swallow a 6-step run
    assert "TopKTrainer: a 6-step run: warmup_steps 1000 -> 1" in caplog.text


def test_a_short_text_is_refused_before_training_unless_looped(tmp_path, tiny):
    train = ["train", *tiny, "--layer", "0", "--trainer", "TopKTrainer:k=2", "--set", "dict_size=64",
             "--batch-size", "64", "--n-ctxs", "200"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"error: the data holds \d+ batches of 64 activations but 500 steps"):
        main([*train, "--steps", "500", "--out", str(tmp_path / "a")])
    main([*train, "--steps", "40", "--loop", "--out", str(tmp_path / "b")])
    assert load_dictionary(tmp_path / "b" / "trainer_0")[1]["steps_trained"] == 40


def test_cache_options_and_a_short_text(tmp_path, tiny):
    cache = ["cache", *tiny, "--layer", "1", "--site", "mlp", "--out"]
    with pytest.raises(SystemExit, match=r"100,000 tokens asked, but the text holds only [\d,]+: ask for at most"):
        main([*cache, str(tmp_path / "a"), "--tokens", "100000"])
    main([*cache, str(tmp_path / "b"), "--tokens", "100000", "--allow-fewer", "--remove-bos", "--no-pack"])
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["remove_bos"] and not manifest["packed"] and manifest["text"]["part"] == "train"
    assert manifest["model"] == str(tmp_path / "tiny")


def test_eval_uses_and_checks_the_recorded_site_model_and_text(tmp_path, tiny, capsys):
    main(["train", *tiny, "--layer", "1", "--site", "mlp", "--trainer", "TopKTrainer:k=2", "--set", "dict_size=64",
          "--steps", "4", "--batch-size", "16", "--n-ctxs", "8", "--out", str(tmp_path / "run")])  # fmt: skip
    run = str(tmp_path / "run" / "trainer_0")
    capsys.readouterr()
    main(["eval", run, *tiny, "--batch-texts", "2", "--n-batches", "1"])  # no --layer: the recorded site
    out = capsys.readouterr().out
    assert "model.layers.1.mlp" in out and "clean CE" in out and "[95% CI]" in out
    assert "text: the held_out part of" in out
    with pytest.raises(SystemExit, match=r"was trained on model.layers.1.mlp, not on model.layers.0.mlp"):
        main(["eval", run, *tiny, "--layer", "0", "--site", "mlp"])
    with pytest.raises(SystemExit, match=r"trained on the train part of .*texts, and the train part of it"):
        main(["eval", run, *tiny, "--part", "train"])
    main(["eval", run, *tiny, "--part", "train", "--allow-training-text", "--batch-texts", "2", "--n-batches", "1"])
    other = tmp_path / "other"
    tiny_models.llama(d_model=48)._module.save_pretrained(other)
    tiny_models.tokenizer().save_pretrained(other)
    with pytest.raises(SystemExit, match=rf"was trained on '{tmp_path / 'tiny'}', not on '{other}'"):
        main(["eval", run, *tiny[2:], "--model", str(other)])


def test_eval_json_has_the_interval_and_token_count(tmp_path, tiny, capsys):
    from dictionary_learning import AutoEncoder

    folder = tmp_path / "dictionaries" / "tiny" / "mlp_out_layer1" / "10_32768"
    AutoEncoder(32, 64).save_pretrained(folder)
    capsys.readouterr()
    main(["eval", str(folder), *tiny, "--batch-texts", "3", "--n-batches", "2", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["site"] == "model.layers.1.mlp" and record["n_sequences"] == 6 and record["n_tokens"] > 50
    assert record["ce_diff_lo"] <= record["ce_diff_pooled"] <= record["ce_diff_hi"]
    assert record["text"]["part"] == "held_out"
    wide = tmp_path / "dictionaries" / "tiny" / "mlp_out_layer0" / "10_32768"
    AutoEncoder(48, 64).save_pretrained(wide)
    with pytest.raises(SystemExit, match=r"reads width 48, but model.layers.0.mlp of .* has width 32"):
        main(["eval", str(wide), *tiny])


def test_download_one_sweep_dictionary_from_a_mirror(tmp_path, monkeypatch, capsys):
    from conftest import make_dictionary

    from dictionary_learning.hub import SWEEPS

    mirror = tmp_path / "mirror"
    make_dictionary("AutoEncoderTopK").save_pretrained(mirror / SWEEPS["topk"] / "resid_post_layer_3" / "trainer_7")
    monkeypatch.setenv("DL_SWEEPS_SOURCE", str(mirror))
    main(["download", str(tmp_path / "dest"), "--site", "resid_post_layer_3", "--trainer", "7"])
    folder = tmp_path / "dest" / "dictionaries" / SWEEPS["topk"] / "resid_post_layer_3" / "trainer_7"
    assert type(load_dictionary(folder)[0]).__name__ == "AutoEncoderTopK" and str(folder) in capsys.readouterr().out
    with pytest.raises(
        SystemExit, match="has no dictionary pythia70m_sweep_topk_ctx128_0730/resid_post_layer_3/trainer_8"
    ):
        main(["download", str(tmp_path / "dest"), "--site", "resid_post_layer_3", "--trainer", "8"])
    with pytest.raises(SystemExit, match="--site resid_post_layer_<layer> --trainer <i>"):
        main(["download", "--site", "mlp_out_layer3", "--trainer", "1"])


def test_eval_notes_a_user_lm_name_that_differs_but_evaluates(tmp_path, tiny, capsys):
    from dictionary_learning import AutoEncoder

    folder = tmp_path / "mine"
    AutoEncoder(32, 64).save_pretrained(folder, config={"trainer": {"lm_name": "my-llama", "layer": 1}})
    main(["eval", str(folder), *tiny, "--site", "mlp", "--layer", "1", "--batch-texts", "2", "--n-batches", "1"])
    captured = capsys.readouterr()
    assert "names lm_name 'my-llama'" in captured.err and "model.layers.1.mlp" in captured.out


def test_train_and_eval_transcoders_and_crosscoders(tmp_path, tiny, capsys):
    common = [*tiny, "--set", "dict_size=64", "--steps", "6", "--batch-size", "16", "--n-ctxs", "8"]
    main(["train", *common, "--layer", "1", "--transcoder", "--trainer", "TopKTrainer:k=4,skip_connection=false,true",
          "--trainer", "JumpReluTrainer", "--out", str(tmp_path / "tc")])  # fmt: skip
    configs = [load_dictionary(tmp_path / "tc" / f"trainer_{i}") for i in range(3)]
    assert [c["site"]["module"] for _, c in configs] == ["model.layers.1.mlp"] * 3
    assert [c["site"]["io"] for _, c in configs] == ["in_to_out"] * 3
    assert all(ae.transcoder for ae, _ in configs) and [ae.skip_connection for ae, _ in configs] == [False, True, False]
    main(["train", *common, "--layer", "0", "1", "--crosscoder", "--trainer", "BatchTopKCrossCoderTrainer:k=4",
          "--out", str(tmp_path / "cc")])  # fmt: skip
    ae, config = load_dictionary(tmp_path / "cc" / "trainer_0")
    assert type(ae).__name__ == "BatchTopKCrossCoder" and ae.num_layers == 2 and config["site"]["layer"] == [0, 1]
    capsys.readouterr()
    main(["eval", str(tmp_path / "tc" / "trainer_1"), str(tmp_path / "cc" / "trainer_0"), *tiny, "--n-batches", "1",
          "--batch-texts", "4", "--json"])  # fmt: skip
    transcoder, crosscoder = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert transcoder["site"] == "model.layers.1.mlp" and transcoder["n_tokens"] > 0
    assert {"frac_recovered_site_0", "frac_recovered_site_1", "frac_variance_explained_site_1"} <= set(crosscoder)
    main(["eval", str(tmp_path / "cc" / "trainer_0"), *tiny, "--n-batches", "1", "--batch-texts", "4"])
    table = capsys.readouterr().out
    assert "site 0" in table and "site 1" in table
    main(["features", str(tmp_path / "tc" / "trainer_1"), *tiny, "--contexts", "8", "--out", str(tmp_path / "tf")])
    assert "Promoted tokens" in next((tmp_path / "tf").glob("feature_*.html")).read_text()  # writes the MLP output
    with pytest.raises(SystemExit, match="a crosscoder reads several sites"):
        main(["train", *common, "--layer", "0", "--crosscoder", "--trainer", "CrossCoderTrainer",
              "--out", str(tmp_path / "x")])  # fmt: skip


def test_a_paired_model_crosscoder_from_the_cli(tmp_path, tiny, capsys):
    other = tiny_models.llama(seed=1)
    other._module.save_pretrained(tmp_path / "tuned")
    other.tokenizer.save_pretrained(tmp_path / "tuned")
    main(["train", *tiny, "--layer", "1", "--crosscoder", "--paired-model", str(tmp_path / "tuned"),
          "--trainer", "CrossCoderTrainer", "--set", "dict_size=64", "--steps", "6", "--batch-size", "16",
          "--n-ctxs", "8", "--out", str(tmp_path / "diff")])  # fmt: skip
    ae, config = load_dictionary(tmp_path / "diff" / "trainer_0")
    assert config["buffer"]["paired_model"] == str(tmp_path / "tuned") and ae.num_layers == 2
    capsys.readouterr()
    main(["eval", str(tmp_path / "diff" / "trainer_0"), *tiny, "--n-batches", "1", "--batch-texts", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["loss_original_site_0"] != result["loss_original_site_1"]  # two different models
    main(["features", str(tmp_path / "diff" / "trainer_0"), *tiny, "--contexts", "8", "--out", str(tmp_path / "f")])
    index = (tmp_path / "f" / "index.html").read_text()
    assert "rel. decoder norm" in index
    page = next((tmp_path / "f").glob("feature_*.html")).read_text()
    assert "relative decoder norm" in page and "writes to" in page


def test_an_explicit_warmup_longer_than_half_a_short_run_is_refused(tmp_path, tiny):
    with pytest.raises(SystemExit, match="warmup_steps=5 takes more than half of the 6-step run"):
        main(["train", *tiny, "--layer", "0", "--trainer", "TopKTrainer:k=2", "--set", "warmup_steps=5",
              "--steps", "6", "--batch-size", "16", "--n-ctxs", "8", "--out", str(tmp_path / "run")])  # fmt: skip
