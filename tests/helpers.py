"""What several test files share: synthetic runs, the recipes' learning configs, reference
activations read with plain forward hooks, and a tiny cache. Test files import from here, never
from each other."""

from __future__ import annotations

import json

import tiny_models
import torch
from tiny_models import SENTENCES

from dictionary_learning.cache import ActivationCache
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    PAnnealTrainer,
    StandardTrainer,
    TopKTrainer,
)

# ------------------------------------------------------------------ a small multi-trainer run (trainSAE)
D, F, STEPS = 32, 64, 60
COMMON = dict(activation_dim=D, dict_size=F, warmup_steps=5, seed=0, layer=2, lm_name="synthetic", device="cpu")
CONFIGS = [
    dict(trainer=TopKTrainer, k=4, threshold_start_step=5, **COMMON),
    dict(trainer=StandardTrainer, sparsity_warmup_steps=10, resample_steps=20, l1_penalty=1.0, **COMMON),
    dict(trainer=PAnnealTrainer, sparsity_warmup_steps=10, anneal_start=10, **COMMON),
    dict(trainer=JumpReluTrainer, sparsity_warmup_steps=10, lr=1e-3, target_l0=4, **COMMON),
]


def batches(n=STEPS, scale=5.0):
    return (x * scale + 1.0 for x in PlantedFeatures(d=D).batches(n, batch_size=128))


class CountingData:
    def __init__(self, n, **kw):
        self.n, self.kw, self.drawn = n, kw, 0

    def __iter__(self):
        for x in batches(self.n, **self.kw):
            self.drawn += 1
            yield x


def resume_state(run, i=0):
    """Trainer i's state in the run's last complete backup (what resume_from loads)."""
    index = json.loads((run / "resume.json").read_text())
    return torch.load(run / index["trainers"][i]["file"], weights_only=True)


def weights(dictionaries):
    return [{k: v.clone() for k, v in d.state_dict().items()} for d in dictionaries]


def assert_same_weights(a, b, atol=0.0):
    for sd_a, sd_b in zip(a, b):
        for key in sd_a:
            torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0 if atol == 0 else 1e-5, atol=atol, msg=key)


# ----------------------------------------------------------------- each recipe learns planted features
LEARN_D, LEARN_F = 32, 64
LEARN_COMMON = dict(
    activation_dim=LEARN_D, dict_size=LEARN_F, warmup_steps=20, seed=0, device="cpu"
)  # CUDA: test_cuda.py
LEARN_PENALISED = dict(LEARN_COMMON, sparsity_warmup_steps=50)
LEARN_TOPK = dict(LEARN_COMMON, k=4, threshold_start_step=50)

# Per trainer: config and steps with which it recovers nearly all 48 planted features (batch 256).
# The same configs recover the same counts with the reference package (benchmarks/recovery_vs_reference.py).
LEARNING_CONFIGS = {
    "StandardTrainer": (dict(LEARN_PENALISED, lr=3e-3, l1_penalty=0.3), 1000),
    "StandardTrainerAprilUpdate": (dict(LEARN_PENALISED, lr=3e-3, l1_penalty=0.3), 1000),
    "GatedSAETrainer": (dict(LEARN_PENALISED, lr=3e-3, l1_penalty=1.0), 3000),
    "PAnnealTrainer": (dict(LEARN_PENALISED, lr=3e-3, initial_sparsity_penalty=0.3, anneal_start=500, p_end=0.5), 1000),
    "GatedAnnealTrainer": (
        dict(LEARN_PENALISED, lr=1e-3, initial_sparsity_penalty=1.0, anneal_start=1500, p_end=0.5),
        3000,
    ),
    "TopKTrainer": (LEARN_TOPK, 1000),
    "BatchTopKTrainer": (LEARN_TOPK, 1000),
    "AbsTopKTrainer": (LEARN_TOPK, 1000),
    "MatchingPursuitTrainer": (dict(LEARN_COMMON, k=4, lr=3e-3), 1000),
    # The first group must reconstruct alone, so it needs room for the 48 planted features.
    "MatryoshkaBatchTopKTrainer": (dict(LEARN_TOPK, group_fractions=[0.75, 0.25]), 1000),
    "JumpReluTrainer": (dict(LEARN_PENALISED, lr=3e-3, target_l0=4), 1000),
    # One site: a crosscoder is then an SAE (two sites and model diffing: tests/test_crosscoders.py).
    "CrossCoderTrainer": (dict(LEARN_PENALISED, num_layers=1, lr=3e-3, l1_penalty=0.3), 1000),
    "BatchTopKCrossCoderTrainer": (dict(LEARN_TOPK, num_layers=1), 1000),
}

