"""Feature dashboards: one pass of held-out text through the model and a dictionary, then an index
page of every feature and a page per feature (density, activation histogram, top contexts with text
on both sides, samples from activation quantiles, the tokens its decoder direction promotes and
suppresses through the unembedding, first-position features flagged), as static HTML.

    stats = collect_feature_stats(ae, reader, contexts)          # the pass over the text
    write_dashboard(stats, "runs/demo/features", title="...")    # index.html + feature_<i>.html

A cross-layer transcoder's latents are numbered `s * F + j` (latent j of source layer s; the reader
reads every layer's MLP input); its pages add the norm of the latent's decoder for each output layer,
and its logit lens is the sum of what it writes to every layer (its direct write to the residual stream).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dictionaries.base import device_of
from .dictionaries.clt import CrossLayerTranscoderBase
from .dictionaries.crosscoder import relative_decoder_norms
from .interp import feature_activations
from .nnsight_io import torch_model

FIRST_POSITION_SHARE = 0.5  # a feature with at least this share of its firings at position 0 is flagged


@dataclass
class FeatureStats:
    """What one pass over `n_tokens` tokens (in `ids` rows `[N, L]`, `lengths` real tokens each)
    recorded: every non-zero activation as (row, position, feature, value), the token strings,
    and the decoder's logit-lens tokens."""

    ids: torch.Tensor  # [N, L] token ids (padding after each row's length)
    lengths: torch.Tensor  # [N]
    rows: torch.Tensor  # [M] row of each non-zero activation
    positions: torch.Tensor  # [M]
    features: torch.Tensor  # [M]
    values: torch.Tensor  # [M]
    n_features: int
    pieces: dict[int, str]  # token id -> its text
    promoted: list[list[tuple[str, float]]] = field(default_factory=list)  # per feature: top unembedding tokens
    suppressed: list[list[tuple[str, float]]] = field(default_factory=list)
    relative_norms: torch.Tensor | None = None  # a two-site crosscoder's relative decoder norm per feature
    layer_norms: torch.Tensor | None = None  # a CLT's [L * F, L]: each latent's decoder norm per output layer

    def __post_init__(self) -> None:
        # the entries grouped by feature, so each feature's slice is found without a scan
        self._order = torch.argsort(self.features, stable=True)
        counts = torch.bincount(self.features, minlength=self.n_features)
        self._starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def name(self, feature: int) -> str:
        """A feature's title: `Feature i`, or a CLT's `Latent j of layer s`."""
        if self.layer_norms is None:
            return f"Feature {feature}"
        per_layer = self.n_features // self.layer_norms.shape[1]
        return f"Latent {feature % per_layer} of layer {feature // per_layer}"

    def density(self) -> torch.Tensor:
        """`[F]` fraction of tokens on which each feature is non-zero."""
        return torch.bincount(self.features, minlength=self.n_features).double() / max(self.n_tokens, 1)

    def of(self, feature: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, positions, values) of one feature's non-zero activations."""
        picked = self._order[int(self._starts[feature]) : int(self._starts[feature + 1])]
        return self.rows[picked], self.positions[picked], self.values[picked]


