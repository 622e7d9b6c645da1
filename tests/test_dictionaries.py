"""Every registered dictionary: reference keys and shapes, encode/decode/forward, bias scaling, I/O."""

from __future__ import annotations

import pytest
import torch
from conftest import GROUP_SIZES, D, F, K, make_dictionary

import dictionary_learning
from dictionary_learning import DICTIONARY_REGISTRY, load_dictionary

# Spec section 2.0: keys in order -> shape, dtype.
REFERENCE_STATE_DICTS = {
    "AutoEncoder": [("bias", [D]), ("encoder.weight", [F, D]), ("encoder.bias", [F]), ("decoder.weight", [D, F])],
    "GatedAutoEncoder": [
        ("decoder_bias", [D]),
        ("r_mag", [F]),
        ("gate_bias", [F]),
        ("mag_bias", [F]),
        ("encoder.weight", [F, D]),
        ("decoder.weight", [D, F]),
    ],
    "JumpReluAutoEncoder": [("W_enc", [D, F]), ("b_enc", [F]), ("W_dec", [F, D]), ("b_dec", [D]), ("threshold", [F])],
    "AutoEncoderNew": [
        ("encoder.weight", [F, D]),
        ("encoder.bias", [F]),
        ("decoder.weight", [D, F]),
        ("decoder.bias", [D]),
    ],
    "AutoEncoderTopK": [
        ("b_dec", [D]),
        ("k", []),
        ("threshold", []),
        ("decoder.weight", [D, F]),
        ("encoder.weight", [F, D]),
        ("encoder.bias", [F]),
    ],
    "MatryoshkaBatchTopKSAE": [
        ("W_enc", [D, F]),
        ("b_enc", [F]),
        ("W_dec", [F, D]),
        ("b_dec", [D]),
        ("k", []),
        ("threshold", []),
        ("group_sizes", [len(GROUP_SIZES)]),
    ],
    "IdentityDict": [],
}
REFERENCE_STATE_DICTS["BatchTopKSAE"] = REFERENCE_STATE_DICTS["AutoEncoderTopK"]
# Beyond the reference: AbsTopK keeps TopK's layout; matching pursuit has no encoder of its own.
REFERENCE_STATE_DICTS["AbsTopKSAE"] = REFERENCE_STATE_DICTS["AutoEncoderTopK"]
REFERENCE_STATE_DICTS["MatchingPursuitSAE"] = [("W_dec", [F, D]), ("b_dec", [D]), ("k", [])]
# The crosscoder fork's layout (one site here, as conftest builds them).
REFERENCE_STATE_DICTS["CrossCoder"] = [
    ("encoder.weight", [1, D, F]),
    ("encoder.bias", [F]),
    ("decoder.weight", [1, F, D]),
    ("decoder.bias", [1, D]),
]
REFERENCE_STATE_DICTS["BatchTopKCrossCoder"] = [("k", []), ("threshold", []), *REFERENCE_STATE_DICTS["CrossCoder"]]
SPECIAL_DTYPES = {"k": torch.int32, "threshold": torch.float32, "group_sizes": torch.int64}


def test_every_reference_class_is_registered_and_exported():
    clts = {"TopKCrossLayerTranscoder", "BatchTopKCrossLayerTranscoder", "JumpReluCrossLayerTranscoder"}  # test_clt.py
    assert set(DICTIONARY_REGISTRY) == set(REFERENCE_STATE_DICTS) | clts
    for name in [*REFERENCE_STATE_DICTS, *clts]:
        assert getattr(dictionary_learning, name) is DICTIONARY_REGISTRY[name]


def test_reference_import_paths_work():
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder  # noqa: F401
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.utils import load_dictionary as utils_load

    assert AutoEncoderTopK is DICTIONARY_REGISTRY["AutoEncoderTopK"]
    assert BatchTopKSAE is DICTIONARY_REGISTRY["BatchTopKSAE"]
    assert MatryoshkaBatchTopKSAE is DICTIONARY_REGISTRY["MatryoshkaBatchTopKSAE"]
    assert utils_load is load_dictionary


def test_state_dict_keys_shapes_and_dtypes_match_reference(dict_name):
    sd = make_dictionary(dict_name).state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == REFERENCE_STATE_DICTS[dict_name]
    for key, dtype in SPECIAL_DTYPES.items():
        if key in sd:
            assert sd[key].dtype == dtype
    assert all(v.dtype == torch.float32 for k, v in sd.items() if k not in SPECIAL_DTYPES)


def test_forward_equals_decode_of_encode(dict_name):
    ae = make_dictionary(dict_name)
    x = torch.randn(5, D)
    with torch.no_grad():
        x_hat, f = ae(x, output_features=True)
        assert x_hat.shape == (5, D)
        assert f.shape == (5, ae.dict_size)
        torch.testing.assert_close(ae(x), x_hat)
        torch.testing.assert_close(ae.decode(ae.encode(x)).reshape(x_hat.shape), x_hat)  # a crosscoder's: [5, 1, D]
        if dict_name != "AutoEncoderNew":  # its forward reports features scaled by decoder norms
            torch.testing.assert_close(ae.encode(x), f)


