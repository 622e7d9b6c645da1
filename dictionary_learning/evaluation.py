"""Evaluation (definitions as in the reference, spec section 8): reconstruction metrics as pure
tensor functions, and the model's cross-entropy and KL with the dictionary spliced in (`evaluate`,
and the reference's one-batch `loss_recovered`).
"""

from __future__ import annotations

import torch

from .buffer import (  # noqa: F401 (the reference re-exports ActivationBuffer and NNsightActivationBuffer here)
    ActivationBuffer,
    ActivationReader,
    NNsightActivationBuffer,
)
from .config import DEBUG  # noqa: F401
from .dictionaries.base import device_of


@torch.no_grad()
def frac_variance_explained(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """`1 - sum_D var_B(x - x_hat) / sum_D var_B(x)` (unbiased variance over the batch)."""
    x_BD, x_hat_BD = x_BD.reshape(-1, x_BD.shape[-1]).float(), x_hat_BD.reshape(-1, x_BD.shape[-1]).float()
    return 1 - (x_BD - x_hat_BD).var(dim=0).sum() / x_BD.var(dim=0).sum()


@torch.no_grad()
def l0(f_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero features per row."""
    return (f_BF != 0).float().sum(-1).mean()


@torch.no_grad()
def reconstruction_metrics(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> dict[str, float]:
    """The reference's per-batch metrics that need no model: l2_loss (un-squared), l1_loss, l0,
    frac_variance_explained, cossim, l2_ratio and relative_reconstruction_bias (Gated SAE paper, eq. 10)."""
    x, x_hat, f = x_BD.float(), x_hat_BD.float(), f_BF.float()
    x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
    return {
        "l2_loss": float((x - x_hat).norm(dim=-1).mean()),
        "l1_loss": float(f.norm(p=1, dim=-1).mean()),
        "l0": float(l0(f)),
        "frac_variance_explained": float(frac_variance_explained(x, x_hat)),
        "cossim": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "l2_ratio": float((x_hat_norm / x_norm).mean()),
        "relative_reconstruction_bias": float(x_hat.pow(2).sum(-1).mean() / (x * x_hat).sum(-1).mean()),
    }


def _batch_scale(x: torch.Tensor, normalize: bool):
    """The factor that gives the batch mean norm sqrt(D) (the reference's `normalize_batch`), or 1."""
    return x.shape[-1] ** 0.5 / x.norm(dim=-1).mean() if normalize else 1.0


def _masked_ce(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose input and target are both real tokens."""
    valid = (mask_BL[:, :-1] * mask_BL[:, 1:]).bool()
    ce = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].float().transpose(1, 2), ids_BL[:, 1:], reduction="none")
    return ce[valid].mean()


def _masked_kl(clean_BLV: torch.Tensor, other_BLV: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean KL(clean || other) of the next-token distributions over real positions."""
    log_p = torch.log_softmax(clean_BLV.float(), dim=-1)
    log_q = torch.log_softmax(other_BLV.float(), dim=-1)
    kl_BL = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl_BL[mask_BL.bool()].mean()


def frac_recovered(losses: dict[str, float]) -> float:
    """(loss_reconstructed - loss_zero) / (loss_original - loss_zero): 1 when splicing in the
    dictionary costs nothing, 0 when it is as bad as zero-ablating the site."""
    gap = losses["loss_original"] - losses["loss_zero"]
    return (losses["loss_reconstructed"] - losses["loss_zero"]) / gap if gap else float("nan")


@torch.no_grad()
def baseline(reader, tokens: dict[str, torch.Tensor], io: str = "out") -> dict:
    """The clean and zero-ablated runs of a token batch, which do not depend on the dictionary:
    compute once and pass to `loss_recovered_metrics` for each dictionary evaluated on it."""
    from .nnsight_io import model_device
    from .splice import run_model

    site = reader.sites[0].name
    device = model_device(reader.model)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    clean, saved = run_model(reader.model, ids, mask, read=[site], io=io)
    zeroed, _ = run_model(reader.model, ids, mask, replace={site: torch.zeros_like}, io=io)
    x = saved[site]
    return {"ids": ids, "mask": mask, "clean": clean, "zeroed": zeroed, "x": x}


@torch.no_grad()
def loss_recovered_metrics(
    dictionary,
    reader,
    tokens: dict[str, torch.Tensor],
    io: str = "out",
    normalize_batch: bool = False,
    base: dict | None = None,
):
    """Splice `dictionary` into the reader's model at its (first) site on one token batch.

    Returns `(losses, x, x_hat, f)`: CE of the clean, spliced and zero-ablated model, the KL of the
    spliced and zero-ablated models from the clean one, and the site's activations at the real
    positions with their reconstruction, all from the same tokens. `base` reuses `baseline(...)`.
    """
    from .splice import run_model

    base = base or baseline(reader, tokens, io)
    ids, mask, clean, zeroed, x = base["ids"], base["mask"], base["clean"], base["zeroed"], base["x"]
    dict_device = device_of(dictionary, ids.device)

    def reconstruct(h):
        scale = _batch_scale(h, normalize_batch)
        x_hat = dictionary((h * scale).to(dict_device, torch.float32)) / scale
        return x_hat.to(h.device, h.dtype)

    spliced, _ = run_model(reader.model, ids, mask, replace={reader.sites[0].name: reconstruct}, io=io)
    losses = {
        "loss_original": float(_masked_ce(clean, ids, mask)),
        "loss_reconstructed": float(_masked_ce(spliced, ids, mask)),
        "loss_zero": float(_masked_ce(zeroed, ids, mask)),
        "kl_div": float(_masked_kl(clean, spliced, mask)),
        "kl_div_zero": float(_masked_kl(clean, zeroed, mask)),
    }
    x_real = x[mask.bool()].to(dict_device, torch.float32)
    scale = _batch_scale(x_real, normalize_batch)
    x_hat, f = dictionary(x_real * scale, output_features=True)
    return losses, x_real, x_hat / scale, f


@torch.no_grad()
def evaluate(
    dictionary,
    activations,
    max_len: int = 128,
    batch_size: int = 128,
    io: str = "out",
    normalize_batch: bool = False,
    tracer_args: dict | None = None,
    device: str = "cpu",
    n_batches: int = 1,
) -> dict[str, float]:
    """Evaluate a dictionary on `n_batches` batches; returns the mean of each metric over them.

    Reconstruction metrics (x = activations at the real token positions, x_hat its reconstruction,
    f the features, means over tokens):
        l2_loss = mean ||x - x_hat||, l1_loss = mean ||f||_1, l0 = mean #(f != 0),
        frac_variance_explained = 1 - sum_d var(x - x_hat) / sum_d var(x),
        cossim = mean cos(x, x_hat), l2_ratio = mean ||x_hat|| / ||x||,
        relative_reconstruction_bias = mean ||x_hat||^2 / mean <x, x_hat> (1 = unbiased),
        frac_alive = fraction of features active on at least one evaluated token.
    When `activations` knows its model (an ActivationBuffer or ActivationReader), each batch is
    `batch_size` fresh texts truncated to `max_len` tokens, and on those same tokens:
        loss_original / loss_reconstructed / loss_zero = next-token cross-entropy of the clean model,
            of the model with x replaced by x_hat, and with x replaced by zeros (padding ignored);
        frac_recovered = (loss_reconstructed - loss_zero) / (loss_original - loss_zero);
        kl_div = mean KL(clean || spliced) of the next-token distributions (kl_div_zero for zeros).
    Otherwise `activations` is any iterator of `[B, D]` batches and only reconstruction metrics
    are computed. `normalize_batch` rescales x to mean norm sqrt(D) before the dictionary (and
    back after). `tracer_args` is accepted for the reference's signature and ignored.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    dictionary = dictionary.to(device)
    knows_model = hasattr(activations, "model") and hasattr(activations, "sites")
    if knows_model and activations.widths[0] != dictionary.activation_dim:
        raise ValueError(
            f"the dictionary expects width {dictionary.activation_dim} but {activations.names[0]} has "
            f"width {activations.widths[0]}"
        )
    totals: dict[str, float] = {}
    alive = None
    for _ in range(n_batches):
        if knows_model:
            try:
                items = activations.text_batch(batch_size)
            except StopIteration:
                raise StopIteration(
                    "the data ran out before n_batches batches: lower n_batches or batch_size"
                ) from None
            tokens = activations.tokenize(items)
            tokens = {k: v[:, :max_len] for k, v in tokens.items()}
            losses, x, x_hat, f = loss_recovered_metrics(dictionary, activations, tokens, io, normalize_batch)
        else:
            try:
                x = next(activations).to(device).float()
            except StopIteration:
                raise StopIteration("the activations ran out before n_batches batches: lower n_batches") from None
            scale = _batch_scale(x, normalize_batch)
            x_hat, f = dictionary(x * scale, output_features=True)
            x_hat, losses = x_hat / scale, {}
        metrics = reconstruction_metrics(x, x_hat, f) | losses
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
        active = (f.reshape(-1, f.shape[-1]) != 0).any(0)
        alive = active if alive is None else alive | active
    results = {key: value / n_batches for key, value in totals.items()}
    if "loss_original" in results:
        results["frac_recovered"] = frac_recovered(results)
    results["frac_alive"] = float(alive.float().mean())
    return results


@torch.no_grad()
def loss_recovered(
    text,
    model,
    submodule,
    dictionary,
    max_len: int | None = None,
    normalize_batch: bool = False,
    io: str = "out",
    tracer_args: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on one batch `text` (strings, or token ids `[B, L]`) of the clean
    model, of the model with `submodule`'s activations replaced by `dictionary`'s reconstruction,
    and with them replaced by zeros: `(loss_original, loss_reconstructed, loss_zero)`, the
    reference's one-batch function, as 0-dim tensors. `io` is the side of `submodule` that is
    read and replaced ("in", "out"; "in_and_out" replaces the output, as in the reference).
    Padding, and only padding, is left out of the mean (the reference also drops every EOS target
    when the pad token is EOS). `tracer_args` is accepted for the reference's signature and ignored.
    """
    if dictionary is None:
        raise ValueError("loss_recovered needs a dictionary to splice in")
    io = "out" if io == "in_and_out" else io
    rows = list(text) if isinstance(text, (list, tuple, torch.Tensor)) else [text]
    reader = ActivationReader([], model, submodule, io=io, ctx_len=max_len or 1 << 20)  # batches pad to their longest
    losses, _, _, _ = loss_recovered_metrics(dictionary, reader, reader.tokenize(rows), io, normalize_batch)
    return tuple(torch.tensor(losses[k]) for k in ("loss_original", "loss_reconstructed", "loss_zero"))
