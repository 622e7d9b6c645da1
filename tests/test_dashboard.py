"""Feature dashboards: the statistics of one pass, the pages built from them, the CLI command, and
the pages rendered by headless Chromium (when it is installed)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import tiny_models
import torch
from helpers import tiny_cli_folder

from dictionary_learning.buffer import ActivationReader
from dictionary_learning.dashboard import (
    collect_feature_stats,
    feature_page,
    first_position_share,
    logit_lens_tokens,
    quantile_examples,
    top_examples,
    write_dashboard,
)
from dictionary_learning.dictionaries import AutoEncoder
from dictionary_learning.interp import feature_activations

LONG = [" ".join(tiny_models.SENTENCES[i : i + 6]) for i in range(0, 36, 3)]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if tag == "a" and k == "href"]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_models.llama()
    ae = AutoEncoder(32, 48)
    reader = ActivationReader(LONG, model, model.model.layers[1], ctx_len=16)
    stats = collect_feature_stats(ae, reader, reader.data, batch_size=5, max_contexts=30)
    return model, ae, reader, stats


def test_the_stats_hold_every_nonzero_activation(setup):
    model, ae, reader, stats = setup
    fresh = ActivationReader(LONG, model, model.model.layers[1], ctx_len=16)
    tokens = reader.tokenize(list(itertools.islice(fresh.data, 30)))

    f = feature_activations(ae, reader, tokens)
    assert stats.values.numel() == int((f != 0).sum()) and stats.n_tokens == int(tokens["attention_mask"].sum())
    feature = int(stats.density().argmax())
    rows, positions, values = stats.of(feature)
    torch.testing.assert_close(values, f[rows, positions, feature])
    assert torch.allclose(stats.density()[feature], (f[..., feature] != 0).sum().double() / stats.n_tokens)
    share = first_position_share(stats)
    assert float(share[feature]) == pytest.approx(float((positions == 0).float().mean()))


def test_examples_are_one_per_context_and_strongest_first(setup):
    _, _, _, stats = setup
    feature = int(stats.density().argmax())
    examples = top_examples(stats, feature, k=8)
    assert len({e.row for e in examples}) == len(examples) and len(examples) > 1
    assert [e.value for e in examples] == sorted((e.value for e in examples), reverse=True)
    assert examples[0].value == pytest.approx(float(stats.of(feature)[2].max()))
    bins = quantile_examples(stats, feature, n_bins=4)
    assert all(low < e.value <= high for low, high, examples in bins for e in examples)
    assert bins[0][1] == pytest.approx(examples[0].value)  # the strongest interval comes first


def test_logit_lens_matches_the_unembedding(setup):
    model, ae, reader, _ = setup
    promoted, suppressed = logit_lens_tokens(ae, model, reader.tokenizer, k=3)
    hf = model._module
    with torch.no_grad():
        logits = hf.lm_head.weight @ (ae.decoder_FD()[5] * hf.model.norm.weight)
    assert promoted[5][0][1] == pytest.approx(float(logits.max()), rel=1e-4)
    assert suppressed[5][0][1] == pytest.approx(float(logits.min()), rel=1e-4)
    assert promoted[5][0][0] == reader.tokenizer.decode([int(logits.argmax())])


def test_pages_link_up_and_show_every_section(setup, tmp_path):
    _, _, _, stats = setup
    index = write_dashboard(stats, tmp_path / "dash", title="tiny")
    parser = Links()
    parser.feed(index.read_text())
    pages = sorted(tmp_path.glob("dash/feature_*.html"))
    assert len(pages) == len(torch.unique(stats.features)) and parser.links
    assert all((tmp_path / "dash" / link).is_file() for link in parser.links)
    page = feature_page(stats, int(stats.density().argmax()), title="tiny")
    for section in ("Activation histogram", "Top activations", "Activations in (", "Promoted tokens", "<svg"):
        assert section in page
    assert 'class="peak"' in page and "&larr; all features" in page
    with pytest.raises(ValueError, match="feature 99 is out of range"):
        write_dashboard(stats, tmp_path / "bad", features=[99])


def test_first_position_features_are_flagged(tmp_path):
    model = tiny_models.llama()
    ae = AutoEncoder(32, 8)
    reader = ActivationReader(LONG, model, model.model.layers[1], ctx_len=16)
    stats = collect_feature_stats(ae, reader, reader.data, max_contexts=10)
    feature = int(stats.density().argmax())
    stats.positions[stats.features == feature] = 0  # pretend it fires only at position 0
    stats.__post_init__()
    assert float(first_position_share(stats)[feature]) == 1.0
    assert "a BOS / attention-sink feature" in feature_page(stats, feature)
    assert "first position</span>" in write_dashboard(stats, tmp_path / "d").read_text()


def test_the_features_command_reads_the_recorded_site(tmp_path, capsys):
    from dictionary_learning.cli import main

    tiny = tiny_cli_folder(tmp_path)
    main(["train", *tiny, "--layer", "1", "--site", "mlp", "--trainer", "TopKTrainer:k=4", "--set", "dict_size=64",
          "--steps", "4", "--batch-size", "16", "--n-ctxs", "8", "--out", str(tmp_path / "run")])  # fmt: skip
    capsys.readouterr()
    main(["features", str(tmp_path / "run" / "trainer_0"), *tiny, "--features", "0", "1", "--out", str(tmp_path / "f")])
    assert "held_out tokens of" in capsys.readouterr().out
    index = (tmp_path / "f" / "index.html").read_text()
    assert "model.layers.1.mlp" in index and sorted(p.name for p in tmp_path.glob("f/feature_*")) == [
        "feature_0.html",
        "feature_1.html",
    ]
    with pytest.raises(SystemExit, match="trained on the train part"):
        main(["features", str(tmp_path / "run" / "trainer_0"), *tiny, "--part", "train"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page, png, width=1400, height=1100):
    """Headless Chromium's rendering of a local page (flags that keep it off the network)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_pages_render_in_headless_chromium(setup, tmp_path):
    _, _, _, stats = setup
    index = write_dashboard(stats, tmp_path / "dash", title="tiny")
    feature = int(stats.density().argmax())
    for page in (index, tmp_path / "dash" / f"feature_{feature}.html"):
        png = tmp_path / (page.stem + ".png")
        result = screenshot(page, png)
        assert png.is_file(), result.stderr[-2000:]
        from matplotlib.image import imread

        pixels = imread(png)
        assert pixels.shape[0] == 1100 and pixels.shape[1] == 1400
        assert float(pixels[..., :3].std()) > 0.05  # text and shading were drawn, not a blank page
        dump = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert re.search(r"Feature|Features", dump.stdout)
