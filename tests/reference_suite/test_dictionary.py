"""The scenarios of the reference's tests/unit/test_dictionary.py (saprmarks/dictionary_learning at
60ec6bf), written anew against the same calls: forward == decode(encode(x)), `output_features`,
hand-set weights through the reference's parameter names, `normalize_decoder`, `scale_biases`,
output shapes. Adaptations: none needed (no model, no data, CPU)."""

from __future__ import annotations

import pytest
import torch as t

from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder


@pytest.mark.parametrize("sae_cls", [AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder])
def test_forward_is_decode_of_encode(sae_cls):
    x = t.randn(5, 8)
    sae = sae_cls(activation_dim=8, dict_size=12)
    assert t.allclose(sae(x), sae.decode(sae.encode(x)))
    x_hat, features = sae(x, output_features=True)
    assert t.allclose(features, sae.encode(x)) and t.allclose(x_hat, sae.decode(features))


def test_autoencoder_with_identity_weights():
    sae = AutoEncoder(activation_dim=2, dict_size=2)
    with t.no_grad():
        sae.encoder.weight.data = t.eye(2)
        sae.decoder.weight.data = t.eye(2)
        sae.encoder.bias.data = t.zeros(2)
        sae.bias.data = t.zeros(2)
    f = sae.encode(t.tensor([[3.0, -2.0]]))
    assert t.equal(f, t.tensor([[3.0, 0.0]]))  # the ReLU drops the negative part
    assert t.equal(sae.decode(f), t.tensor([[3.0, 0.0]]))


def test_gated_autoencoder_with_identity_weights():
    sae = GatedAutoEncoder(activation_dim=2, dict_size=2)
    with t.no_grad():
        sae.encoder.weight.data = t.eye(2)
        sae.decoder.weight.data = t.eye(2)
        for name in ("gate_bias", "mag_bias", "r_mag", "decoder_bias"):
            getattr(sae, name).data = t.zeros(2)
    assert t.equal(sae.encode(t.tensor([[3.0, -2.0]])), t.tensor([[3.0, 0.0]]))


def test_normalize_decoder_keeps_the_function():
    sae = AutoEncoder(activation_dim=6, dict_size=4)
    with t.no_grad():
        sae.decoder.weight.mul_(t.rand(1, 4) * 3 + 0.5)  # columns of various norms
    x = t.randn(3, 6)
    before = sae(x)
    sae.normalize_decoder()
    assert t.allclose(sae.decoder.weight.norm(dim=0), t.ones(4))
    assert t.allclose(sae(x), before, atol=1e-4)


def test_scale_biases_multiplies_every_bias():
    sae = AutoEncoder(activation_dim=4, dict_size=3)
    with t.no_grad():
        sae.encoder.bias.normal_()
        sae.bias.normal_()
    encoder_bias, bias = sae.encoder.bias.clone(), sae.bias.clone()
    sae.scale_biases(3.0)
    assert t.allclose(sae.encoder.bias, 3.0 * encoder_bias) and t.allclose(sae.bias, 3.0 * bias)


@pytest.mark.parametrize("sae_cls", [AutoEncoder, GatedAutoEncoder, AutoEncoderNew, JumpReluAutoEncoder])
def test_shapes(sae_cls):
    x = t.randn(7, 4)
    sae = sae_cls(activation_dim=4, dict_size=9)
    assert sae.encode(x).shape == (7, 9) and sae.decode(sae.encode(x)).shape == (7, 4)
    assert sae(x).shape == (7, 4)
    x_hat, f = sae(x, output_features=True)
    assert x_hat.shape == (7, 4) and f.shape == (7, 9)
