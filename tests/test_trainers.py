"""Every trainer learns; the shared step, resampling, schedules and configs behave; the reference's
trainer bugs (spec section 16) are fixed."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from helpers import CLT_CONFIGS, LEARNING_CONFIGS
from helpers import LEARN_COMMON as COMMON
from helpers import LEARN_D as D
from helpers import LEARN_F as F
from helpers import LEARN_PENALISED as PENALISED
from helpers import LEARN_TOPK as TOPK

from dictionary_learning import TRAINER_REGISTRY, trainSAE
from dictionary_learning.synthetic import PlantedFeatures
from dictionary_learning.trainers import (
    BatchTopKTrainer,
    GatedAnnealTrainer,
    GatedSAETrainer,
    JumpReluTrainer,
    MatryoshkaBatchTopKTrainer,
    PAnnealTrainer,
    StandardTrainer,
    StandardTrainerAprilUpdate,
    TopKTrainer,
)
from dictionary_learning.trainers.trainer import (
    ConstrainedAdam,
    get_lr_schedule,
    get_sparsity_warmup_fn,
    resample_dead_features,
)


def test_every_registered_trainer_has_a_learning_test():
    assert set(LEARNING_CONFIGS) | set(CLT_CONFIGS) == set(TRAINER_REGISTRY)  # CLTs: tests/test_clt.py


@pytest.mark.parametrize("name", sorted(LEARNING_CONFIGS))
def test_trainer_recovers_planted_features(name):
    config, steps = LEARNING_CONFIGS[name]
    data = PlantedFeatures(d=D, seed=1)  # not the trainers' seed 0: randn-initialised decoders would start on it
    trainer = TRAINER_REGISTRY[name](steps=steps, **config)
    held_out = next(data.batches(1, 2048, seed=99))
    initial_loss = float(trainer.loss(held_out, step=steps, logging=True).losses["loss"])
    assert data.recovered(trainer.ae.decoder_FD(), either_sign=True) < 5  # learnt, not there from the start
    for step, x in enumerate(data.batches(steps)):
        trainer.update(step, x)
    final_loss = float(trainer.loss(held_out, step=steps, logging=True).losses["loss"])
    # A k-step pursuit over random unit atoms already explains 94 % of this data's variance (32 dims,
    # 64 atoms): matching pursuit learns the directions, its loss has little left to fall.
    assert final_loss < (0.99 if name == "MatchingPursuitTrainer" else 0.5) * initial_loss
    signed = getattr(trainer.ae, "signed", False)  # AbsTopK: a latent may write its row's opposite
    assert data.recovered(trainer.ae.decoder_FD(), either_sign=signed) >= 38, "most of the 48 should be found"
    with torch.no_grad():
        x_hat, f = trainer.ae(held_out, output_features=True)
    fve = 1 - (held_out - x_hat).var(0).sum() / held_out.var(0).sum()
    assert fve > 0.85
    assert (f != 0).float().sum(-1).mean() < 12  # sparse: the data has about 3 active features a row


# ------------------------------------------------------------------------------------ schedules
def test_lr_schedule_matches_reference_values():
    fn = get_lr_schedule(100, 10, decay_start=50)
    assert [fn(s) for s in (0, 5, 10, 75, 99)] == pytest.approx([0, 0.5, 1, 0.5, 0.02])
    fn = get_lr_schedule(100, 10, resample_steps=30)
    assert [fn(s) for s in (0, 5, 29, 30, 35, 45)] == pytest.approx([0, 0.5, 1, 0, 0.5, 1])
    assert get_sparsity_warmup_fn(100, 20)(10) == 0.5
    assert get_sparsity_warmup_fn(100, None)(0) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=10, warmup_steps=10), "warmup_steps=10 must be >= 0 and < steps=10"),
        (dict(total_steps=100, warmup_steps=10, decay_start=5), "decay_start=5"),
        (dict(total_steps=100, warmup_steps=10, resample_steps=200), "resample_steps=200"),
    ],
)
def test_bad_schedules_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_lr_schedule(**kwargs)


def test_constrained_adam_keeps_unit_norm_columns():
    w = torch.nn.Parameter(torch.randn(D, F))
    opt = ConstrainedAdam([w], [w], lr=0.1)
    (w.sum() ** 2).backward()
    opt.step()
    torch.testing.assert_close(w.norm(dim=0), torch.ones(F))


# ----------------------------------------------------------------------------- bad configs
def test_steps_not_above_warmup_raise_before_any_work():
    with pytest.raises(ValueError, match="warmup_steps=1000 must be >= 0 and < steps=500"):
        TopKTrainer(steps=500, activation_dim=D, dict_size=F, k=4)


def test_k_larger_than_dict_size_and_bad_dict_size():
    with pytest.raises(ValueError, match="k=65 is larger than dict_size=64"):
        TopKTrainer(steps=2000, activation_dim=D, dict_size=F, k=65)
    with pytest.raises(ValueError, match="dict_size must be a positive integer"):
        StandardTrainer(steps=3000, activation_dim=D, dict_size=0)


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(LEARNING_CONFIGS))
def test_config_is_complete_json_and_rebuilds_the_trainer(name):
    config, steps = LEARNING_CONFIGS[name]
    trainer = TRAINER_REGISTRY[name](steps=steps, layer=3, lm_name="m", **config)
    record = json.loads(json.dumps(trainer.config))
    assert record["trainer_class"] == name
    assert record["dict_class"] == type(trainer.ae).__name__
    assert record["steps"] == steps and record["layer"] == 3 and record["lm_name"] == "m"
    assert set(TRAINER_REGISTRY[name].config_keys()) <= set(record)
    assert "device" in record and "warmup_steps" in record
    from dictionary_learning.training import build_trainer

    rebuilt = build_trainer(record, steps)
    assert rebuilt.config == trainer.config
    for a, b in zip(rebuilt.ae.state_dict().values(), trainer.ae.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same initialisation


def test_unknown_config_key_lists_valid_ones():
    from dictionary_learning.training import build_trainer

    with pytest.raises(TypeError, match=r"'l1_penalt' \(did you mean 'l1_penalty'\?\).*valid keys: steps"):
        build_trainer(dict(trainer=StandardTrainer, l1_penalt=0.1, **COMMON), steps=100)


def test_positional_arguments_follow_the_reference_order():
    """A positional call means what it means in the reference (its order is each Config's `positional`)."""
    from dictionary_learning.dictionaries import AutoEncoder

    trainer = StandardTrainer(300, D, F, 3, "m", AutoEncoder, 2e-3, 0.25, 10, 20, None, None, 7, "cpu")
    assert (trainer.layer, trainer.lm_name, trainer.lr, trainer.l1_penalty) == (3, "m", 2e-3, 0.25)
    assert (trainer.warmup_steps, trainer.seed, str(trainer.device)) == (10, 7, "cpu")
    jump = JumpReluTrainer(3000, D, F, None, None, JumpReluTrainer.Config.dict_class, 5, 1e-4, 0.01, device="cpu")
    assert (jump.seed, jump.lr, jump.bandwidth) == (5, 1e-4, 0.01)
    matryoshka = MatryoshkaBatchTopKTrainer(3000, D, F, 4, None, None, [0.5, 0.5], None, device="cpu")
    assert matryoshka.group_sizes == [F // 2, F // 2] and matryoshka.k == 4
    names = list(inspect.signature(PAnnealTrainer).parameters)
    assert names[names.index("resample_steps") + 1 : names.index("resample_steps") + 3] == ["device", "seed"]


def test_constructor_calls_that_do_not_fit_fail_like_python_calls():
    with pytest.raises(TypeError, match="takes at most 20 positional arguments"):
        StandardTrainer(*range(21))
    with pytest.raises(TypeError, match="multiple values for argument 'steps'"):
        StandardTrainer(100, steps=100, activation_dim=D, dict_size=F)
    with pytest.raises(TypeError, match="missing required argument: k"):
        TopKTrainer(steps=100, activation_dim=D, dict_size=F)
    with pytest.raises(TypeError, match=r"'l1_penalt' \(did you mean 'l1_penalty'\?\)"):
        StandardTrainer(steps=100, activation_dim=D, dict_size=F, l1_penalt=0.1)
    with pytest.raises(ValueError, match="sparsity_loss must be one of"):
        JumpReluTrainer(steps=100, activation_dim=D, dict_size=F, sparsity_loss="l1")


@pytest.mark.parametrize("name", sorted(TRAINER_REGISTRY))
def test_every_option_has_a_doc_and_the_fields_are_trainer_attributes(name):
    cls = TRAINER_REGISTRY[name]
    docs = cls.Config.docs()
    assert not [f for f in cls.config_keys() if not docs.get(f)], "fields without a docstring"
    config, steps = LEARNING_CONFIGS[name] if name in LEARNING_CONFIGS else (CLT_CONFIGS[name], 600)
    trainer = cls(steps=steps, **config)
    for key in cls.config_keys():
        if key not in ("device", "dict_class", "lr", "anneal_end", "group_weights"):  # resolved from None or a name
            assert getattr(trainer, key) == getattr(trainer.cfg, key), key
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.cfg.steps = 1


def test_config_records_the_actual_dictionary_class_and_k_anneal_steps():
    from dictionary_learning.dictionaries import AutoEncoderNew

    trainer = StandardTrainerAprilUpdate(
        steps=100, dict_class=AutoEncoderNew, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5)
    )
    assert trainer.config["dict_class"] == "AutoEncoderNew"
    trainer = TopKTrainer(steps=100, k_anneal_steps=50, **dict(TOPK, warmup_steps=5))
    assert trainer.config["k_anneal_steps"] == 50 and trainer.config["k"] == 4
    gated = GatedSAETrainer(steps=100, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))
    assert gated.config["steps"] == 100
    jump = JumpReluTrainer(steps=100, decay_start=60, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))
    assert jump.config["warmup_steps"] == 5 and jump.config["decay_start"] == 60
    anneal = PAnnealTrainer(steps=100, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))
    assert anneal.config["initial_sparsity_penalty"] == 0.1 and anneal.config["device"] == "cpu"


