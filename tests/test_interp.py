"""Interpretation helpers on a tiny model: contexts, the HTML page, feature effects."""

from __future__ import annotations

import tiny_models
import torch
from tiny_models import SENTENCES

from dictionary_learning import AutoEncoder, IdentityDict
from dictionary_learning.buffer import ActivationReader
from dictionary_learning.interp import examine_dimension, feature_effect, feature_html, top_activating_contexts


def test_top_contexts_end_at_the_peak_and_are_sorted(tmp_path):
    model = tiny_models.llama()
    site = model.model.layers[1].mlp
    reader = ActivationReader(iter(()), model, site, ctx_len=32)
    torch.manual_seed(0)
    ae = AutoEncoder(32, 64)
    contexts = top_activating_contexts(ae, reader, feature=3, texts=SENTENCES, k=5, batch_size=8)
    assert 0 < len(contexts) <= 5
    peaks = [c.max_activation for c in contexts]
    assert peaks == sorted(peaks, reverse=True) and all(c.activations[-1] == c.max_activation for c in contexts)
    page = feature_html(3, contexts, tmp_path / "feature.html")
    assert (tmp_path / "feature.html").read_text() == page
    assert page.count("<tr>") == len(contexts) + 1 and "rgba(255, 110, 0, 1.00)" in page


def test_feature_effect_is_zero_for_a_silent_feature_and_the_profile_has_all_parts():
    model = tiny_models.llama()
    site = model.model.layers[1].mlp
    ae = AutoEncoder(32, 64)
    with torch.no_grad():
        ae.encoder.bias[7] = -1e4  # feature 7 never fires: ablating it changes nothing
    tokens, values = feature_effect(model, site, ae, 7, SENTENCES[:4], k=5)
    assert len(tokens) == 5 and torch.allclose(values, torch.zeros(5), atol=1e-5)
    profile = examine_dimension(model, site, iter(SENTENCES), IdentityDict(32), n_inputs=12, k=5)
    assert profile.top_contexts and profile.top_tokens and len(profile.top_affected[0]) == 5
