"""Feature absorption (SAEBench's first-letter method, Chanin et al. 2024 "A is for Absorption",
written anew): does a latent that means "starts with S" stay silent on some S-words because another
latent has absorbed that direction?

1. Words: single-token words of the tokenizer's vocabulary (a space, then two or more ASCII
   letters), at most `words_per_letter` per first letter, split 80/20 by a hash of each word.
2. Each word is read at the dictionary's site at its own position, after in-context examples
   ("<w> has the first letter: <L>" lines), as SAEBench prompts it.
3. A first-letter probe on the model's activations: one logistic regression per letter. Letters
   whose test F1 is below SAEBench's floor (0.6) are left out; with fewer than 20 letters left the
   metric is "not measurable on this model" (SAEBench advises 1B+ models), reported with the F1s.
4. Per letter, the latents that carry it: latents ranked by an L1-regularised probe on the codes,
   k grown from 1 while the k-latent probe's test F1 rises by 0.03 or more (SAEBench's feature
   splitting rule); those are the letter's main latents.
5. For each test word the probe calls correctly, with a = the activation's projection on the probe
   direction and each latent's share = its activation times its decoder's cosine with the probe:
   `absorption_fraction` (how much of `a` other latents aligned with the probe carry while the main
   latents fall short) and full absorption (the main latents silent and one aligned latent carrying
   at least 40 % of `a`); each averaged per letter over the probe's true positives, then over letters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_PROBE_F1 = 0.6  # SAEBench's min_GT_probe_f1
MIN_LETTERS = 20  # SAEBench's min_feats_for_eval
F1_JUMP = 0.03  # a further latent counts as a split when the k-sparse probe's F1 rises this much
MAX_K = 10
FULL_ABSORPTION_COS = 0.025  # the absorbing latent's decoder must be this aligned with the probe
FRACTION_COS = 0.1  # for the fraction, each absorbing latent must be this aligned
PROJECTION_SHARE = 0.4  # absorbing latents must carry this share of the probe projection
MAX_ABSORBERS = 3


@dataclass
class Words:
    """The words of the task with their first letters and train/test parts."""

    words: list[str]
    letters: list[int]
    test: list[bool]


def vocabulary_words(tokenizer, words_per_letter: int = 100, test_fraction: float = 0.2) -> Words:
    """Single-token words (a space then >= 2 ASCII letters), the first `words_per_letter` per letter
    in token-id order, each in the test part by a hash of the word."""
    chosen: dict[str, list[str]] = {letter: [] for letter in LETTERS}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if not (text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha()):
            continue
        bucket = chosen[word[0].lower()]
        if len(bucket) < words_per_letter and word not in bucket:
            bucket.append(word)
    words = [w for letter in LETTERS for w in chosen[letter]]
    digest = [int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "big") / 2**64 for w in words]
    return Words(words, [LETTERS.index(w[0].lower()) for w in words], [d < test_fraction for d in digest])


def prompts(words: Words, n_examples: int = 10, seed: int = 0) -> list[str]:
    """Each word after `n_examples` in-context lines "<w> has the first letter: <L>" drawn from the
    training words; the prompt ends with the word itself (read there: causally the same as SAEBench's
    position before " has the first letter:")."""
    generator = torch.Generator().manual_seed(seed)
    pool = [w for w, t in zip(words.words, words.test) if not t]
    out = []
    for word in words.words:
        picks = torch.randperm(len(pool), generator=generator)[: n_examples + 1].tolist()
        examples = [pool[i] for i in picks if pool[i] != word][:n_examples]
        lines = [f" {w} has the first letter: {w[0].upper()}" for w in examples]
        out.append("\n".join(lines) + "\n " + word)
    return out


@torch.no_grad()
def word_activations(reader, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The site's activation at each prompt's last real token: `[n, D]`."""
    rows = []
    for start in range(0, len(texts), batch_size):
        tokens = reader.tokenize(texts[start : start + batch_size])
        (acts,), _, _ = reader.read_padded(tokens)
        last = tokens["attention_mask"].sum(1) - 1
        rows.append(acts[torch.arange(acts.shape[0]), last.to(acts.device)].float().cpu())
    return torch.cat(rows)