@torch.no_grad()
def collect_feature_stats(
    dictionary, reader, contexts: Iterable, batch_size: int = 32, max_contexts: int = 256, top_tokens: int = 10
) -> FeatureStats:
    """Run `contexts` (strings or token-id sequences; e.g. packed held-out text) through the reader's
    model and `dictionary` at the reader's first site (a CLT: at every site, each layer's MLP input),
    keeping every non-zero activation."""
    clt = isinstance(dictionary, CrossLayerTranscoderBase)
    if clt and len(reader.sites) != dictionary.num_layers:
        raise ValueError(
            f"a cross-layer transcoder of {dictionary.num_layers} layers reads every layer's MLP input: give a "
            f"reader of those {dictionary.num_layers} MLPs (io='in'), not of {len(reader.sites)} site(s)"
        )
    items = []
    for item in contexts:
        items.append(item)
        if len(items) == max_contexts:
            break
    if not items:
        raise ValueError("no contexts to read: the text source is empty")
    id_rows, lengths, parts = [], [], []
    for start in range(0, len(items), batch_size):
        tokens = reader.tokenize(items[start : start + batch_size])
        f_BLF = feature_activations(dictionary, reader, tokens).cpu()
        f_BLF = f_BLF.flatten(-2) if clt else f_BLF  # a CLT's [B, T, L, F] -> latents s * F + j
        row_offset = sum(r.shape[0] for r in id_rows)
        b, pos, feat = torch.nonzero(f_BLF, as_tuple=True)
        parts.append((b + row_offset, pos, feat, f_BLF[b, pos, feat].float()))
        id_rows.append(tokens["input_ids"])
        lengths.append(tokens["attention_mask"].sum(1))
    width = max(r.shape[1] for r in id_rows)
    ids = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in id_rows])
    rows, positions, features, values = (torch.cat([p[i] for p in parts]) for i in range(4))
    tokenizer = reader.tokenizer
    pieces = {int(i): tokenizer.decode([int(i)]) for i in ids.unique()}
    n_features = dictionary.dict_size * (dictionary.num_layers if clt else 1)
    stats = FeatureStats(ids, torch.cat(lengths), rows, positions, features, values, n_features, pieces)
    stats.promoted, stats.suppressed = logit_lens_tokens(dictionary, reader.model, tokenizer, top_tokens)
    if not clt and getattr(dictionary, "num_layers", None) == 2:
        stats.relative_norms = relative_decoder_norms(dictionary).detach().float().cpu()
    if clt:
        stats.layer_norms = dictionary.decoder_norms_by_target().detach().float().cpu().flatten(0, 1)
    return stats


@torch.no_grad()
def logit_lens_tokens(dictionary, model, tokenizer, k: int = 10):
    """Per feature, the `k` tokens whose logits its decoder direction raises most and lowers most
    through the model's unembedding (scaled by the final norm's weight when the model has one):
    `W_U (w_norm * d_f)`. Two lists of `[(token, logit change), ...]`; empty when the model's
    width differs from the dictionary's (a site outside the residual stream's width)."""
    hf = torch_model(model)
    head = hf.get_output_embeddings()
    if head is None or head.weight.shape[1] != dictionary.activation_dim:
        return [], []
    base = getattr(hf, "base_model", hf)
    norm = getattr(base, "norm", None) or getattr(base, "final_layer_norm", None) or getattr(base, "ln_f", None)
    scale = norm.weight.detach().float() if getattr(norm, "weight", None) is not None else 1.0
    if isinstance(dictionary, CrossLayerTranscoderBase):  # everything a latent writes: [L * F, D]
        decoder_FD = torch.cat([W.sum(1) for W in dictionary.W_dec])
    elif hasattr(dictionary, "num_layers"):  # a crosscoder: what it writes to its last site
        decoder_FD = dictionary.decoder.weight[-1]
    else:
        decoder_FD = dictionary.decoder_FD() if hasattr(dictionary, "decoder_FD") else _decoder_rows(dictionary)
    W_U = head.weight.detach().float().to(device_of(dictionary))
    directions_FD = decoder_FD.float() * (scale.to(W_U.device) if torch.is_tensor(scale) else scale)
    tops, bottoms = [], []
    for chunk in directions_FD.split(1024):  # [1024, V] logits at a time, not [F, V]
        logits = chunk @ W_U.T
        tops.append(logits.topk(k, dim=1))
        bottoms.append((-logits).topk(k, dim=1))
    top = torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])
    bottom = torch.cat([b.values for b in bottoms]), torch.cat([b.indices for b in bottoms])

    def named(values, indices, sign):
        return [
            [(tokenizer.decode([int(i)]), sign * float(v)) for v, i in zip(vs, ids)]
            for vs, ids in zip(values.cpu(), indices.cpu())
        ]

    return named(*top, 1), named(*bottom, -1)


def _decoder_rows(dictionary) -> torch.Tensor:
    """`[F, D]` decoder directions of any dictionary: decode each one-hot code, minus the bias."""
    eye = torch.eye(dictionary.dict_size, device=device_of(dictionary))
    return dictionary.decode(eye) - dictionary.decode(torch.zeros_like(eye[:1]))