# --------------------------------------------------------------------------------- resampling
def _dead_feature_trainer(cls, **kwargs):
    trainer = cls(steps=200, resample_steps=20, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5), **kwargs)
    x = next(PlantedFeatures(d=D).batches(1))
    for step in range(3):
        trainer.update(step, x)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:10] = True
    return trainer, x, dead


@pytest.mark.parametrize("cls", [StandardTrainer, PAnnealTrainer, GatedSAETrainer, GatedAnnealTrainer])
def test_resampling_replaces_dead_features_and_resets_their_adam_state(cls):
    trainer, x, dead = _dead_feature_trainer(cls)
    ae, opt = trainer.ae, trainer.optimizer
    before_enc = ae.encoder_FD().detach().clone()
    before_dec = ae.decoder_FD().detach().clone()
    resampled = resample_dead_features(ae, opt, dead, x)
    assert resampled.tolist() == list(range(10))
    assert not torch.allclose(ae.encoder_FD()[:10], before_enc[:10])
    assert torch.equal(ae.encoder_FD()[10:], before_enc[10:])
    torch.testing.assert_close(ae.decoder_FD()[:10].norm(dim=-1), torch.ones(10))
    # each new decoder direction is one of the batch's inputs
    directions = torch.nn.functional.normalize(x, dim=-1)
    assert ((ae.decoder_FD()[:10] @ directions.T).max(dim=1).values > 0.999).all()
    assert not torch.equal(ae.decoder_FD()[:10], before_dec[:10])
    for param, dim in ae.feature_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            moment = opt.state[param][key]
            moment_F = moment if dim == 0 else moment.transpose(0, dim)
            assert (moment_F[:10] == 0).all()
            assert (moment_F[10:] != 0).any()


