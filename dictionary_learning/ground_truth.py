"""How well a dictionary recovers the true features of synthetic data (`synthetic.SyntheticModel`).

The metrics and their definitions are SAELens's (`sae_lens.synthetic.evals`, the "SynthSAEBench"
metrics), so that numbers from either library mean the same thing; a CI test scores one dictionary
with both on the same samples:

    mcc          mean |cosine| of decoder rows and true directions matched one-to-one (Hungarian
                 matching; Mean Correlation Coefficient, arXiv 2505.20254)
    uniqueness   distinct true features that are some latent's best match, over the latents
    precision, recall, f1, accuracy
                 each latent as a detector of its best-matching true feature (by |cosine|): fires
                 (code != 0) against the feature firing (true code > 0), per latent, then averaged
                 over the latents (an undefined ratio counts 0)
    shrinkage    mean ||x_hat|| / ||x|| over samples with ||x|| > 1e-6 (1: no shrinkage)
    fve          1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
    l0, true_l0  mean number of firing latents, of firing true features, per sample
    dead         latents that never fired on these samples
"""

from __future__ import annotations

import torch

MIN_INPUT_NORM = 1e-6  # samples with a smaller norm have no defined shrinkage (SAELens's threshold)


def abs_cosines(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """`|cos|` of every row of `a` with every row of `b`: `[N, M]` (a zero row has cosine 0)."""
    a = a_ND / a_ND.norm(dim=1, keepdim=True).clamp(min=1e-8)
    b = b_MD / b_MD.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return (a @ b.T).abs()


def mean_correlation_coefficient(decoder_FD: torch.Tensor, directions_ND: torch.Tensor) -> float:
    """MCC: the mean |cosine| of the best one-to-one matching of decoder rows and true directions."""
    from scipy.optimize import linear_sum_assignment

    cos = abs_cosines(decoder_FD, directions_ND)
    rows, cols = linear_sum_assignment((1 - cos).cpu().numpy())
    return float(cos[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


def uniqueness(decoder_FD: torch.Tensor, directions_ND: torch.Tensor) -> float:
    """Distinct true features among the latents' best matches, over the number of latents."""
    if decoder_FD.shape[0] == 0:
        return 0.0
    best = abs_cosines(decoder_FD, directions_ND).argmax(dim=1)
    return best.unique().numel() / decoder_FD.shape[0]


def _check_inputs(ae, activations: torch.Tensor, true_codes: torch.Tensor, true_directions: torch.Tensor) -> None:
    """One-line errors for inputs that do not fit together, before any work."""
    D = ae.activation_dim
    if getattr(ae, "transcoder", False) or getattr(ae, "num_layers", 1) != 1:
        raise ValueError(f"ground_truth_metrics scores an SAE on [n, d] activations; {type(ae).__name__} is not one")
    for name, t, rank in (("activations", activations, 2), ("true_codes", true_codes, 2), ("true_directions",
                          true_directions, 2)):  # fmt: skip
        if not isinstance(t, torch.Tensor) or t.ndim != rank:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if activations.shape[1] != D or true_directions.shape[1] != D:
        raise ValueError(
            f"widths differ: the dictionary has activation_dim={D}, activations have width {activations.shape[1]} "
            f"and true_directions width {true_directions.shape[1]}"
        )
    if true_codes.shape != (activations.shape[0], true_directions.shape[0]):
        raise ValueError(
            f"true_codes has shape {list(true_codes.shape)}, expected [n_samples={activations.shape[0]}, "
            f"n_features={true_directions.shape[0]}] (one code per activation and true direction)"
        )
    if activations.shape[0] == 0:
        raise ValueError("no samples: give at least one activation")
    if not bool((true_codes != 0).any()):
        raise ValueError("true_codes are all zero: no true feature fires, so recall and F1 are undefined")


@torch.no_grad()
def ground_truth_metrics(
    ae, activations: torch.Tensor, true_codes: torch.Tensor, true_directions: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Score dictionary `ae` against the ground truth of synthetic data: `activations [n, D]` made
    from `true_codes [n, N]` and the unit `true_directions [N, D]` (see the module docstring for
    each metric; the definitions are SAELens's). `ae` reads the activations as they are (a
    dictionary trained with normalisation has the factor folded into its weights)."""
    _check_inputs(ae, activations, true_codes, true_directions)
    device = next(ae.parameters()).device
    decoder_FD = ae.decoder_FD().detach().float().cpu()
    directions = true_directions.float().cpu()
    best_F = abs_cosines(decoder_FD, directions).argmax(dim=1)
    F = decoder_FD.shape[0]
    counts = torch.zeros(4, F, dtype=torch.float64)  # tp, fp, fn, tn per latent
    fired_F = torch.zeros(F, dtype=torch.bool)
    sum_x = torch.zeros(activations.shape[1], dtype=torch.float64)
    sums = dict.fromkeys(("x2", "r2", "l0", "true_l0", "shrinkage", "shrinkage_n"), 0.0)
    for start in range(0, activations.shape[0], batch_size):
        x = activations[start : start + batch_size].float()
        x_hat, f = ae(x.to(device), output_features=True)
        x_hat, f = x_hat.float().cpu(), f.float().cpu()
        codes = true_codes[start : start + batch_size].cpu()
        latent, truth = f != 0, codes[:, best_F] > 0
        for i, cell in enumerate((latent & truth, latent & ~truth, ~latent & truth, ~latent & ~truth)):
            counts[i] += cell.sum(0, dtype=torch.float64)
        fired_F |= latent.any(0)
        sum_x += x.double().sum(0)
        sums["x2"] += float(x.double().pow(2).sum())
        sums["r2"] += float((x.double() - x_hat.double()).pow(2).sum())
        sums["l0"] += float(latent.sum())
        sums["true_l0"] += float((codes != 0).sum())
        norms = x.norm(dim=-1)
        valid = norms > MIN_INPUT_NORM
        sums["shrinkage"] += float((x_hat.norm(dim=-1)[valid] / norms[valid]).sum())
        sums["shrinkage_n"] += float(valid.sum())
    n = activations.shape[0]
    return {
        "mcc": mean_correlation_coefficient(decoder_FD, directions),
        "uniqueness": uniqueness(decoder_FD, directions),
        **_detection(counts),
        "shrinkage": sums["shrinkage"] / sums["shrinkage_n"] if sums["shrinkage_n"] else 0.0,
        "fve": _fve(sums["x2"] / n, sum_x / n, sums["r2"] / n),
        "l0": sums["l0"] / n,
        "true_l0": sums["true_l0"] / n,
        "dead": int((~fired_F).sum()),
    }


def _detection(counts: torch.Tensor) -> dict[str, float]:
    """Mean precision, recall, F1 and accuracy over the latents, from their tp, fp, fn, tn."""
    tp, fp, fn, tn = counts
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-30), 0.0)
    accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1e-8)
    return {name: float(v.mean()) for name, v in
            (("precision", precision), ("recall", recall), ("f1", f1), ("accuracy", accuracy))}  # fmt: skip


def _fve(mean_squared_norm: float, mean_x: torch.Tensor, mse: float) -> float:
    total = mean_squared_norm - float(mean_x.pow(2).sum())
    if total < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1 - mse / total
