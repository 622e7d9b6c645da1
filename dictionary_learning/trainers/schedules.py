"""Schedules over a run's steps: the learning-rate warm-up and decay, and the sparsity warm-up."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


def get_lr_schedule(
    total_steps: int,
    warmup_steps: int,
    decay_start: int | None = None,
    resample_steps: int | None = None,
    sparsity_warmup_steps: int | None = None,
) -> Callable[[int], float]:
    """LR multiplier for step s: linear warmup, then 1, then linear decay to 0 from `decay_start`.

    With `resample_steps`, the warmup restarts after every resampling period instead.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0 and < steps={total_steps}; lower warmup_steps (e.g. "
            f"warmup_steps={max(1, total_steps // 20)}, a twentieth of the run) or train longer"
        )
    if decay_start is not None:
        if resample_steps is not None:
            raise ValueError("decay_start cannot be combined with resample_steps")
        if not warmup_steps < decay_start < total_steps:
            raise ValueError(f"decay_start={decay_start} must lie between warmup_steps={warmup_steps} and steps")
        if sparsity_warmup_steps is not None and decay_start <= sparsity_warmup_steps:
            raise ValueError(f"decay_start={decay_start} must be > sparsity_warmup_steps={sparsity_warmup_steps}")
    if resample_steps is not None and not 0 < resample_steps < total_steps:
        raise ValueError(f"resample_steps={resample_steps} must be > 0 and < steps={total_steps}")

    def schedule(s: int) -> float:
        if s > total_steps:  # LambdaLR asks for step `steps` after the last update, never beyond
            raise ValueError(
                f"learning-rate schedule asked for step {s}, past the {total_steps} steps it was laid out for: "
                f"a run cannot continue past its steps (start a new run with more steps)"
            )
        if resample_steps is not None:
            factor = min((s % resample_steps) / warmup_steps, 1.0) if warmup_steps else 1.0
        elif s < warmup_steps:
            factor = s / warmup_steps
        elif decay_start is not None and s >= decay_start:
            factor = (total_steps - s) / (total_steps - decay_start)
        else:
            factor = 1.0
        assert 0.0 <= factor <= 1.0, f"learning-rate factor {factor} at step {s} is outside [0, 1]"
        return factor

    return schedule


def get_sparsity_warmup_fn(total_steps: int, sparsity_warmup_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier of the sparsity penalty: ramps linearly from 0 to 1 over `sparsity_warmup_steps`."""
    if sparsity_warmup_steps is not None and not 0 <= sparsity_warmup_steps < total_steps:
        raise ValueError(f"sparsity_warmup_steps={sparsity_warmup_steps} must be >= 0 and < steps={total_steps}")
    if not sparsity_warmup_steps:
        return lambda s: 1.0
    return lambda s: min(s / sparsity_warmup_steps, 1.0)


# ------------------------------------------------------------------------------------ short runs
# Phases whose reference defaults (1,000-15,000 steps) would swallow a short run: the share of the run
# each gets when its option is left unset and its default exceeds `fits` times the run.
SHORT_RUN = {
    "warmup_steps": {"share": 1 / 20, "fits": 1 / 10},
    "sparsity_warmup_steps": {"share": 1 / 10, "fits": 1 / 5},
    "threshold_start_step": {"share": 1 / 10, "fits": 1 / 5},
    "anneal_start": {"share": 1 / 2, "fits": 1},
}
# Warm-ups (from step 0) that an explicit setting may stretch over at most half of the run.
WARMUPS = ("warmup_steps", "sparsity_warmup_steps", "k_anneal_steps")

logger = logging.getLogger(__name__)


# The inference threshold's EMA (TopK family) should forget its start within a tenth of the steps it
# tracks: the reference's beta 0.999 (a 1,000-step memory) lags a 1,500-step run's falling cutoff, and
# BatchTopK then infers with L0 12.6 for k 16 (docs/evaluation.md).
THRESHOLD_MEMORY_SHARE = 1 / 10


def _fitted_threshold_beta(fitted: dict[str, Any], defaults: dict[str, Any], steps: int) -> float | None:
    """The EMA decay for a threshold left at its default whose memory, 1 / (1 - beta) steps, exceeds
    THRESHOLD_MEMORY_SHARE of the steps it is tracked over; None when it fits (or is set)."""
    default = defaults.get("threshold_beta")
    if "threshold_beta" in fitted or not isinstance(default, float):
        return None
    tracked = steps - fitted.get("threshold_start_step", defaults.get("threshold_start_step", 0))
    if tracked <= 0 or 1 / (1 - default) <= tracked * THRESHOLD_MEMORY_SHARE:
        return None
    return round(1 - 1 / max(1.0, tracked * THRESHOLD_MEMORY_SHARE), 4)


def fit_to_run(
    options: dict[str, Any], defaults: dict[str, Any], steps: int, owner: str, new_run: bool = True
) -> dict[str, Any]:
    """A trainer's options for a run of `steps` steps (a new dict): a schedule option left unset
    whose default does not fit the run (the reference's 1,000-step warm-up of a 1,500-step run) is
    set to its share of the run, and an inference threshold's EMA to a memory of a tenth of the steps
    it tracks, with a one-line note; a warm-up set explicitly to more than half
    the run is refused. The one rule for Python and the command line. A resumed run (`new_run`
    False) gets the same fitted values, without the note or the refusal."""
    fitted, changed = dict(options), []
    for option, rule in SHORT_RUN.items():
        default = defaults.get(option)
        if option in options or not isinstance(default, int) or default <= steps * rule["fits"]:
            continue
        fitted[option] = max(1, int(steps * rule["share"]))
        changed.append(f"{option} {default} -> {fitted[option]}")
    beta = _fitted_threshold_beta(fitted, defaults, steps)
    if beta is not None:
        fitted["threshold_beta"] = beta
        changed.append(f"threshold_beta {defaults['threshold_beta']} -> {beta}")
    for option in WARMUPS if new_run else ():
        value = options.get(option)
        if isinstance(value, int) and not isinstance(value, bool) and value > steps / 2:
            raise ValueError(
                f"{owner}: {option}={value} takes more than half of the {steps}-step run; lower it (e.g. "
                f"{option}={max(1, steps // 10)}), train longer, or leave it unset to fit it to the run"
            )
    if changed and new_run:
        logger.warning("%s: a %d-step run: %s (set them to choose)", owner, steps, ", ".join(changed))
    return fitted