def test_topk_keeps_k_per_row_and_batch_topk_k_on_average():
    x = torch.randn(64, D)
    with torch.no_grad():
        f = make_dictionary("AutoEncoderTopK").encode(x)
        assert ((f != 0).sum(-1) <= K).all()
        for name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            f = make_dictionary(name).encode(x, use_threshold=False)
            assert (f != 0).sum() <= K * 64


def test_scale_biases_folds_a_normalisation_factor(dict_name):
    """scaled(x) == s * original(x / s): the identity trainSAE relies on when saving."""
    ae = make_dictionary(dict_name)
    x = torch.randn(16, D) * 3
    s = 2.5
    with torch.no_grad():
        expected = ae(x / s) * s
        expected_f = ae.encode(x / s)
        ae.scale_biases(s)
        torch.testing.assert_close(ae(x), expected, rtol=1e-5, atol=1e-5)
        if dict_name not in ("IdentityDict", "AutoEncoderNew"):
            torch.testing.assert_close(ae.encode(x), expected_f * s, rtol=1e-5, atol=1e-5)


def test_scaled_state_dict_leaves_the_module_untouched(dict_name):
    ae = make_dictionary(dict_name)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    scaled = ae.scaled_state_dict(3.0)
    for k, v in ae.state_dict().items():
        assert torch.equal(v, before[k])
        if k in ae.bias_names:
            torch.testing.assert_close(scaled[k], v * 3.0)


def test_topk_threshold_sentinel_is_not_scaled():
    ae = DICTIONARY_REGISTRY["AutoEncoderTopK"](D, F, K)
    ae.scale_biases(4.0)
    assert float(ae.threshold) == -1.0


@pytest.mark.parametrize("safetensors", [False, True])
def test_save_load_round_trip_gives_identical_outputs(dict_name, tmp_path, safetensors):
    ae = make_dictionary(dict_name)
    path = ae.save_pretrained(tmp_path, safetensors=safetensors)
    assert path.name == ("ae.safetensors" if safetensors else "ae.pt")
    loaded, config = load_dictionary(tmp_path)
    assert type(loaded) is type(ae)
    assert config["trainer"]["dict_class"] == dict_name
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ae(x), rtol=0, atol=0)
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_from_pretrained_is_a_classmethod_on_every_class(dict_name, tmp_path):
    ae = make_dictionary(dict_name)
    ae.save_pretrained(tmp_path)
    cls = DICTIONARY_REGISTRY[dict_name]
    for source in (tmp_path, tmp_path / "ae.pt"):
        loaded = cls.from_pretrained(source, device="cpu", dtype=torch.float64)
        assert isinstance(loaded, cls)
        if dict_name != "IdentityDict":
            assert next(loaded.parameters()).dtype == torch.float64


def test_topk_from_pretrained_checks_k(tmp_path):
    ae = make_dictionary("AutoEncoderTopK")
    ae.save_pretrained(tmp_path)
    assert DICTIONARY_REGISTRY["AutoEncoderTopK"].from_pretrained(tmp_path, k=K).active_k == K
    with pytest.raises(ValueError, match="k=5"):
        DICTIONARY_REGISTRY["AutoEncoderTopK"].from_pretrained(tmp_path, k=5)


def test_identity_from_pretrained_accepts_reference_head_argument_order():
    ident = DICTIONARY_REGISTRY["IdentityDict"].from_pretrained(D, "unused/path")
    assert ident.activation_dim == D


def test_wrong_input_width_names_expected_and_received(dict_name):
    ae = make_dictionary(dict_name)
    with pytest.raises(ValueError, match=rf"activation_dim={D}.*width {D + 1}"):
        ae(torch.randn(3, D + 1))


@pytest.mark.parametrize(
    "args, message",
    [((0, 8), "activation_dim"), ((8, 0), "dict_size"), ((8, 4.5), "dict_size"), ((8, 16, 17), "k=17")],
)
def test_bad_sizes_are_rejected(args, message):
    cls = DICTIONARY_REGISTRY["AutoEncoderTopK"] if len(args) == 3 else DICTIONARY_REGISTRY["AutoEncoder"]
    with pytest.raises(ValueError, match=message):
        cls(*args)


def test_autoencoder_loads_bit_exact_without_normalising(tmp_path):
    ae = DICTIONARY_REGISTRY["AutoEncoder"](D, F)  # decoder columns of norm 0.1, as initialised
    ae.save_pretrained(tmp_path)
    loaded = DICTIONARY_REGISTRY["AutoEncoder"].from_pretrained(tmp_path, normalize_decoder=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ae.state_dict().values()))


def test_autoencoder_normalize_decoder_preserves_function():
    ae = make_dictionary("AutoEncoder")
    with torch.no_grad():
        ae.decoder.weight.mul_(torch.rand(F) + 0.5)
    x = torch.randn(10, D)
    with torch.no_grad():
        before = ae(x)
        ae.normalize_decoder()
        torch.testing.assert_close(ae(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decoder.weight.norm(dim=0), torch.ones(F))


def test_arbitrary_leading_dimensions():
    x = torch.randn(2, 3, D)
    for name in ("AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        with torch.no_grad():
            x_hat, f = make_dictionary(name)(x, output_features=True)
        assert x_hat.shape == (2, 3, D) and f.shape == (2, 3, F)
