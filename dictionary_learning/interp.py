"""Looking at features: the contexts where a feature fires most, an HTML page of them with tokens
highlighted by activation, and a feature's effect on the next-token distribution."""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .dictionaries.base import device_of
from .nnsight_io import model_device, read_activations
from .reader import ActivationReader, reader_sites
from .splice import dictionary_replacement, run_model


@dataclass
class Context:
    """One text window: its tokens and the feature's activation on each of them."""

    tokens: list[str]
    activations: list[float]

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


class FeatureProfile(NamedTuple):
    top_contexts: list[Context]
    top_tokens: list[tuple[str, float]]  # tokens with the highest mean activation
    top_affected: tuple[list[str], list[float]]  # next tokens whose log-probability the feature raises most


@torch.no_grad()
def feature_activations(dictionary, reader: ActivationReader, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """Features `[B, L, F]` of a token batch at the reader's (first) site; zero at padding. A
    cross-layer transcoder reads every site (each layer's MLP input): `[B, L, layers, F]`."""
    device = model_device(reader.model)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    if hasattr(dictionary, "num_layers"):  # a crosscoder: every site (of each model), stacked [B, L, sites, D]
        reads = [
            a.to(device)
            for m, sites in reader_sites(reader)
            for a in read_activations(m, sites, ids.to(model_device(m)), mask.to(model_device(m)))
        ]
        x_BLD = torch.stack(reads, dim=2)
    else:
        x_BLD = read_activations(reader.model, reader.sites[:1], ids, mask)[0]
        if isinstance(x_BLD, tuple):  # io="in_to_out": a transcoder encodes the input
            x_BLD = x_BLD[0]
    dict_device = device_of(dictionary)
    f_BLF = dictionary.encode(x_BLD.to(dict_device, torch.float32))
    mask = mask.to(f_BLF.device).view(*mask.shape, *[1] * (f_BLF.ndim - 2))
    return f_BLF * mask


@torch.no_grad()
def top_activating_contexts(
    dictionary,
    reader: ActivationReader,
    feature: int,
    texts: Iterable[str],
    k: int = 20,
    batch_size: int = 32,
    window: int = 24,
) -> list[Context]:
    """The `k` windows (up to `window` tokens ending at the peak) where `feature` fires most."""
    tokenizer = reader.tokenizer
    candidates: list[tuple[float, Context]] = []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        tokens = reader.tokenize(texts[start : start + batch_size])
        acts_BL = feature_activations(dictionary, reader, tokens)[..., feature].float().cpu()
        for row in range(acts_BL.shape[0]):
            peak = int(acts_BL[row].argmax())
            value = float(acts_BL[row, peak])
            if value <= 0:
                continue
            first = max(0, peak - window + 1)
            ids = tokens["input_ids"][row, first : peak + 1].tolist()
            pieces = [tokenizer.decode([i]) for i in ids]
            candidates.append((value, Context(pieces, acts_BL[row, first : peak + 1].tolist())))
    candidates.sort(key=lambda c: -c[0])
    return [context for _, context in candidates[:k]]


def feature_html(feature: int, contexts: list[Context], path: str | Path | None = None, title: str = "") -> str:
    """An HTML page of a feature's contexts, each token shaded by its activation (hover for the value)."""
    peak = max((c.max_activation for c in contexts), default=0.0) or 1.0
    rows = []
    for context in contexts:
        spans = []
        for token, value in zip(context.tokens, context.activations):
            alpha = max(0.0, value) / peak
            text = html.escape(token).replace("\n", "&#8629;")
            spans.append(f'<span title="{value:.3f}" style="background: rgba(255, 110, 0, {alpha:.2f})">{text}</span>')
        rows.append(f'<tr><td class="max">{context.max_activation:.2f}</td><td class="ctx">{"".join(spans)}</td></tr>')
    heading = html.escape(title or f"Feature {feature}")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
td {{ padding: 4px 10px; border-bottom: 1px solid #eee; vertical-align: top; }}
td.max {{ font-variant-numeric: tabular-nums; color: #a04000; text-align: right; }}
td.ctx {{ font-family: ui-monospace, monospace; white-space: pre-wrap; }}
</style></head>
<body><h1>{heading}</h1>
<p>{len(contexts)} contexts where the feature fires most; each ends at its strongest token. Darker = stronger
activation (hover a token for its value).</p>
<table><tr><th>max</th><th>context</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


@torch.no_grad()
def feature_effect(
    model,
    submodule,
    dictionary,
    feature: int,
    inputs,
    max_length: int = 128,
    add_residual: bool = True,
    k: int = 10,
    largest: bool = True,
) -> tuple[list[str], torch.Tensor]:
    """The next tokens whose log-probability at each text's last token drops most (or, with
    `largest=False`, rises most) when `feature` is zeroed there; the dictionary's error term is
    added back when `add_residual`, so only the feature changes. Returns (tokens, mean effects)."""
    reader = ActivationReader(iter(()), model, submodule, ctx_len=max_length)
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    tokens = reader.tokenize(texts)
    device = model_device(model)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    last = mask.sum(1) - 1
    rows = torch.arange(ids.shape[0], device=device)

    def zero_at_last_token(f_BLF):
        f_BLF = f_BLF.clone()
        f_BLF[rows.to(f_BLF.device), last.to(f_BLF.device), feature] = 0
        return f_BLF

    ablate = dictionary_replacement(dictionary, add_error=add_residual, edit=zero_at_last_token)
    clean, _ = run_model(model, ids, mask)
    ablated, _ = run_model(model, ids, mask, replace={reader.sites[0].name: ablate})
    effect_V = torch.log_softmax(clean[rows, last].float(), -1) - torch.log_softmax(ablated[rows, last].float(), -1)
    values, top = effect_V.mean(0).topk(k, largest=largest)
    return [reader.tokenizer.decode([int(i)]) for i in top], values.cpu()


def examine_dimension(
    model,
    submodule,
    buffer,
    dictionary=None,
    max_length: int = 128,
    n_inputs: int = 512,
    dim_idx: int | None = None,
    k: int = 30,
) -> FeatureProfile:
    """A feature's profile (the reference's helper): top contexts, the tokens it is most active on,
    and its top effects on next-token logits. `dim_idx=None` picks the feature most active on the
    inputs; `dictionary=None` studies the raw neurons of the submodule."""
    from .dictionaries import IdentityDict

    reader = ActivationReader(iter(()), model, submodule, ctx_len=max_length)
    dictionary = dictionary if dictionary is not None else IdentityDict(reader.widths[0])
    texts = buffer.text_batch(n_inputs) if hasattr(buffer, "text_batch") else list(buffer)[:n_inputs]
    if dim_idx is None:
        acts = feature_activations(dictionary, reader, reader.tokenize(texts[:32]))
        dim_idx = int(acts.amax(dim=(0, 1)).argmax())
    contexts = top_activating_contexts(dictionary, reader, dim_idx, texts, k=k)
    totals: dict[str, list[float]] = {}
    for context in contexts:
        for token, value in zip(context.tokens, context.activations):
            totals.setdefault(token, []).append(value)
    top_tokens = sorted(((t, sum(v) / len(v)) for t, v in totals.items()), key=lambda p: -p[1])[:k]
    affected = feature_effect(model, submodule, dictionary, dim_idx, texts[:32], max_length, k=min(k, 10))
    return FeatureProfile(contexts, top_tokens, (affected[0], affected[1].tolist()))


def feature_umap(
    dictionary,
    weight: str = "decoder",
    n_neighbors: int = 15,
    metric: str = "cosine",
    min_dist: float = 0.05,
    n_components: int = 2,
    feat_idxs=None,
):
    """A plotly scatter (2-D or 3-D) of a UMAP embedding of the dictionary's feature directions
    (`weight="decoder"`: decoder directions; `"encoder"`: encoder rows), the features `feat_idxs`
    (an index or a list of them) in red. Needs the optional `umap-learn` and `plotly` packages
    (`pip install "dictionary_learning[umap]"`)."""
    try:
        import plotly.graph_objects as go
        import umap
    except ImportError as e:
        raise ImportError(
            f"feature_umap needs umap-learn and plotly ({e.name} is missing): pip install 'dictionary_learning[umap]'"
        ) from e
    if weight not in ("decoder", "encoder"):
        raise ValueError(f"weight must be 'decoder' or 'encoder', got {weight!r}")
    if n_components not in (2, 3):
        raise ValueError(f"n_components must be 2 or 3, got {n_components}")
    vectors_FD = dictionary.decoder_FD() if weight == "decoder" else dictionary.encoder_FD()
    vectors = vectors_FD.detach().float().cpu().numpy()
    embedding = umap.UMAP(
        n_neighbors=n_neighbors, metric=metric, min_dist=min_dist, n_components=n_components
    ).fit_transform(vectors)
    highlighted = (
        set() if feat_idxs is None else {int(feat_idxs)} if isinstance(feat_idxs, int) else set(map(int, feat_idxs))
    )
    colors = ["red" if i in highlighted else "steelblue" for i in range(len(vectors))]
    text = [f"feature {i}" for i in range(len(vectors))]
    coords = {axis: embedding[:, n] for n, axis in enumerate("xyz"[:n_components])}
    marker = {"color": colors, "size": 4 if n_components == 2 else 3}
    trace = (go.Scatter if n_components == 2 else go.Scatter3d)(**coords, mode="markers", marker=marker, text=text)
    return go.Figure(trace, layout={"title": f"UMAP of the {weight} directions of {len(vectors)} features"})
