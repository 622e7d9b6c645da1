"""Dead-latent resampling (Bricken et al. 2023), for any architecture through its FeatureLayout."""

from __future__ import annotations

import torch

from ..dictionaries.base import Dictionary, feature_first


@torch.no_grad()
def resample_dead_features(
    ae: Dictionary,
    optimizer: torch.optim.Optimizer,
    dead_F: torch.Tensor,
    x_BD: torch.Tensor,
    y_BD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-initialise dead features from badly reconstructed inputs (Bricken et al. 2023, "Towards
    Monosemanticity", neuron resampling); returns the indices of the resampled features.

    Rows of the batch are drawn without replacement with probability proportional to their
    reconstruction error ||x - x_hat||. Each dead feature f (the first min(#dead, B) by index)
    gets decoder direction v/||v|| and encoder direction v * 0.2 * (mean encoder norm of alive
    features); its feature-indexed biases and its Adam moments are zeroed. Works for any
    architecture through its `FeatureLayout`. A transcoder's target `y_BD` (its output) gives the
    error and the decoder directions; the encoder directions come from the inputs of the same rows.
    """
    dead_idx = dead_F.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return dead_idx
    x_BD = x_BD.reshape(-1, x_BD.shape[-1]).to(ae.decoder_FD().device)
    y_BD = x_BD if y_BD is None else y_BD.reshape(-1, y_BD.shape[-1]).to(x_BD.device)
    # All-zero inputs would give a zero direction: never draw them.
    nonzero_B = (x_BD.norm(dim=-1) > 0) & (y_BD.norm(dim=-1) > 0)
    err_B = (y_BD - ae(x_BD)).norm(dim=-1).float() * nonzero_B
    if not bool(err_B.sum() > 0):
        err_B = nonzero_B.float() if bool(nonzero_B.any()) else torch.ones_like(err_B)
    n = min(dead_idx.numel(), x_BD.shape[0])
    rows = torch.multinomial(err_B, n, replacement=False)
    v_ND, u_ND = x_BD[rows], y_BD[rows]
    dead_idx = dead_idx[:n]

    encoder_FD = ae.encoder_FD()
    alive_F = ~dead_F
    alive_norm = encoder_FD[alive_F].norm(dim=-1).mean() if bool(alive_F.any()) else torch.tensor(1.0)
    encoder_FD[dead_idx] = (v_ND * alive_norm * 0.2).to(encoder_FD.dtype)
    decoder_FD = ae.decoder_FD()
    decoder_FD[dead_idx] = (u_ND / u_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(decoder_FD.dtype)
    for name, dim in ae.layout.feature_biases:
        feature_first(ae.get_parameter(name).data, dim)[dead_idx] = 0.0

    for param, dim in ae.feature_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "momentum"):
            if key in state:
                feature_first(state[key], dim)[dead_idx] = 0.0
    return dead_idx