def test_resampling_runs_inside_training_when_latents_die():
    data = PlantedFeatures(d=D)
    trainer = StandardTrainer(
        steps=200, resample_steps=50, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5, l1_penalty=3.0)
    )
    with torch.no_grad():
        trainer.ae.encoder.bias[:16] = -100.0  # these can never fire
    for step, x in enumerate(data.batches(60)):
        trainer.update(step, x)
    assert trainer.resampled_features >= 16
    assert (trainer.ae.encoder.bias[:16] > -100).all()


# ---------------------------------------------------------------------- fixed reference bugs
def test_jumprelu_threshold_gradient_comes_from_pre_activations_below_it():
    """Reference issue #55: a pre-activation just below the threshold must push the threshold down."""
    trainer = JumpReluTrainer(
        steps=100, bandwidth=0.1, target_l0=1000.0, sparsity_warmup_steps=None, **dict(COMMON, warmup_steps=5)
    )
    ae = trainer.ae
    with torch.no_grad():
        ae.threshold.fill_(0.5)
        ae.b_enc.fill_(0.48)  # every pre-activation sits just below the threshold for x = 0
    x = torch.zeros(4, D)
    trainer.loss(x, step=99).backward()
    # L0 (0) is far below target: the penalty wants more features on, i.e. lower thresholds.
    assert (ae.threshold.grad > 0).all()


