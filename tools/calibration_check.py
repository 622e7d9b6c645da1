"""How much of each MLP output a TopK/BatchTopK dictionary explains once exported to circuit-tracer
with JumpReLU thresholds, per calibration rule: thresholds calibrated on one half of the held-out
tokens, every code scored on the other half (mean over layers of the variance explained).

    .venv/bin/python tools/calibration_check.py --per-layer runs/circuit_tracing_demo/per_layer \
        --clt runs/clt/trainer_0 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from dictionary_learning import load_dictionary
from dictionary_learning.circuit_export import CALIBRATIONS, jumprelu_thresholds, read_mlp_pairs
from dictionary_learning.models import default_texts, load_default_model, num_layers


def fve(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def per_layer_set(folder: str, fit: torch.Tensor, test: torch.Tensor) -> dict:
    scores = {"topk": []} | {rule: [] for rule in CALIBRATIONS}
    for layer in range(fit.shape[1]):
        ae, _ = load_dictionary(f"{folder}/trainer_{layer}")
        a_fit, a_test = ae.relu_pre_activations(fit[:, layer, 0]), ae.relu_pre_activations(test[:, layer, 0])
        kept = ae.encode(fit[:, layer, 0]) > 0
        y = test[:, layer, 1]
        scores["topk"].append(fve(y, ae.decode(ae.encode(test[:, layer, 0]))))
        for rule in CALIBRATIONS:
            threshold = jumprelu_thresholds(a_fit, kept, ae.active_k, rule)
            scores[rule].append(fve(y, ae.decode(a_test * (a_test > threshold))))
    return {key: round(statistics.mean(values), 4) for key, values in scores.items()}


def clt(folder: str, fit: torch.Tensor, test: torch.Tensor) -> dict:
    ae, _ = load_dictionary(folder)
    L = ae.num_layers
    pre_fit, pre_test = ae.pre_activations(fit[:, :, 0]), ae.pre_activations(test[:, :, 0])
    codes = {"own code": ae.encode(test[:, :, 0])}  # TopK's top k, or BatchTopK's tracked thresholds
    kept = ae.encode(fit[:, :, 0]) > 0
    for rule in CALIBRATIONS:
        thresholds = torch.stack(
            [jumprelu_thresholds(torch.relu(pre_fit[:, s]), kept[:, s], ae.active_k, rule) for s in range(L)]
        )
        codes[rule] = pre_test * (pre_test > thresholds)
    y = test[:, :, 1]
    scores = {}
    for key, code in codes.items():
        y_hat = ae.decode(code)
        scores[key] = round(statistics.mean(fve(y[:, s], y_hat[:, s]) for s in range(L)), 4)
        scores[f"{key} L0"] = round(float((code > 0).sum(-1).float().mean()), 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-layer", help="a run folder of one TopK transcoder per layer (trainer_<layer>)")
    parser.add_argument("--clt", nargs="*", default=[], help="TopK or BatchTopK cross-layer transcoder folders")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens, half to fit, half to score")
    args = parser.parse_args()
    model = load_default_model()
    pairs = read_mlp_pairs(model, list(range(num_layers(model))), default_texts(split="held_out"), args.tokens)
    fit, test = pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]
    results = {}
    with torch.no_grad():
        if args.per_layer:
            results[args.per_layer] = per_layer_set(args.per_layer, fit, test)
        for folder in args.clt:
            results[folder] = clt(folder, fit, test)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
