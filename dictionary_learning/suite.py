"""Judge a sweep as the field does: every dictionary of a run, on the same texts, with one model pass
per text batch shared by all the dictionaries at a site.

Suites: `core` (reconstruction and the loss when spliced in, with intervals and paired differences:
`evaluation.evaluate_dictionaries`), `sparse_probing` (`probing`) and `absorption` (`absorption`).
Each dictionary's record holds `core/...`, `sparse_probing/...` and `absorption/...` metrics;
dictionaries that differ only in their seed form a group whose metrics are reported as mean and
spread (`group_by_seed`), so a difference smaller than the seed noise is marked as such.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import document_part
from .models import DEFAULT_TEXTS_NAME

SUITES = ("core", "sparse_probing", "absorption")
# config.json's trainer entries that do not make two dictionaries different recipes
NOT_A_SETTING = {"seed", "wandb_name", "device", "norm_factor", "steps_trained"}


@dataclass
class Entry:
    """One dictionary of the sweep: its name (folder), the dictionary, its config and its record."""

    name: str
    ae: Any
    config: dict
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> tuple:
        """What it was trained with, its seed left out: equal for the seeds of one config."""
        trainer = {k: v for k, v in (self.config.get("trainer") or {}).items() if k not in NOT_A_SETTING}
        return tuple(sorted((k, repr(v)) for k, v in trainer.items()))


def check_suites(text: str) -> list[str]:
    suites = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"unknown suite {unknown or text!r}: choose from {', '.join(SUITES)} (comma-separated)")
    return suites


def find_dictionaries(paths: list[str]) -> list[Path]:
    """The dictionary folders among `paths`: a folder with weights is one; a run folder gives each of
    its `trainer_*` folders (numerically ordered). A path with neither is an error naming it."""
    found = []
    for path in map(Path, paths):
        if "://" in str(path) or any((path / w).is_file() for w in ("ae.pt", "ae.safetensors")):
            found.append(path)
            continue
        trainers = sorted(
            (p for p in path.glob("trainer_*") if p.name[8:].isdigit()), key=lambda p: int(p.name[8:])
        ) if path.is_dir() else []  # fmt: skip
        if not trainers:
            raise FileNotFoundError(f"{path} holds no dictionary (ae.pt or ae.safetensors) and no trainer_* folders")
        found += trainers
    return found


def probing_overlap(texts: list[str], buffer_record: dict | None, source: str) -> str:
    """What the record says about probing texts the dictionary trained on (labels were never seen)."""
    text = (buffer_record or {}).get("text") or {}
    if not text:
        return "unknown: the dictionary's config.json does not record its training text"
    if text.get("source") != DEFAULT_TEXTS_NAME or "BBC" not in source:
        return f"unknown: trained on {text.get('source')!r}, probed on {source!r}"
    part = text.get("part", "all")
    fraction = float(text.get("held_out_fraction", 0.05))
    inside = len(texts) if part == "all" else sum(document_part(t, fraction) == part for t in texts)
    return f"{inside} of {len(texts)} probing texts are in the {part} part the dictionary trained on"


# ------------------------------------------------------------------------------------------ seeds
def group_by_seed(entries: list[Entry]) -> list[list[Entry]]:
    """Entries grouped by setting (seeds of one config together), in first-seen order."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.setting, []).append(entry)
    return list(groups.values())