def test_jumprelu_seed_is_applied():
    a = JumpReluTrainer(steps=100, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5, seed=7))
    b = JumpReluTrainer(steps=100, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5, seed=7))
    assert torch.equal(a.ae.W_dec, b.ae.W_dec)


def test_jumprelu_paper_l0_penalty_is_available():
    trainer = JumpReluTrainer(steps=100, sparsity_loss="l0", **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))
    out = trainer.loss(torch.randn(8, D), step=99, logging=True)
    assert float(out.losses["sparsity_loss"]) == pytest.approx(float(out.losses["l0_estimate"]))
    with pytest.raises(ValueError, match="sparsity_loss must be one of"):
        JumpReluTrainer(steps=100, sparsity_loss="l1", **dict(PENALISED, warmup_steps=5))


def test_topk_threshold_ignores_rows_without_positive_activations():
    trainer = TopKTrainer(steps=100, **dict(TOPK, warmup_steps=5, threshold_start_step=0))
    kept = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.2, 0.5, 0.3, 0.9]])
    trainer._update_threshold(kept)
    assert float(trainer.ae.threshold) == pytest.approx(0.2)
    trainer._update_threshold(torch.zeros(2, 4))
    assert float(trainer.ae.threshold) == pytest.approx(0.2)


def test_topk_without_auxk_and_loss_without_step():
    x = torch.randn(16, D)
    trainers = [TopKTrainer(steps=100, auxk_alpha=alpha, **dict(TOPK, warmup_steps=5)) for alpha in (1 / 32, 0)]
    for trainer in trainers:  # every latent dead for longer than AuxK's horizon: AuxK applies if enabled
        trainer.tokens_seen = 10**9
        trainer.num_tokens_since_fired.fill_(10**9)
    with_auxk, without = (float(t.loss(x, step=None, logging=True).losses["auxk_loss"]) for t in trainers)
    assert with_auxk > 0 and without == 0.0
    trainers[1].update(0, x)


@pytest.mark.parametrize("cls", [TopKTrainer, BatchTopKTrainer, JumpReluTrainer, StandardTrainer])
def test_counters_live_on_the_dictionary_device(cls):
    kwargs = dict(TOPK) if cls in (TopKTrainer, BatchTopKTrainer) else dict(PENALISED, resample_steps=10)
    if cls is JumpReluTrainer:
        kwargs.pop("resample_steps")
    # On the meta device, so that a counter created on the default device (CPU) would fail here too.
    trainer = cls(steps=100, **dict(kwargs, warmup_steps=5, device="meta"))
    counter = getattr(trainer, "num_tokens_since_fired", None)
    counter = counter if counter is not None else trainer.steps_since_active
    assert counter.device == next(trainer.ae.parameters()).device == torch.device("meta")


def test_k_annealing_starts_at_activation_dim_and_reaches_k():
    trainer = TopKTrainer(steps=100, k_anneal_steps=10, **dict(TOPK, warmup_steps=5))
    ks = [trainer.annealed_k(s) for s in range(12)]
    assert ks[0] == D and ks[10] == 4 and ks[11] == 4
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    data = PlantedFeatures(d=D).batches(3)
    for step, x in enumerate(data):
        trainer.update(step, x)
        assert trainer.ae.active_k == int(trainer.ae.k) == trainer.annealed_k(step)


def test_p_anneal_default_lp_reaches_p_zero_without_crashing():
    """The reference divides by zero once next_p reaches its default p_end = 0 with 'Lp'."""
    trainer = PAnnealTrainer(steps=40, anneal_start=10, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))
    for step, x in enumerate(PlantedFeatures(d=D).batches(40)):
        trainer.update(step, x)
    assert trainer.next_p == 0.0 and trainer.p_step_count == 9
    assert torch.isfinite(trainer.loss(x, step=39).loss)


