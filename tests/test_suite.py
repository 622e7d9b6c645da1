"""Judging a sweep: sparse probing, absorption, seeds and the report, on a tiny model (the real
model's numbers are in the docs), and every bad input named before the model loads."""

from __future__ import annotations

import json

import pytest
import tiny_models
from helpers import tiny_cli_folder

from dictionary_learning import AutoEncoder
from dictionary_learning.absorption import feature_absorption, vocabulary_words
from dictionary_learning.cli import main
from dictionary_learning.probing import ProbeData, probe_features, read_probe_file, sparse_probing
from dictionary_learning.reader import ActivationReader
from dictionary_learning.suite import Entry, group_by_seed, report, within_noise

TOPICS = {
    "animals": ["The quick brown fox jumps over the lazy dog.", "A dog and a fox ran home."],
    "sayings": ["To be, or not to be, that is the question.", "Knowledge is power, all that glitters is not gold."],
}


def labelled(n_per_class: int = 30) -> ProbeData:
    texts, labels = [], []
    for label, sentences in TOPICS.items():
        for i in range(n_per_class):
            texts.append(f"{sentences[i % 2]} Item {i} of {label}.")
            labels.append(label)
    return ProbeData(texts, labels, "tiny topics")


def test_probe_data_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="has one class \\('a'\\): probing needs at least two"):
        ProbeData(["x", "y"], ["a", "a"], "one-class")
    with pytest.raises(ValueError, match="holds no texts"):
        ProbeData([], [], "empty")
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl, row 1: no 'label' field \(--text-field / --label-field"):
        read_probe_file(tmp_path / "p.jsonl")
    (tmp_path / "p.csv").write_text("body,topic\nhello,a\nworld,b\n")
    data = read_probe_file(tmp_path / "p.csv", text_field="body", label_field="topic")
    with pytest.raises(ValueError, match=r"too few training texts for .* \(at least 4 per class"):
        data.split()


def test_sparse_probing_on_a_tiny_model_gives_saebench_names_and_a_recorded_split():
    model = tiny_models.gpt_neox()
    data = labelled()
    reader = ActivationReader([], model, model.gpt_neox.layers[1], ctx_len=16, pack=False, remove_bos=True)
    aes = [AutoEncoder(32, 64), AutoEncoder(32, 64)]
    features = probe_features(reader, data.texts, aes, batch_size=8)
    assert [f.shape for f in features] == [(60, 32), (60, 64), (60, 64)]
    llm, records = sparse_probing(features[0], features[1:], data, ks=(1, 2, 5))
    assert 0.5 <= llm["llm_test_accuracy"] <= 1.0 and set(llm["per_class"]["llm_test_accuracy"]) == set(TOPICS)
    assert set(records[0]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy",
                               "sae_top_5_test_accuracy", "per_class"}  # fmt: skip
    record = data.record()
    assert record["n_train"] + record["n_test"] == 60 and "sha256" in record["split_rule"]


def test_absorption_on_a_model_whose_probe_cannot_spell_says_so_with_the_probe_f1():
    model = tiny_models.gpt_neox()
    words = vocabulary_words(model.tokenizer, words_per_letter=20)
    assert words.words and all(len(w) >= 2 and w.isalpha() for w in words.words)
    reader = ActivationReader([], model, model.gpt_neox.layers[1], ctx_len=256, pack=False)
    probe, records = feature_absorption(reader, [AutoEncoder(32, 64)], words_per_letter=20)
    assert probe["measurable"] is False and "not measurable on this model" in probe["why"]
    assert set(probe["probe_f1"]) == set("abcdefghijklmnopqrstuvwxyz")
    assert records == [{"measurable": False, "why": probe["why"]}]


def test_seed_groups_report_mean_and_spread_and_mark_differences_within_noise():
    def entry(name, seed, k, fve):
        return Entry(name, None, {"trainer": {"k": k, "seed": seed}}, {"core/frac_variance_explained": fve})

    entries = [entry("a0", 0, 8, 0.50), entry("a1", 1, 8, 0.60), entry("b0", 0, 16, 0.58), entry("b1", 1, 16, 0.60)]
    groups = group_by_seed(entries)
    assert [[e.name for e in g] for g in groups] == [["a0", "a1"], ["b0", "b1"]]
    assert within_noise((0.55, 0.07), (0.59, 0.014)) and not within_noise((0.5, 0.0), (0.6, 0.0))
    lines = report(entries)
    assert "0.550±0.071~" in lines[1] and "0.590±0.014" in lines[2]


@pytest.fixture
def tiny(tmp_path):
    return tiny_cli_folder(tmp_path)


def test_eval_of_a_run_folder_with_seeds_probing_json_and_plots(tmp_path, tiny, capsys):
    probe = tmp_path / "probe.jsonl"
    data = labelled()
    probe.write_text("".join(json.dumps({"text": t, "topic": lab}) + "\n" for t, lab in zip(data.texts, data.labels)))
    main(["train", *tiny, "--layer", "1", "--trainer", "TopKTrainer:k=4", "--seeds", "2", "--steps", "4",
          "--batch-size", "16", "--n-ctxs", "8", "--out", str(tmp_path / "run")])  # fmt: skip
    assert [json.loads((tmp_path / "run" / f"trainer_{i}" / "config.json").read_text())["trainer"]["seed"]
            for i in range(2)] == [0, 1]  # fmt: skip
    capsys.readouterr()
    main(["eval", str(tmp_path / "run"), *tiny, "--suite", "core,sparse_probing", "--probe-data", str(probe),
          "--label-field", "topic", "--n-batches", "1", "--batch-texts", "4", "--json", str(tmp_path / "r.json"),
          "--plots", str(tmp_path / "plots"), "--allow-training-text"])  # fmt: skip
    out = capsys.readouterr().out
    records = json.loads((tmp_path / "r.json").read_text())
    assert len(records) == 2 and all("sparse_probing/sae_top_1_test_accuracy" in r for r in records)
    assert all("core/frac_variance_explained" in r and "sparse_probing/overlap" in r for r in records)
    assert "trainer_0" in out and "±" in out and "top-1" in out and (tmp_path / "plots" / "pareto.png").is_file()


def test_bad_suite_inputs_fail_before_the_model_loads(tmp_path, tiny):
    with pytest.raises(SystemExit, match="unknown suite \\['probes'\\]"):
        main(["eval", str(tmp_path), "--suite", "core,probes"])
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    with pytest.raises(SystemExit, match="one class"):
        main(["eval", str(tmp_path), "--suite", "sparse_probing", "--probe-data", str(tmp_path / "one.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no texts"):
        main(["eval", str(tmp_path), "--suite", "sparse_probing", "--probe-data", str(tmp_path / "empty.jsonl")])
    with pytest.raises(SystemExit, match="holds no dictionary"):
        main(["eval", str(tmp_path), *tiny])
    with pytest.raises(SystemExit, match="--seeds sets every trainer's seed"):
        main(["train", *tiny, "--layer", "1", "--trainer", "TopKTrainer:k=4,seed=3", "--seeds", "2", "--steps", "4",
              "--out", str(tmp_path / "x")])  # fmt: skip