def summarise(group: list[Entry], key: str) -> tuple[float, float] | None:
    """(mean, sample standard deviation; 0 for one seed) of `key` over a group, None if absent."""
    values = [e.record[key] for e in group if isinstance(e.record.get(key), (int, float))]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def within_noise(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two groups' means differ by less than the larger of their seed spreads (both measured)."""
    spread = max(a[1], b[1])
    return spread > 0 and abs(a[0] - b[0]) <= spread


# --------------------------------------------------------------------------------- probing suites
def run_probing(model, site, dictionaries: list, data, ctx_len: int = 128, batch_size: int = 32):
    """Sparse probing of `dictionaries` at `site` on `data` (`probing.ProbeData`), one model pass."""
    from .probing import probe_features, sparse_probing
    from .reader import ActivationReader

    reader = ActivationReader([], model, site, ctx_len=ctx_len, pack=False, remove_bos=True)
    features = probe_features(reader, data.texts, dictionaries, batch_size)
    return sparse_probing(features[0], features[1:], data)


def run_absorption(model, site, dictionaries: list, words_per_letter: int = 100, batch_size: int = 32):
    """First-letter absorption of `dictionaries` at `site`, one model pass over the words' prompts."""
    from .absorption import feature_absorption
    from .reader import ActivationReader

    reader = ActivationReader([], model, site, ctx_len=256, pack=False)
    return feature_absorption(reader, dictionaries, words_per_letter, batch_size)


# ------------------------------------------------------------------------------------ the report
COLUMNS = [  # (record key, header, format, higher is better)
    ("core/l0", "L0", "{:.1f}", None),
    ("core/frac_variance_explained", "FVE", "{:.3f}", True),
    ("core/ce_diff_pooled", "CE incr.", "{:.4f}", False),
    ("core/frac_recovered_pooled", "CE rec.", "{:.3f}", True),
    ("sparse_probing/sae_top_1_test_accuracy", "top-1", "{:.3f}", True),
    ("sparse_probing/sae_top_5_test_accuracy", "top-5", "{:.3f}", True),
    ("sparse_probing/sae_test_accuracy", "all", "{:.3f}", True),
    ("absorption/mean_absorption_fraction_score", "absorb.", "{:.3f}", False),
]


def report(entries: list[Entry]) -> list[str]:
    """The table: one line per setting (its seeds pooled: mean, and +-sd over seeds when several);
    `~` marks a value within seed noise of the best setting's (`within_noise`)."""
    groups = group_by_seed(entries)
    columns = [c for c in COLUMNS if any(summarise(g, c[0]) for g in groups)]
    best = {}
    for key, _, _, higher in columns:
        values = [v for g in groups if (v := summarise(g, key))]
        if higher is not None and values:
            best[key] = (max if higher else min)(values, key=lambda v: v[0])
    header = f"{'dictionary':36s} {'seeds':>5s} " + " ".join(f"{h:>15s}" for _, h, _, _ in columns)
    lines = [header]
    for group in groups:
        cells = []
        for key, _, fmt, _ in columns:
            value = summarise(group, key)
            if value is None:
                cells.append(f"{'-':>15s}")
                continue
            text = fmt.format(value[0]) + (f"±{fmt.format(value[1])}" if len(group) > 1 else "")
            mark = "~" if key in best and best[key] is not value and within_noise(value, best[key]) else " "
            cells.append(f"{text + mark:>15s}")
        lines.append(f"{group[0].name[-36:]:36s} {len(group):5d} " + " ".join(cells))
    return lines


def pareto_plots(entries: list[Entry], out: Path) -> list[Path]:
    """L0 against FVE, CE increase and top-1 probing accuracy: one point per setting, its seed
    spread as error bars (`out/pareto.png`); nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    panels = [("core/frac_variance_explained", "fraction of variance explained"),
              ("core/ce_diff_pooled", "CE increase when spliced in (nats)"),
              ("sparse_probing/sae_top_1_test_accuracy", "top-1 sparse probing accuracy")]  # fmt: skip
    groups = group_by_seed(entries)
    panels = [p for p in panels if any(summarise(g, p[0]) for g in groups)]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for group in groups:
            x, y = summarise(group, "core/l0"), summarise(group, key)
            if x and y:
                ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt="o", capsize=2)
                ax.annotate(group[0].name[-18:], (x[0], y[0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("one point per setting; bars: spread over seeds", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return [out / "pareto.png"]