def test_p_anneal_rescales_the_coefficient_when_p_changes():
    trainer = PAnnealTrainer(
        steps=100,
        anneal_start=10,
        p_end=0.5,
        n_sparsity_updates=3,
        **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5),
    )
    assert trainer.sparsity_update_steps == [10, 55, 100]
    coeffs = []
    for step, x in enumerate(PlantedFeatures(d=D).batches(60)):
        trainer.update(step, x)
        coeffs.append(trainer.sparsity_coeff)
    assert trainer.p == pytest.approx(0.75)
    assert coeffs[54] != coeffs[55]  # rescaled at the second update step, when p first changes


def test_april_update_counts_decoder_norms_once_with_autoencoder_new():
    """Reference issue #39: AutoEncoderNew's forward already scales features by decoder norms."""
    from dictionary_learning.dictionaries import AutoEncoderNew

    trainer = StandardTrainerAprilUpdate(
        steps=100, dict_class=AutoEncoderNew, **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5)
    )
    x = torch.randn(16, D)
    f = trainer.ae.encode(x)
    expected = (f * trainer.ae.decoder.weight.norm(dim=0)).sum(-1).mean()
    assert float(trainer.loss(x, step=99, logging=True).losses["sparsity_loss"]) == pytest.approx(expected.item())


def test_loss_with_logging_changes_no_state():
    for name, (config, steps) in LEARNING_CONFIGS.items():
        cls = TRAINER_REGISTRY[name]
        trainer = cls(
            steps=steps, **dict(config, threshold_start_step=0) if "auxk_alpha" in cls.config_keys() else config
        )
        x = next(PlantedFeatures(d=D).batches(1))
        trainer.update(0, x)
        before = {
            k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in vars(trainer).items()
            if k in trainer.state_attrs
        }
        ae_before = {k: v.clone() for k, v in trainer.ae.state_dict().items()}
        for step in range(1, 60):
            trainer.loss(x, step=step, logging=True)
        for k, v in before.items():
            now = getattr(trainer, k)
            assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, (name, k)
        assert all(torch.equal(trainer.ae.state_dict()[k], v) for k, v in ae_before.items()), name


def test_matryoshka_group_sizes_and_weights():
    trainer = MatryoshkaBatchTopKTrainer(steps=100, group_fractions=[0.25, 0.25, 0.5], **dict(TOPK, warmup_steps=5))
    assert trainer.group_sizes == [16, 16, 32]
    assert trainer.ae.group_sizes.tolist() == [16, 16, 32]
    with pytest.raises(ValueError, match="group_fractions must sum to 1"):
        MatryoshkaBatchTopKTrainer(steps=100, group_fractions=[0.5, 0.2], **dict(TOPK, warmup_steps=5))


def test_trainsae_accepts_all_trainers_at_once():
    configs = [dict(trainer=TRAINER_REGISTRY[name], **config) for name, (config, _) in LEARNING_CONFIGS.items()]
    dictionaries = trainSAE(PlantedFeatures(d=D).batches(100), configs, steps=100, progress=False)
    assert [type(d).__name__ for d in dictionaries] == [
        "AutoEncoder",
        "AutoEncoder",
        "GatedAutoEncoder",
        "AutoEncoder",
        "GatedAutoEncoder",
        "AutoEncoderTopK",
        "BatchTopKSAE",
        "AbsTopKSAE",
        "MatchingPursuitSAE",
        "MatryoshkaBatchTopKSAE",
        "JumpReluAutoEncoder",
        "CrossCoder",
        "BatchTopKCrossCoder",
    ]


@pytest.mark.parametrize("cls", [TopKTrainer, BatchTopKTrainer])
def test_auxk_loss_trains_dead_latents(cls):
    from dictionary_learning.trainers.top_k import DEAD_FEATURE_TOKENS

    trainer = cls(steps=100, **dict(TOPK, warmup_steps=5))
    x = next(PlantedFeatures(d=D).batches(1, batch_size=4))  # 4 rows x k=4: most latents stay silent
    *_, losses = trainer.loss(x, step=10, logging=True)  # the reference's (x, x_hat, f, losses)
    assert losses["auxk_loss"] == 0.0 and losses["dead_features"] == 0
    trainer.tokens_seen = DEAD_FEATURE_TOKENS
    trainer.num_tokens_since_fired.fill_(DEAD_FEATURE_TOKENS)  # every latent silent for 10M tokens
    *_, losses = trainer.loss(x, step=10, logging=True)
    assert losses["auxk_loss"] > 0 and losses["pre_norm_auxk_loss"] > 0
    assert losses["dead_features"] >= F - 16
    trainer.optimizer.zero_grad()
    trainer.loss(x, step=10).backward()
    if cls is TopKTrainer:
        f, _, _, a = trainer.ae.encode(x, return_topk=True)
        silent_but_positive = ((f == 0) & (a > 0)).any(0)
        # latents outside every row's top-k get gradient only through AuxK
        assert trainer.ae.encoder.bias.grad[silent_but_positive].abs().sum() > 0