def _f1(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    tp = float((predicted & actual).sum())
    fp, fn = float((predicted & ~actual).sum()), float((~predicted & actual).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def letter_probes(x: torch.Tensor, words: Words) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """`(directions [26, D], test scores [n_test, 26], test F1 per letter)` of one-vs-rest logistic
    regressions of each letter on the training words' activations."""
    from sklearn.linear_model import LogisticRegression

    train = torch.tensor([not t for t in words.test])
    letters = torch.tensor(words.letters)
    directions, scores, f1s = [], [], []
    for letter in range(len(LETTERS)):
        target = letters == letter
        if not bool(target[train].any()) or not bool(target[~train].any()):
            directions.append(torch.zeros(x.shape[1]))
            scores.append(torch.full((int((~train).sum()),), -1.0))
            f1s.append(0.0)
            continue
        probe = LogisticRegression(max_iter=1000, class_weight="balanced").fit(x[train].numpy(), target[train].numpy())
        directions.append(torch.tensor(probe.coef_[0], dtype=torch.float32))
        score = torch.tensor(probe.decision_function(x[~train].numpy()), dtype=torch.float32)
        scores.append(score)
        f1s.append(_f1(score > 0, target[~train]))
    return torch.stack(directions), torch.stack(scores, 1), f1s


def main_latents(codes: torch.Tensor, words: Words, letter: int) -> list[int]:
    """The latents that carry `letter`: ranked by an L1 probe's positive weights, k grown while the
    k-latent probe's test F1 rises by at least F1_JUMP."""
    from sklearn.linear_model import LogisticRegression

    train = torch.tensor([not t for t in words.test])
    target = torch.tensor(words.letters) == letter
    ranker = LogisticRegression(penalty="l1", solver="liblinear", C=0.1, class_weight="balanced")
    ranker.fit(codes[train].numpy(), target[train].numpy())
    ranked = torch.tensor(ranker.coef_[0]).argsort(descending=True)[:MAX_K].tolist()
    best, chosen = -1.0, []
    for k in range(1, len(ranked) + 1):
        columns = ranked[:k]
        probe = LogisticRegression(max_iter=500, class_weight="balanced")
        probe.fit(codes[train][:, columns].numpy(), target[train].numpy())
        f1 = _f1(torch.tensor(probe.decision_function(codes[~train][:, columns].numpy())) > 0, target[~train])
        if f1 < best + F1_JUMP:
            break
        best, chosen = f1, columns
    return chosen


def word_absorption(
    activation: torch.Tensor, code: torch.Tensor, cosines: torch.Tensor, direction: torch.Tensor, main: list[int]
) -> tuple[float, bool]:
    """`(absorption fraction, full absorption)` of one word (see the module docstring)."""
    projection = float(activation @ direction)
    shares = code * cosines  # each latent's projection on the probe direction
    main_share = float(shares[main].sum()) if main else 0.0
    others = torch.ones_like(shares, dtype=torch.bool)
    others[main] = False
    candidates = shares[others & (cosines >= FRACTION_COS) & (shares > 0)]
    top = float(candidates.topk(min(MAX_ABSORBERS, candidates.numel())).values.sum()) if candidates.numel() else 0.0
    if projection <= 0 or main_share >= projection or top / projection < PROJECTION_SHARE:
        fraction = 0.0
    elif main_share <= 0:
        fraction = 1.0
    else:
        absorbed = min(top, projection - main_share)
        fraction = min(max(absorbed / (absorbed + main_share), 0.0), 1.0)
    first = int(shares.argmax())
    full = (
        all(float(code[i]) < 1e-8 for i in main)
        and float(cosines[first]) >= FULL_ABSORPTION_COS
        and projection >= 0
        and float(shares[first]) / projection >= PROJECTION_SHARE
    )
    return fraction, bool(full)


@torch.no_grad()
def feature_absorption(
    reader, dictionaries: list, words_per_letter: int = 100, batch_size: int = 32
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`(probe record, one record per dictionary)` at the reader's site, from one model pass over
    the words' prompts: SAEBench's `mean_absorption_fraction_score`, `mean_full_absorption_score` and
    `mean_num_split_features`, with per-letter details; or, when the probe does not reach the floor,
    records that say "not measurable" and why."""
    words = vocabulary_words(reader.tokenizer, words_per_letter)
    x = word_activations(reader, prompts(words), batch_size)
    directions, scores, f1s = letter_probes(x, words)
    measured = [letter for letter, f1 in enumerate(f1s) if f1 >= MIN_PROBE_F1]
    probe = {"probe_f1": dict(zip(LETTERS, f1s)), "letters_measured": len(measured), "n_words": len(words.words)}
    if len(measured) < MIN_LETTERS:
        why = (
            f"not measurable on this model: the first-letter probe reaches F1 >= {MIN_PROBE_F1} for {len(measured)} "
            f"of 26 letters (SAEBench needs {MIN_LETTERS}; mean probe F1 {sum(f1s) / len(f1s):.2f})"
        )
        return probe | {"measurable": False, "why": why}, [{"measurable": False, "why": why} for _ in dictionaries]
    test_rows = [i for i, t in enumerate(words.test) if t]
    return probe | {"measurable": True}, [
        _dictionary_absorption(ae, x, words, directions, scores, measured, test_rows) for ae in dictionaries
    ]


def _dictionary_absorption(ae, x, words: Words, directions, scores, measured: list[int], test_rows: list[int]):
    device = next(ae.parameters()).device
    codes = ae.encode(x.to(device)).float().cpu()
    decoder = ae.decoder_FD().detach().float().cpu()
    decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp(min=1e-8)
    per_letter = {}
    for letter in measured:
        unit = directions[letter] / directions[letter].norm().clamp(min=1e-8)
        cosines = decoder @ unit
        main = main_latents(codes, words, letter)
        positives = [row for j, row in enumerate(test_rows) if words.letters[row] == letter and scores[j, letter] > 0]
        if not positives:
            continue
        results = [word_absorption(x[i], codes[i], cosines, unit, main) for i in positives]
        per_letter[LETTERS[letter]] = {
            "mean_absorption_fraction": sum(r[0] for r in results) / len(positives),
            "full_absorption_rate": sum(r[1] for r in results) / len(positives),
            "num_split_features": len(main),
            "num_probe_true_positives": len(positives),
        }
    mean = lambda key: sum(v[key] for v in per_letter.values()) / max(len(per_letter), 1)  # noqa: E731
    return {
        "measurable": True,
        "mean_absorption_fraction_score": mean("mean_absorption_fraction"),
        "mean_full_absorption_score": mean("full_absorption_rate"),
        "mean_num_split_features": mean("num_split_features"),
        "per_letter": per_letter,
    }
