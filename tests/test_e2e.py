"""The splice helper and end-to-end (KL + downstream) training on tiny models."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from dictionary_learning import AutoEncoder, AutoEncoderTopK, load_dictionary, trainSAE
from dictionary_learning.buffer import ActivationReader
from dictionary_learning.e2e import E2EObjective, TokenBatches
from dictionary_learning.splice import run_model, splice
from dictionary_learning.trainers import BatchTopKTrainer, JumpReluTrainer, StandardTrainer, TopKTrainer
from dictionary_learning.training import build_trainer

SITE, LATER, D, F = "model.layers.0.mlp", "model.layers.1", 32, 64
COMMON = dict(activation_dim=D, dict_size=F, seed=0, device="cpu", layer=0, lm_name="tiny")
TOPK = dict(trainer=TopKTrainer, k=4, warmup_steps=2, lr=3e-3, **COMMON)


@pytest.fixture(scope="module")
def model():
    """A tiny Llama whose random weights are scaled up so that its next-token distributions are
    peaked and depend on the MLP outputs (at the default scale the KL of any splice is ~1e-5)."""
    model = tiny_models.llama()
    with torch.no_grad():
        model._module.lm_head.weight.mul_(20)
        for layer in model._module.model.layers:
            layer.mlp.down_proj.weight.mul_(10)
    return model


def token_batches(model, n_batches=6, batch_size=4, ctx_len=12):
    texts = (tiny_models.SENTENCES * 4)[: n_batches * batch_size]
    return TokenBatches(texts, model, batch_size=batch_size, ctx_len=ctx_len, pack=False)


def logits_of(model, tokens):
    device = next(model._module.parameters()).device
    with torch.no_grad():
        return model._module(**{k: v.to(device) for k, v in tokens.items()}).logits


# ------------------------------------------------------------------------------------------ splice
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_splice_with_the_error_term_leaves_logits_unchanged(family):
    model = getattr(tiny_models, family)()
    site = "model.layers.0.mlp" if family == "llama" else "gpt_neox.layers.1"
    tokens = next(token_batches(model))
    clean = logits_of(model, tokens)
    ae = AutoEncoderTopK(D, F, k=3)
    with splice(model, {site: ae}, add_error=True):
        kept = logits_of(model, tokens)
        with model.trace(tokens["input_ids"], attention_mask=tokens["attention_mask"]):  # inside nnsight too
            traced = model.output.logits.save()
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced, clean, atol=1e-5, rtol=1e-5)
    with splice(model, {site: ae}):
        assert (logits_of(model, tokens) - clean).abs().max() > 1e-2  # without the error term they change
    torch.testing.assert_close(logits_of(model, tokens), clean)  # hooks are removed on exit


def test_splice_replaces_the_site_by_the_reconstruction_and_edits_features(model):
    tokens = next(token_batches(model))
    ae = AutoEncoder(D, F)
    mlp = model._module.model.layers[0].mlp
    x = {}
    handle = mlp.register_forward_hook(lambda m, a, out: x.setdefault("clean", out))
    logits_of(model, tokens)
    handle.remove()
    manual = mlp.register_forward_hook(lambda m, a, out: ae(out))
    expected = logits_of(model, tokens)
    manual.remove()
    with splice(model, {model.model.layers[0].mlp: ae}):  # an envoy names the site too
        torch.testing.assert_close(logits_of(model, tokens), expected)

    keep_F = torch.ones(F)
    keep_F[:10] = 0
    with splice(model, {SITE: ae}, add_error=True, edit=lambda f: f * keep_F):
        ablated = logits_of(model, tokens)
    bias = ae.decode(torch.zeros(F))
    manual = mlp.register_forward_hook(lambda m, a, out: out - ae.decode(ae.encode(out) * (1 - keep_F)) + bias)
    torch.testing.assert_close(ablated, logits_of(model, tokens), atol=1e-5, rtol=1e-5)
    manual.remove()
    with splice(model, {SITE: torch.zeros_like}):  # any function: zero ablation
        assert not torch.allclose(logits_of(model, tokens), expected)


def test_run_model_stops_after_the_last_site_without_logits(model):
    tokens = next(token_batches(model))
    calls = []
    handle = model._module.model.norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        logits, saved = run_model(model, tokens["input_ids"], tokens["attention_mask"], read=[SITE], logits=False)
        assert logits is None and not calls and saved[SITE].shape[-1] == D
        logits, saved = run_model(model, tokens["input_ids"], tokens["attention_mask"], read=[(SITE, "in")])
        assert calls and logits.shape[:2] == tokens["input_ids"].shape
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="no submodule"):
        with splice(model, {"model.layers.7.mlp": torch.zeros_like}):
            pass


# ------------------------------------------------------------------------------------------- e2e
def test_gradient_reaches_only_the_dictionary_and_matches_autograd(model):
    objective = E2EObjective(model, SITE, kl_weight=1.0, local_weight=0.0, downstream={LATER: 0.5})
    trainer = build_trainer(TOPK, steps=10)
    batch = objective.prepare(next(token_batches(model)))
    before = {k: v.clone() for k, v in model._module.state_dict().items()}
    with objective.frozen_model():
        out = trainer.loss(batch.x, 0)
        loss, logs = objective.loss_fn(batch, trainer)(out)
        loss.backward()
    assert all(p.grad is None for p in model._module.parameters())
    assert all(p.requires_grad for p in model._module.parameters())  # restored afterwards
    assert set(logs) == {"kl_loss", f"downstream_mse/{LATER}", "e2e_loss"}
    grads = {n: p.grad.clone() for n, p in trainer.ae.named_parameters()}
    assert grads["encoder.weight"].abs().sum() > 0

    # The same loss written by hand with a plain forward hook.
    trainer.ae.zero_grad()
    mlp, layer1 = model._module.model.layers[0].mlp, model._module.model.layers[1]
    keep = batch.attention_mask.bool()
    seen = {}

    def replace(m, a, value):
        new = value.detach().clone()
        new[keep] = trainer.loss(new[keep], 0).x_hat
        return new

    hooks = [mlp.register_forward_hook(replace), layer1.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))]
    logits = model._module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for h in hooks:
        h.remove()
    clean = logits_of(model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(logits[keep], -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    hidden = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    mse = (hidden[keep] - batch.downstream[LATER]).pow(2).sum(-1).mean()
    out = trainer.loss(batch.x, 0)
    manual = out.loss - out.losses["l2_loss"] + kl + 0.5 * mse
    torch.testing.assert_close(loss, manual.detach(), atol=1e-5, rtol=1e-5)
    model._module.zero_grad(set_to_none=True)
    manual.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trainer.ae.get_parameter(name).grad, atol=1e-5, rtol=1e-4, msg=name)
    model._module.zero_grad(set_to_none=True)
    assert all(torch.equal(v, model._module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "config",
    [TOPK, dict(trainer=StandardTrainer, l1_penalty=0.1, warmup_steps=2, sparsity_warmup_steps=2, lr=1e-3, **COMMON)],
    ids=["TopK", "Standard"],
)
def test_local_weight_one_and_no_kl_equals_local_training(model, config):
    """Same tokens, same order: the e2e path with only the local term is exactly local training."""
    steps = 6
    e2e = trainSAE(
        token_batches(model, steps),
        [config],
        steps,
        e2e=E2EObjective(model, SITE, kl_weight=0.0, local_weight=1.0),
        progress=False,
    )[0]
    reader = ActivationReader(iter(()), model, SITE, ctx_len=12)
    local = trainSAE([reader.read(t)[0] for t in token_batches(model, steps)], [config], steps, progress=False)[0]
    for key, value in local.state_dict().items():
        torch.testing.assert_close(e2e.state_dict()[key], value, rtol=0, atol=0, msg=key)


def kl_of(model, ae, batches):
    objective = E2EObjective(model, SITE)
    total = 0.0
    for tokens in batches:
        batch = objective.prepare(tokens)
        with torch.no_grad():
            logits, _ = run_model(model, batch.input_ids, batch.attention_mask, replace={SITE: ae})
            q = torch.log_softmax(logits[batch.keep], -1)
            total += float(torch.nn.functional.kl_div(q, batch.clean_logp, log_target=True, reduction="batchmean"))
    return total


@pytest.mark.parametrize("trainer", [TopKTrainer, BatchTopKTrainer, JumpReluTrainer])
def test_e2e_training_lowers_the_kl_of_the_spliced_model(model, trainer, tmp_path):
    extra = {"k": 4} if trainer is not JumpReluTrainer else {"target_l0": 4, "sparsity_warmup_steps": None}
    config = dict(trainer=trainer, warmup_steps=2, lr=3e-3, **COMMON, **extra)
    steps = 40
    objective = E2EObjective(model, SITE, kl_weight=1.0, downstream=[LATER], downstream_weight=0.1)
    untrained = build_trainer(config, steps).ae  # the same initialisation
    ae = trainSAE(token_batches(model, steps), [config], steps, e2e=objective, save_dir=tmp_path, progress=False)[0]
    held_out = list(token_batches(model, 2))
    assert kl_of(model, ae, held_out) < 0.5 * kl_of(model, untrained, held_out)
    loaded, config_json = load_dictionary(tmp_path / "trainer_0")
    assert config_json["e2e"] == objective.config
    torch.testing.assert_close(loaded.state_dict(), ae.state_dict())


def test_e2e_resume_after_a_crash_matches_an_uninterrupted_run(model, tmp_path):
    steps = 8
    objective = E2EObjective(model, SITE, kl_weight=1.0, downstream=[LATER])
    full = trainSAE(token_batches(model, steps), [TOPK], steps, e2e=objective, progress=False)[0]

    def crashing():
        for i, tokens in enumerate(token_batches(model, steps)):
            if i == 5:
                raise RuntimeError("simulated crash")
            yield tokens

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainSAE(crashing(), [TOPK], steps, e2e=objective, save_dir=tmp_path, backup_steps=4, progress=False)
    with pytest.raises(ValueError, match="saved with e2e"):
        trainSAE(token_batches(model, steps), None, steps, e2e=E2EObjective(model, SITE), resume_from=tmp_path)
    resumed = trainSAE(token_batches(model, steps), None, steps, e2e=objective, resume_from=tmp_path, progress=False)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed[0].state_dict()[key], value, msg=key)


def test_e2e_bad_input_is_named(model):
    with pytest.raises(ValueError, match="does not come after"):
        E2EObjective(model, "model.layers.1.mlp", downstream=["model.layers.0"])
    with pytest.raises(ValueError, match="every e2e weight is 0"):
        E2EObjective(model, SITE, kl_weight=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        E2EObjective(model, SITE, kl_weight=-1.0)
    with pytest.raises(ValueError, match="no submodule"):
        E2EObjective(model, "model.layers.5.mlp")
    with pytest.raises(TypeError, match="token batches"):
        trainSAE([torch.randn(8, D)], [TOPK], 4, e2e=E2EObjective(model, SITE), progress=False)