# --------------------------------------------------------------------------------------- pages
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.35em; margin-bottom: 0.2em; } h2 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.meta { color: #555; margin-bottom: 1em; } .flag { background: #ffe3b3; padding: 1px 6px; border-radius: 4px; }
.grid { display: grid; grid-template-columns: 330px 1fr; gap: 2em; }
.card { background: white; border: 1px solid #e3e3e3; border-radius: 8px; padding: 0.8em 1em; margin-bottom: 1em; }
table { border-collapse: collapse; width: 100%; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; color: #555; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pos { color: #0a7d32; } .neg { color: #b3261e; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.86em; white-space: pre-wrap; line-height: 1.7; }
.ctx span { border-radius: 2px; } .peak { outline: 1.5px solid #a04000; font-weight: 700; }
.val { color: #a04000; font-variant-numeric: tabular-nums; width: 4.5em; vertical-align: top; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _token_html(text: str) -> str:
    return html.escape(text).replace("\n", "&#8629;")


def _context_html(stats: FeatureStats, feature: int, row: int, peak: int, scale: float, before: int, after: int) -> str:
    """The tokens of `row` from `before` tokens before the peak to `after` after it, each shaded
    by this feature's activation there (hover: the value), the peak outlined."""
    length = int(stats.lengths[row])
    start, end = max(0, peak - before), min(length, peak + after + 1)
    rows, positions, values = stats.of(feature)
    here = rows == row
    acts = dict(zip(positions[here].tolist(), values[here].tolist()))
    spans = []
    for position in range(start, end):
        value = acts.get(position, 0.0)
        alpha = max(0.0, value) / scale if scale > 0 else 0.0
        cls = ' class="peak"' if position == peak else ""
        text = _token_html(stats.pieces[int(stats.ids[row, position])])
        spans.append(f'<span{cls} title="{value:.3f}" style="background: rgba(255,110,0,{alpha:.2f})">{text}</span>')
    return "".join(spans)


def _histogram_svg(values: torch.Tensor, bins: int = 24) -> str:
    """An SVG bar chart of the non-zero activation values."""
    if values.numel() == 0:
        return "<p>never fired</p>"
    top = float(values.max())
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=top if top > 0 else 1.0).tolist()
    return _bars_svg(counts, [f"{int(c)} tokens" for c in counts], "0", f"{top:.2f}", "#f08a24")


def _layer_norms_svg(norms: torch.Tensor) -> str:
    """A CLT latent's decoder norm for each output layer, as bars (layer 0 on the left)."""
    values = norms.tolist()
    titles = [f"layer {layer}: {v:.3f}" for layer, v in enumerate(values)]
    return _bars_svg(values, titles, "layer 0", f"layer {len(values) - 1}", "#3b7dd8")


def _bars_svg(heights: list[float], titles: list[str], left: str, right: str, colour: str) -> str:
    width, height = 300, 110
    peak = max(heights) or 1.0
    bar = width / len(heights)
    rects = [
        f'<rect x="{i * bar:.1f}" y="{height - 16 - h / peak * (height - 20):.1f}" width="{max(bar - 1, 0.5):.1f}" '
        f'height="{h / peak * (height - 20):.1f}" fill="{colour}"><title>{html.escape(t)}</title></rect>'
        for i, (h, t) in enumerate(zip(heights, titles))
    ]
    axis = (
        f'<text x="0" y="{height - 2}" font-size="10">{left}</text>'
        f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{right}</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img">{"".join(rects)}{axis}</svg>'


@dataclass
class Example:
    row: int
    peak: int
    value: float


def top_examples(stats: FeatureStats, feature: int, k: int = 12, window: int = 24) -> list[Example]:
    """The `k` strongest activations, at most one per context, skipping a context whose text around
    the peak repeats one already shown (duplicated articles, boilerplate)."""
    rows, positions, values = stats.of(feature)
    order = values.argsort(descending=True)
    seen_rows, seen_text, out = set(), set(), []
    for i in order.tolist():
        row, peak = int(rows[i]), int(positions[i])
        if row in seen_rows:
            continue
        seen_rows.add(row)
        text = tuple(stats.ids[row, max(0, peak - window) : peak + 4].tolist())
        if text in seen_text:
            continue
        seen_text.add(text)
        out.append(Example(row, peak, float(values[i])))
        if len(out) == k:
            break
    return out


def quantile_examples(
    stats: FeatureStats, feature: int, n_bins: int = 4, per_bin: int = 3, seed: int = 0
) -> list[tuple[float, float, list[Example]]]:
    """Random activations (seeded) from each of `n_bins` equal-width intervals of (0, max]:
    [(low, high, examples)], strongest interval first; empty intervals are left out."""
    rows, positions, values = stats.of(feature)
    if values.numel() == 0:
        return []
    top = float(values.max())
    gen = torch.Generator().manual_seed(seed * 1_000_003 + feature)
    out = []
    for b in reversed(range(n_bins)):
        low, high = top * b / n_bins, top * (b + 1) / n_bins
        inside = ((values > low) & (values <= high)).nonzero().flatten()
        if inside.numel() == 0:
            continue
        picks = inside[torch.randperm(inside.numel(), generator=gen)[:per_bin]]
        out.append((low, high, [Example(int(rows[i]), int(positions[i]), float(values[i])) for i in picks]))
    return out


def first_position_share(stats: FeatureStats) -> torch.Tensor:
    """`[F]` share of each feature's firings that are at a context's first position (BOS, or the
    attention sink of a packed context)."""
    counts = torch.bincount(stats.features, minlength=stats.n_features).double()
    first = torch.bincount(stats.features[stats.positions == 0], minlength=stats.n_features).double()
    return torch.where(counts > 0, first / counts.clamp(min=1), torch.zeros_like(counts))


def feature_page(stats: FeatureStats, feature: int, title: str = "", before: int = 24, after: int = 8) -> str:
    """The HTML page of one feature."""
    rows, positions, values = stats.of(feature)
    density = values.numel() / max(stats.n_tokens, 1)
    scale = float(values.max()) if values.numel() else 1.0
    share = float(first_position_share(stats)[feature])
    flag = (
        f' <span class="flag">fires mostly at the first position ({100 * share:.0f} %): a BOS / attention-sink feature'
        "</span>"
        if share >= FIRST_POSITION_SHARE
        else ""
    )

    def example_rows(examples: list[Example]) -> str:
        return "".join(
            f'<tr><td class="val">{e.value:.2f}</td><td class="ctx">'
            f"{_context_html(stats, feature, e.row, e.peak, scale, before, after)}</td></tr>"
            for e in examples
        )

    def token_list(entries: list[tuple[str, float]], cls: str) -> str:
        return "".join(
            f'<tr><td class="ctx">{_token_html(t)}</td><td class="num {cls}">{v:+.2f}</td></tr>' for t, v in entries
        )

    quantiles = "".join(
        f"<h2>Activations in ({low:.2f}, {high:.2f}]</h2><table>{example_rows(examples)}</table>"
        for low, high, examples in quantile_examples(stats, feature)
    )
    lens = ""
    if stats.promoted:
        lens = (
            f'<div class="card"><h2>Promoted tokens (logit lens)</h2><table>'
            f"{token_list(stats.promoted[feature], 'pos')}</table>"
            f"<h2>Suppressed tokens</h2><table>{token_list(stats.suppressed[feature], 'neg')}</table></div>"
        )
    heading = stats.name(feature) + (f" of {title}" if title else "")
    writes = ""
    if stats.layer_norms is not None:
        writes = (
            f'<div class="card"><h2>Decoder norm by output layer</h2>{_layer_norms_svg(stats.layer_norms[feature])}'
            f'<p class="meta">what it writes to each later MLP output; the logit lens below reads the sum</p></div>'
        )
    body = f"""<p><a href="index.html">&larr; all features</a></p>
<h1>{html.escape(heading)}</h1>
<div class="meta">density {100 * density:.3f} % ({values.numel():,} of {stats.n_tokens:,} tokens) &middot;
max activation {scale if values.numel() else 0:.3f}{flag}{_relative_norm_note(stats, feature)}</div>
<div class="grid"><div>
<div class="card"><h2>Activation histogram (non-zero values)</h2>{_histogram_svg(values)}</div>
{writes}{lens}</div>
<div><div class="card"><h2>Top activations</h2>
<p class="meta">{before} tokens before the peak (outlined) and {after} after; darker = stronger; hover a token
for its value. One example per context, repeated text left out.</p>
<table>{example_rows(top_examples(stats, feature))}</table></div>
<div class="card">{quantiles or "<p>never fired on these tokens</p>"}</div></div></div>"""
    return _page(heading, body)


def _relative_norm_note(stats: FeatureStats, feature: int) -> str:
    """A crosscoder feature's relative decoder norm, said in words (0: site 0 only, 1: site 1 only)."""
    if stats.relative_norms is None:
        return ""
    r = float(stats.relative_norms[feature])
    where = "site 0 only" if r < 0.1 else "site 1 only" if r > 0.9 else "mostly site 0" if r < 0.4 else (
        "mostly site 1" if r > 0.6 else "both sites")  # fmt: skip
    return f" &middot; relative decoder norm {r:.2f} (writes to {where})"


def index_page(stats: FeatureStats, title: str = "", linked: set[int] | None = None) -> str:
    """One row per feature: density, max activation, top promoted tokens, the first-position flag;
    alive features first, by density; links to the pages that were written."""
    density = stats.density()
    share = first_position_share(stats)
    maxima = torch.zeros(stats.n_features).scatter_reduce(0, stats.features, stats.values.float(), "amax")
    order = sorted(range(stats.n_features), key=lambda f: -float(density[f]))
    rows = []
    for f in order:
        name = f'<a href="feature_{f}.html">{f}</a>' if linked is None or f in linked else str(f)
        tokens = " ".join(f"<code>{_token_html(t)}</code>" for t, _ in stats.promoted[f][:5]) if stats.promoted else ""
        log_density = f"{math.log10(float(density[f])):.2f}" if density[f] > 0 else "dead"
        flag = '<span class="flag">first position</span>' if share[f] >= FIRST_POSITION_SHARE else ""
        relative = (
            f'<td class="num">{float(stats.relative_norms[f]):.2f}</td>' if stats.relative_norms is not None else ""
        )
        if stats.layer_norms is not None:  # a CLT: the layer it reads, the layer it writes most to
            per_layer = stats.n_features // stats.layer_norms.shape[1]
            relative = f'<td class="num">{f // per_layer}</td><td class="num">{int(stats.layer_norms[f].argmax())}</td>'
        rows.append(
            f'<tr><td>{name}</td><td class="num">{100 * float(density[f]):.3f}</td><td class="num">{log_density}</td>'
            f'<td class="num">{float(maxima[f]):.2f}</td>{relative}<td>{tokens}</td><td>{flag}</td></tr>'
        )
    alive = int((density > 0).sum())
    relative_header = "<th>rel. decoder norm</th>" if stats.relative_norms is not None else ""
    if stats.layer_norms is not None:
        relative_header = "<th>reads layer</th><th>writes most to</th>"
    heading = f"Features of {title}" if title else "Features"
    body = f"""<h1>{html.escape(heading)}</h1>
<div class="meta">{stats.n_features:,} features, {alive:,} fired on {stats.n_tokens:,} tokens
({len(stats.lengths):,} contexts); {int((share >= FIRST_POSITION_SHARE).sum())} fire mostly at the first position.</div>
<table><tr><th>feature</th><th>density %</th><th>log10 density</th><th>max act.</th>{relative_header}
<th>promoted tokens</th><th></th></tr>
{"".join(rows)}</table>"""
    return _page(heading, body)


def write_dashboard(
    stats: FeatureStats, out: str | Path, title: str = "", features: Iterable[int] | None = None
) -> Path:
    """Write `index.html` and `feature_<i>.html` for `features` (default: every feature that fired)
    into `out`; returns the index page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fired = torch.unique(stats.features).tolist()
    chosen = sorted(set(fired) if features is None else {int(f) for f in features})
    for f in chosen:
        if not 0 <= f < stats.n_features:
            raise ValueError(f"feature {f} is out of range: the dictionary has {stats.n_features} features")
        (out / f"feature_{f}.html").write_text(feature_page(stats, f, title), encoding="utf-8")
    index = out / "index.html"
    index.write_text(index_page(stats, title, set(chosen)), encoding="utf-8")
    return index
