from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from dictionary_learning import DICTIONARY_REGISTRY  # noqa: E402

D, F, K = 8, 32, 4
GROUP_SIZES = [8, 8, 16]


def make_dictionary(name: str, seed: int = 0):
    """An instance of a registered class at test size, with non-zero biases and thresholds so that
    bias-dependent code paths are exercised."""
    torch.manual_seed(seed)
    cls = DICTIONARY_REGISTRY[name]
    if name == "IdentityDict":
        return cls(D)
    kwargs = {"k": K} if "TopK" in name or name == "MatchingPursuitSAE" else {}
    if name == "MatryoshkaBatchTopKSAE":
        kwargs["group_sizes"] = GROUP_SIZES
    if "CrossCoder" in name:
        kwargs["num_layers"] = 1  # one site: [B, D] rows in and out, like an SAE (tests/test_crosscoders.py: more)
    ae = cls(D, F, **kwargs)
    with torch.no_grad():
        for name_, t in list(ae.named_parameters()) + list(ae.named_buffers()):
            if name_ in ae.bias_names:
                t.copy_(torch.rand_like(t) * 0.2 if name_ == "threshold" else torch.randn_like(t) * 0.1)
    if hasattr(ae, "normalize_decoder"):
        ae.normalize_decoder()  # trained AutoEncoders have unit-norm decoder columns
    return ae


# Cross-layer transcoders read [B, L, D] (every layer's MLP input): tests/test_clt.py covers them.
SINGLE_SITE = sorted(name for name in DICTIONARY_REGISTRY if "CrossLayerTranscoder" not in name)


@pytest.fixture(params=SINGLE_SITE)
def dict_name(request) -> str:
    return request.param


# ------------------------------------------------------ the offline model and texts (reference_suite)
@pytest.fixture(scope="session")
def model_dir() -> str:
    """The local Hugging Face folder of the offline SmolLM2 (built on first use)."""
    from dictionary_learning.models import default_cache_dir, load_default_model

    load_default_model()
    return str(default_cache_dir())


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """The offline BBC News articles."""
    from dictionary_learning.models import default_texts

    return list(default_texts())