def test_get_logging_parameters_reports_every_listed_value():
    for name, (config, steps) in LEARNING_CONFIGS.items():
        trainer = TRAINER_REGISTRY[name](steps=steps, **config)
        trainer.update(0, next(PlantedFeatures(d=D).batches(1)))
        params = trainer.get_logging_parameters()
        assert set(params) == set(trainer.logging_parameters), name


# ------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("name", sorted(TRAINER_REGISTRY))
def test_a_seeded_run_is_reproducible_on_the_sparse_path(name, monkeypatch):
    """Two runs with the same seed and data end bit-identical, with every step on the sparse path and
    enough entries per step (> 32k) that CPU indexing's backward would have used parallel atomic
    adds (the JumpReLU, Gated and April recipes' run-to-run drift of issue 21)."""
    from dictionary_learning import sparse

    monkeypatch.setattr(sparse, "SPARSE_MAX_DENSITY", 1.0)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    batches = list(PlantedFeatures(32, 48, seed=0).batches(12, batch_size=2048))
    cls = TRAINER_REGISTRY[name]
    if name in CLT_CONFIGS:  # [B, L, 2, D]: four layers' inputs and outputs
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(2048, 4, 2, 32, generator=gen) for _ in range(12)]
    config = LEARNING_CONFIGS[name][0] if name in LEARNING_CONFIGS else CLT_CONFIGS[name]
    config = dict(config, warmup_steps=2, dict_size=128)
    if "sparsity_warmup_steps" in cls.config_keys():
        config["sparsity_warmup_steps"] = 2
    if "anneal_start" in cls.config_keys():
        config["anneal_start"] = 4
    if "threshold_start_step" in cls.config_keys():
        config["threshold_start_step"] = 2
    runs = []
    for _ in range(2):
        trainer = cls(steps=12, **config)
        for step, x in enumerate(batches):
            trainer.update(step, x)
        runs.append(trainer.ae.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), name


def test_every_trainer_class_has_a_signature():
    import inspect

    from dictionary_learning.trainers.trainer import PenalisedTrainer, RecipeTrainer

    for cls in [RecipeTrainer, PenalisedTrainer, *TRAINER_REGISTRY.values()]:
        assert list(inspect.signature(cls).parameters)[:3] == ["steps", "activation_dim", "dict_size"], cls


# ---------------------------------------------------------------- the recipes the field added in 2025-26
def _trained(config: dict, steps: int = 1000):
    from dictionary_learning import trainSAE

    planted = PlantedFeatures(d=D)
    (ae,) = trainSAE(planted.batches(steps, batch_size=256), [config], steps, progress=False)
    return planted.recovered(ae.decoder_FD())


def test_jumprelu_with_gemma_scope_2_s_quadratic_target_l0_loss_recovers_planted_features():
    config = dict(trainer=JumpReluTrainer, **dict(PENALISED, lr=3e-3), sparsity_loss="quadratic", target_l0=4,
                  sparsity_penalty=0.1)  # fmt: skip
    assert _trained(config) >= 40


def test_topk_with_signum_recovers_planted_features():
    assert _trained(dict(trainer=TopKTrainer, **TOPK, optimizer_name="signum", lr=1e-3)) >= 45


@pytest.mark.parametrize("name", ["TopKTrainer", "BatchTopKTrainer", "MatryoshkaBatchTopKTrainer", "AbsTopKTrainer",
                                  "BatchTopKCrossCoderTrainer"])  # fmt: skip
