"""Evaluation (definitions as in the reference, spec section 8): reconstruction metrics as pure
tensor functions, and the model's cross-entropy and KL with the dictionary spliced in (`evaluate`,
and the reference's one-batch `loss_recovered`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .buffer import ActivationBuffer, NNsightActivationBuffer  # noqa: F401 (the reference re-exports them here)
from .config import DEBUG  # noqa: F401
from .dictionaries.base import device_of
from .ground_truth import ground_truth_metrics  # noqa: F401 (its home is ground_truth; evaluation lists it)
from .reader import ActivationReader, reader_sites


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


def per_site_fve(x_BLD: torch.Tensor, x_hat_BLD: torch.Tensor) -> dict[str, float]:
    """A crosscoder's `frac_variance_explained_site_<l>` for each of its sites (`[B, L, D]`
    batches); nothing for `[B, D]` batches."""
    if x_BLD.ndim != 3 or x_hat_BLD.shape != x_BLD.shape:
        return {}
    return {
        f"frac_variance_explained_site_{site}": float(frac_variance_explained(x_BLD[:, site], x_hat_BLD[:, site]))
        for site in range(x_BLD.shape[1])
    }


def _batch_scale(x: torch.Tensor, normalize: bool):
    """The factor that gives the batch mean norm sqrt(D) (the reference's `normalize_batch`), or 1."""
    return x.shape[-1] ** 0.5 / x.norm(dim=-1).mean() if normalize else 1.0


def _ce_BL(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy `[B, L-1]` and where it counts: input and target both real tokens."""
    valid = (mask_BL[:, :-1] * mask_BL[:, 1:]).bool()
    ce = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].float().transpose(1, 2), ids_BL[:, 1:], reduction="none")
    return ce, valid


def _masked_ce(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose input and target are both real tokens."""
    ce, valid = _ce_BL(logits_BLV, ids_BL, mask_BL)
    return ce[valid].mean()


def _masked_kl(clean_BLV: torch.Tensor, other_BLV: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean KL(clean || other) of the next-token distributions over real positions."""
    log_p = torch.log_softmax(clean_BLV.float(), dim=-1)
    log_q = torch.log_softmax(other_BLV.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[mask_BL.bool()].mean()


def _run_terms(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, clean: dict | None = None) -> dict[str, torch.Tensor]:
    """Per position of one run: next-token CE `[B, L-1]` and, given the clean run's terms, the KL of
    the clean distribution from this one `[B, L]`; from one log-softmax of the logits. The clean
    run's terms also keep its log-probabilities and probabilities for the others' KL."""
    log_q = torch.log_softmax(logits_BLV.float(), dim=-1)
    terms = {"ce": -log_q[:, :-1].gather(-1, ids_BL[:, 1:, None]).squeeze(-1)}
    if clean is None:
        terms["log_p"], terms["p"] = log_q, log_q.exp()
    else:
        terms["kl"] = (clean["p"] * (clean["log_p"] - log_q)).sum(-1)
    return terms


def _clean_and_zero_terms(base: dict) -> tuple[dict, dict]:
    """The clean and zero-ablated runs' terms, computed once per `baseline` and kept in it."""
    if "clean_terms" not in base:
        base["clean_terms"] = _run_terms(base["clean"], base["ids"])
        base["zero_terms"] = _run_terms(base["zeroed"], base["ids"], base["clean_terms"])
    return base["clean_terms"], base["zero_terms"]


def _losses(base: dict, spliced_BLV: torch.Tensor) -> dict:
    """CE of the clean, spliced and zero-ablated runs and the two KLs (means over the positions
    that count), and under "rows" their per-sequence sums, what `loss_intervals` resamples."""
    ids, mask = base["ids"], base["mask"]
    clean, zero = _clean_and_zero_terms(base)
    spliced = _run_terms(spliced_BLV, ids, clean)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    real = mask.bool()
    rows = {"tokens": valid.sum(1).double().cpu(), "kl_positions": real.sum(1).double().cpu()}
    for name, terms in (("clean", clean), ("spliced", spliced), ("zero", zero)):
        rows[name] = (terms["ce"] * valid).sum(1).double().cpu()
    rows["kl"] = (spliced["kl"] * real).sum(1).double().cpu()
    return {
        "loss_original": float(clean["ce"][valid].mean()),
        "loss_reconstructed": float(spliced["ce"][valid].mean()),
        "loss_zero": float(zero["ce"][valid].mean()),
        "kl_div": float(spliced["kl"][real].mean()),
        "kl_div_zero": float(zero["kl"][real].mean()),
        "rows": rows,
    }


def loss_intervals(rows: list[dict[str, torch.Tensor]], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """The CE metrics pooled over every scored token of the evaluated sequences, with 95 %
    intervals from a bootstrap over sequences (percentile, `n_boot` resamples, seeded):
    n_tokens, ce_clean, ce_zero (zero-ablated), ce_diff (spliced - clean, nats), kl_div and
    frac_recovered, each with
    `_lo` / `_hi` bounds. Sequences are resampled whole, so the intervals account for tokens of
    one sequence not being independent."""
    cols = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    n = cols["tokens"].numel()
    gen = torch.Generator().manual_seed(seed)
    picks = torch.cat([torch.arange(n)[None], torch.randint(n, (n_boot, n), generator=gen)])  # row 0: the sample itself

    total = {key: col[picks].sum(1) for key, col in cols.items()}
    clean, spliced, zero = (total[k] / total["tokens"] for k in ("clean", "spliced", "zero"))
    statistics = {
        "ce_clean": clean,
        "ce_zero": zero,
        "ce_diff": spliced - clean,
        "kl_div": total["kl"] / total["kl_positions"],
        "frac_recovered": (spliced - zero) / (clean - zero),
    }
    out: dict[str, float] = {"n_tokens": int(cols["tokens"].sum()), "n_sequences": n}
    for name, values in statistics.items():
        lo, hi = torch.quantile(values[1:], torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = float(values[0]), lo, hi
    return out


def paired_ce_difference(
    rows_a: list[dict[str, torch.Tensor]], rows_b: list[dict[str, torch.Tensor]], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """`(d, lo, hi)`: how much higher dictionary a's spliced CE is than b's (nats per token, pooled
    over tokens) on the same sequences, with a 95 % interval from a bootstrap that resamples the
    sequences once for both (paired). Most of the spread of each CE comes from which sequences were
    drawn and cancels in the difference, so this interval is far tighter than the two absolute ones."""
    a = {key: torch.cat([r[key] for r in rows_a]) for key in ("spliced", "tokens")}
    b = {key: torch.cat([r[key] for r in rows_b]) for key in ("spliced", "tokens")}
    if not torch.equal(a["tokens"], b["tokens"]):
        raise ValueError("a paired difference needs both dictionaries evaluated on the same sequences")
    n = a["tokens"].numel()
    gen = torch.Generator().manual_seed(seed)
    picks = torch.cat([torch.arange(n)[None], torch.randint(n, (n_boot, n), generator=gen)])
    diff = (a["spliced"] - b["spliced"])[picks].sum(1) / a["tokens"][picks].sum(1)
    lo, hi = torch.quantile(diff[1:], torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
    return float(diff[0]), lo, hi


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
    if io == "in_to_out":  # a transcoder: its input, and the output it replaces (zero-ablated)
        clean, saved = run_model(reader.model, ids, mask, read=[(site, "in"), (site, "out")])
        x, y = saved[(site, "in")], saved[(site, "out")]
        io = "out"
    else:
        clean, saved = run_model(reader.model, ids, mask, read=[site], io=io)
        x = y = saved[site]
    zeroed, _ = run_model(reader.model, ids, mask, replace={site: torch.zeros_like}, io=io)
    return {"ids": ids, "mask": mask, "clean": clean, "zeroed": zeroed, "x": x, "y": y}


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
    spliced and zero-ablated models from the clean one (and under "rows" their per-sequence sums,
    for `loss_intervals`), and the site's activations at the real positions with their
    reconstruction, all from the same tokens. `base` reuses `baseline(...)`. A transcoder
    (`dictionary.transcoder`) reads the site's input and replaces its output; x is then that output.
    """
    from .splice import run_model

    transcoder = getattr(dictionary, "transcoder", False)
    base = base or baseline(reader, tokens, "in_to_out" if transcoder else io)
    ids, mask, x, y = base["ids"], base["mask"], base["x"], base["y"]
    dict_device = device_of(dictionary, ids.device)

    def reconstruct(h):
        scale = _batch_scale(h, normalize_batch)
        x_hat = dictionary((h * scale).to(dict_device, torch.float32)) / scale
        return x_hat.to(h.device, h.dtype)

    site = reader.sites[0].name
    if transcoder:
        spliced, _ = run_model(reader.model, ids, mask, transcode={site: reconstruct})
    else:
        spliced, _ = run_model(reader.model, ids, mask, replace={site: reconstruct}, io=io)
    losses = _losses(base, spliced)
    x_real = x[mask.bool()].to(dict_device, torch.float32)
    scale = _batch_scale(x_real, normalize_batch)
    x_hat, f = dictionary(x_real * scale, output_features=True)
    return losses, y[mask.bool()].to(dict_device, torch.float32), x_hat / scale, f


@torch.no_grad()
def crosscoder_loss_metrics(dictionary, reader, tokens: dict[str, torch.Tensor], io: str = "out"):
    """A crosscoder spliced in at each of its sites in turn, on one token batch.

    The code is computed from every site's clean activations; site l's activations are then
    replaced by the reconstruction `x_hat[l]` (the rest of that model runs clean). Returns
    `(losses, x [N, L, D], x_hat, f)` with `loss_original_site_<l>`, `loss_reconstructed_site_<l>`,
    `loss_zero_site_<l>`, `kl_div_site_<l>` and `frac_recovered_site_<l>` (for a paired buffer,
    site 0 is in the first model and site 1 in the second)."""
    from .nnsight_io import model_device
    from .splice import run_model

    runs, acts = [], []  # each model's clean run (one per model, reading all its sites)
    for model, sites in reader_sites(reader):
        device = model_device(model)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        names = [site.name for site in sites]
        logits, saved = run_model(model, ids, mask, read=names, io=io)
        runs += [(model, name, ids, mask, logits) for name in names]
        acts += [saved[name] for name in names]
    x = torch.stack([a.to(acts[0].device) for a in acts], dim=2)  # [B, T, L, D]
    dict_device = device_of(dictionary, x.device)
    x = x.to(dict_device, torch.float32)
    x_hat_all, f_all = dictionary(x, output_features=True)
    losses: dict[str, float] = {}
    for site, (model, name, ids, mask, logits) in enumerate(runs):
        zeroed, _ = run_model(model, ids, mask, replace={name: torch.zeros_like}, io=io)
        spliced, _ = run_model(
            model, ids, mask, replace={name: lambda h, s=site: x_hat_all[..., s, :].to(h.device, h.dtype)}, io=io
        )
        terms = _losses({"ids": ids, "mask": mask, "clean": logits, "zeroed": zeroed}, spliced)
        terms["frac_recovered"] = frac_recovered(terms)
        losses |= {f"{key}_site_{site}": value for key, value in terms.items() if key not in ("rows", "kl_div_zero")}
    real = tokens["attention_mask"].bool().to(dict_device)
    return losses, x[real], x_hat_all[real], f_all[real]


LOSS_NAMES = ("loss_original", "loss_reconstructed", "loss_zero")
INTERVAL_NAMES = ("ce_clean", "ce_zero", "ce_diff", "kl_div", "frac_recovered")


def flat_intervals(intervals: dict[str, float]) -> dict[str, float]:
    """`loss_intervals` output as `evaluate` adds it: counts as they are, each statistic as
    `<name>_pooled` with its `<name>_lo` / `<name>_hi` (the plain names keep the reference's
    per-batch means)."""
    out = {"n_tokens": intervals["n_tokens"], "n_sequences": intervals["n_sequences"]}
    for name in INTERVAL_NAMES:
        out |= {f"{name}_pooled": intervals[name], f"{name}_lo": intervals[f"{name}_lo"],
                f"{name}_hi": intervals[f"{name}_hi"]}  # fmt: skip
    return out


class RunningMetrics:
    """A dictionary's metrics pooled over every token of many batches (exact, not a mean of
    per-batch means): fraction of variance explained from running sums, L0, L1, the fraction of
    features alive, and with the `loss_recovered_metrics` rows, `loss_intervals` of the CE terms."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.nonzero, self.l1 = 0.0, 0.0
        self.alive: torch.Tensor | None = None
        self.rows: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def add(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor, rows: dict | None = None) -> None:
        x, r = x_BD.double(), (x_BD - x_hat_BD).double()
        for name, value in (("x", x), ("x2", x * x), ("r", r), ("r2", r * r)):
            self.sums[name] = self.sums.get(name, 0) + value.sum(0)
        self.n += x.shape[0]
        self.nonzero += float((f_BF != 0).sum())
        self.l1 += float(f_BF.abs().sum())
        active = (f_BF != 0).any(0)
        self.alive = active if self.alive is None else self.alive | active
        if rows is not None:
            self.rows.append(rows)

    def result(self) -> dict[str, float]:
        s, n = self.sums, self.n
        total_var = (s["x2"] - s["x"] ** 2 / n).sum()
        residual_var = (s["r2"] - s["r"] ** 2 / n).sum()
        out = {
            "n_activations": n,
            "frac_variance_explained": float(1 - residual_var / total_var),
            "l0": self.nonzero / n,
            "l1_loss": self.l1 / n,
            "frac_alive": float(self.alive.float().mean()),
        }
        return out | (loss_intervals(self.rows) if self.rows else {})


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
    progress: bool = True,
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
        kl_div = mean KL(clean || spliced) of the next-token distributions (kl_div_zero for zeros);
        n_tokens, n_sequences, and `<name>_pooled`, `<name>_lo`, `<name>_hi` for ce_clean, ce_zero,
            ce_diff, kl_div and frac_recovered: `loss_intervals` of those tokens (pooled over all
            of them, with 95 % bootstrap bounds over sequences); every value is a float, as the
            reference's callers expect (`{k: float(v) for k, v in evaluate(...).items()}`).
    A transcoder (`dictionary.transcoder`) reads the site's input and replaces its output: its
    metrics compare with that output, and the spliced run has the module's output replaced.
    Otherwise `activations` is any iterator of `[B, D]` batches (`[B, 2, D]` input/output pairs for
    a transcoder, `[B, L, D]` for a crosscoder, which adds `frac_variance_explained_site_<l>`) and
    only reconstruction metrics are computed. `normalize_batch` rescales x to mean norm sqrt(D)
    before the dictionary (and back after). `tracer_args` is accepted for the reference's signature and ignored.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    dictionary = dictionary.to(device)
    knows_model = hasattr(activations, "model") and hasattr(activations, "sites")
    crosscoder = hasattr(dictionary, "num_layers")
    if knows_model and activations.widths[0] != dictionary.activation_dim:
        raise ValueError(
            f"the dictionary expects width {dictionary.activation_dim} but {activations.names[0]} has "
            f"width {activations.widths[0]}"
        )
    totals: dict[str, float] = {}
    alive, rows = None, []
    for _ in tqdm(range(n_batches), desc="evaluating", delay=2, leave=False, disable=not progress):
        if knows_model:
            try:
                items = activations.text_batch(batch_size)
            except StopIteration:
                raise StopIteration(
                    "the data ran out before n_batches batches: lower n_batches or batch_size"
                ) from None
            tokens = activations.tokenize(items)
            tokens = {k: v[:, :max_len] for k, v in tokens.items()}
            if crosscoder:
                losses, x, x_hat, f = crosscoder_loss_metrics(dictionary, activations, tokens, activations.io)
                losses |= per_site_fve(x, x_hat)
            else:
                losses, x, x_hat, f = loss_recovered_metrics(dictionary, activations, tokens, io, normalize_batch)
                rows.append(losses.pop("rows"))
        else:
            try:
                x = next(activations).to(device).float()
            except StopIteration:
                raise StopIteration("the activations ran out before n_batches batches: lower n_batches") from None
            x_in, x = (x[..., 0, :], x[..., 1, :]) if getattr(dictionary, "transcoder", False) else (x, x)
            scale = _batch_scale(x_in, normalize_batch)
            x_hat, f = dictionary(x_in * scale, output_features=True)
            x_hat, losses = x_hat / scale, per_site_fve(x, x_hat)
        if x.ndim == 3 and crosscoder:  # a crosscoder's sites as one row
            x, x_hat = x.flatten(1), x_hat.flatten(1)
        metrics = reconstruction_metrics(x, x_hat, f) | losses
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
        active = (f.reshape(-1, f.shape[-1]) != 0).any(0)
        alive = active if alive is None else alive | active
    results = {key: value / n_batches for key, value in totals.items()}
    if "loss_original" in results:
        results["frac_recovered"] = frac_recovered(results)
        results |= flat_intervals(loss_intervals(rows))
    for key in [k for k in results if k.startswith("frac_recovered_site_")]:  # from the mean losses
        site = key.rsplit("_", 1)[1]
        results[key] = frac_recovered({name: results[f"{name}_site_{site}"] for name in LOSS_NAMES})
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
    losses.pop("rows")
    return tuple(torch.tensor(losses[k]) for k in ("loss_original", "loss_reconstructed", "loss_zero"))


@torch.no_grad()
def evaluate_dictionaries(
    reader, dictionaries: list, n_tokens: int, batch_size: int = 32, progress: bool = True
) -> list[dict[str, float]]:
    """Every dictionary at the reader's site on the same contexts (at least `n_tokens` tokens): per
    batch the clean and zero-ablated runs once, then each dictionary spliced in; metrics pooled over
    all tokens (`RunningMetrics`), with 95 % bootstrap intervals over contexts, and each one's CE
    difference from the dictionary with the lowest CE (`vs_best`, paired over the same contexts)."""
    running = [RunningMetrics() for _ in dictionaries]
    n_batches = -(-n_tokens // (batch_size * reader.ctx_len))
    for _ in tqdm(range(n_batches), desc=f"evaluating {len(dictionaries)} dictionaries", disable=not progress):
        try:
            tokens = reader.tokenize(reader.text_batch(batch_size))
        except StopIteration:
            break
        base = baseline(reader, tokens)  # shared by every dictionary
        for ae, metrics in zip(dictionaries, running):
            losses, x, x_hat, f = loss_recovered_metrics(ae, reader, tokens, base=base)
            metrics.add(x, x_hat, f, losses["rows"])
    if not running[0].rows:
        raise ValueError("the evaluation text holds no tokens: give held-out text")
    results = [m.result() for m in running]
    best = min(range(len(results)), key=lambda i: results[i]["ce_diff"])
    for result, metrics in zip(results, running):
        d, lo, hi = paired_ce_difference(metrics.rows, running[best].rows)
        result |= {"vs_best": d, "vs_best_lo": lo, "vs_best_hi": hi, "best": best}
    return results