# Cross-layer transcoders read [B, L, 2, D] (every layer's MLP input and output): their learning test
# is tests/test_clt.py's, on planted cross-layer latents (4 layers of 32, 12 latents each).
CLT_CONFIGS = {
    "TopKCLTTrainer": dict(activation_dim=32, dict_size=32, num_layers=4, warmup_steps=20, lr=3e-3, seed=0, k=4),
    "BatchTopKCLTTrainer": dict(
        activation_dim=32, dict_size=32, num_layers=4, warmup_steps=20, lr=3e-3, seed=0, k=1, threshold_start_step=50
    ),  # k = the planted codes' L0 per layer (0.96): a looser batch budget splits latents between two
    "JumpReluCLTTrainer": dict(
        activation_dim=32,
        dict_size=32,
        num_layers=4,
        warmup_steps=20,
        lr=3e-3,
        seed=0,
        sparsity_penalty=0.1,
        pre_act_loss=0.0,
    ),
}


# ------------------------------------------------------------------- the sparse path against the dense one
SPARSE_D, SPARSE_F, SPARSE_K = 24, 96, 6


def sparse_dense_pair(cls, **kwargs):
    """Two identical trainers, one sparse and one dense."""
    common = (
        dict(steps=100, activation_dim=SPARSE_D, dict_size=SPARSE_F, k=SPARSE_K, seed=3, device="cpu", warmup_steps=0)
        | kwargs
    )
    return cls(**common, sparse=True), cls(**common, sparse=False)


def grads(trainer, x, step=1):
    trainer.ae.zero_grad(set_to_none=True)
    out = trainer.loss(x, step)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in trainer.ae.named_parameters()}


SPARSE_TRAINERS = [
    (TopKTrainer, {}),
    (BatchTopKTrainer, {}),
    (MatryoshkaBatchTopKTrainer, {"group_fractions": [0.25, 0.25, 0.5]}),
]


# ------------------------------------------------------------------------- activations and caches
def hook_rows(model, module, texts, io="out", drop_first=False):
    """Reference values: each text run alone (no padding) with a plain forward hook."""
    rows = []
    hf = model._module
    for text in texts:
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"].to(next(hf.parameters()).device)
        captured = {}

        def hook(mod, args, output, captured=captured):
            value = args[0] if io == "in" else output
            captured["x"] = value[0] if isinstance(value, tuple) else value

        handle = module.register_forward_hook(hook)
        with torch.no_grad():
            hf(ids)
        handle.remove()
        rows.append(captured["x"][0, 1:] if drop_first else captured["x"][0])
    return torch.cat(rows).cpu()


def drain(buffer):
    return torch.cat(list(buffer))


def canonical(rows):
    """Rows in a fixed order, to compare two sets of activations regardless of shuffling."""
    key = rows.flatten(1).double() @ torch.linspace(1, 2, rows[0].numel(), dtype=torch.double)
    return rows[key.argsort()]


TEXTS = SENTENCES * 3


def build_cache(path, model=None, n_tokens=10_000, data=None, **kwargs):
    model = model or tiny_models.gpt_neox()
    site = kwargs.pop("submodule", None)
    site = model.gpt_neox.layers[1] if site is None else site
    kwargs = dict(dict(ctx_len=32, refresh_batch_size=8, shard_tokens=100, progress=False, allow_fewer=True), **kwargs)
    return ActivationCache.build(path, model, site, iter(data or TEXTS), n_tokens, **kwargs)


def tiny_cli_folder(tmp_path) -> list[str]:
    """A tiny Llama saved as a model folder and 120 one-sentence text files: the CLI's --model,
    --texts and --ctx-len arguments for it."""
    model = tiny_models.llama()
    model._module.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, sentence in enumerate(SENTENCES * 3):
        (texts / f"{i:03d}.txt").write_text(f"{sentence} Item {i}.")
    return ["--model", str(tmp_path / "tiny"), "--texts", str(texts), "--ctx-len", "16"]


def randomized(ae):
    """`ae` with every weight and bias drawn at random (x 0.5) and thresholds at 0.2: a dictionary
    whose outputs depend on every tensor, for the file-format round trips."""
    with torch.no_grad():
        for t in ae.state_dict().values():
            if t.is_floating_point() and t.dim() > 0:
                t.copy_(torch.randn_like(t) * 0.5)
        if hasattr(ae, "threshold"):
            ae.threshold.copy_(torch.full_like(ae.threshold, 0.2))
    return ae