def test_encoder_init_norm_scales_the_encoder_rows_only(name):
    config, steps = LEARNING_CONFIGS[name]
    cls = TRAINER_REGISTRY[name]
    scaled = cls(steps=steps, **config, encoder_init_norm=0.1)
    plain = cls(steps=steps, **config, encoder_init_norm=None)
    W_FD, W0_FD = scaled.ae.encoder_weight_bias()[0], plain.ae.encoder_weight_bias()[0]
    assert torch.allclose(W_FD.norm(dim=1), torch.full((F,), 0.1))
    assert torch.allclose(W_FD / W_FD.norm(dim=1, keepdim=True), W0_FD / W0_FD.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(scaled.ae.decoder_FD(), plain.ae.decoder_FD())  # the same seeded directions, unit norm
    assert scaled.config["encoder_init_norm"] == 0.1 and plain.config["encoder_init_norm"] is None
    default = 0.1 if name == "AbsTopKTrainer" else None  # the reference's init where the recipe is the reference's
    assert cls(steps=steps, **config).config["encoder_init_norm"] == default
    with pytest.raises(ValueError, match="encoder_init_norm must be a positive number"):
        cls(steps=steps, **config, encoder_init_norm=0.0)


@pytest.mark.parametrize("cls, least", [(TopKTrainer, 44), (BatchTopKTrainer, 40), (MatryoshkaBatchTopKTrainer, 34)])
def test_topk_family_with_a_small_encoder_init_recovers_planted_features(cls, least):
    """Of 48 planted features (fewer than 5 at the start); the default init finds 47, 45 and 37 here."""
    extra = dict(group_fractions=[0.75, 0.25]) if cls is MatryoshkaBatchTopKTrainer else {}
    assert _trained(dict(trainer=cls, **TOPK, **extra, encoder_init_norm=0.1)) >= least


def test_jumprelu_tanh_loss_and_pre_activation_loss_are_their_formulas():
    trainer = JumpReluTrainer(steps=100, sparsity_loss="tanh", tanh_scale=4.0, pre_act_loss=1e-2,
                              **dict(PENALISED, warmup_steps=5, sparsity_warmup_steps=5))  # fmt: skip
    x = next(PlantedFeatures(d=D).batches(1, batch_size=64))
    ae = trainer.ae
    with torch.no_grad():
        pre = x @ ae.W_enc + ae.b_enc
        f = torch.where(pre > ae.threshold, pre, 0.0)
        tanh = torch.tanh(4.0 * f * ae.W_dec.norm(dim=-1)).sum(-1).mean()
    out = trainer.loss(x, step=99)
    assert float(out.losses["sparsity_loss"]) == pytest.approx(float(tanh), rel=1e-5)
    nobody_dead = float(out.loss) - float(out.losses["mse_loss"]) - float(out.losses["sparsity_loss"])
    assert nobody_dead == pytest.approx(0.0, abs=1e-6)
    trainer.num_tokens_since_fired.fill_(10**8)  # silent for 100M tokens, and on this batch too: dead
    with torch.no_grad():
        ae.threshold.fill_(10.0)
        gap = (ae.threshold - pre).relu()
        expected = (gap * ae.W_dec.norm(dim=-1)).sum(-1).mean() * 1e-2
    out = trainer.loss(x, step=99)
    extra = float(out.loss) - float(out.losses["mse_loss"]) - float(out.losses["sparsity_loss"])
    assert extra == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="sparsity_loss must be one of"):
        JumpReluTrainer(steps=100, sparsity_loss="cosh", **dict(PENALISED, warmup_steps=5))
    with pytest.raises(ValueError, match="optimizer_name must be one of"):
        TopKTrainer(steps=100, optimizer_name="sgd", **dict(TOPK, warmup_steps=5))


def test_batchtopk_s_inference_threshold_keeps_about_k_latents_after_a_short_run():
    """The threshold's EMA is fitted to a short run (schedules.fit_to_run): with the reference's
    beta 0.999 it lags the falling cutoff of a 600-step run and inference keeps fewer than k."""
    planted = PlantedFeatures(d=D, seed=1)
    config = dict(trainer=BatchTopKTrainer, **dict(TOPK, k=6, threshold_start_step=60))
    fitted, lagging = trainSAE(planted.batches(600), [config, dict(config, threshold_beta=0.999)], 600, progress=False)
    x = next(planted.batches(1, 4096, seed=99))
    with torch.no_grad():
        l0 = [float((ae.encode(x) != 0).float().sum(-1).mean()) for ae in (fitted, lagging)]
    assert abs(l0[0] - 6) < 0.6 and l0[1] < l0[0] - 0.3, l0
