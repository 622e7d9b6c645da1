"""A cross-layer transcoder's decoder, forward and backward, on a batch-level (BatchTopK) code whose
tokens keep different numbers of latents: dense (every latent's rows), padded (`decode_sparse` with
every token's list padded to the longest) and ragged (`decode_active`, no padding). No peer trains
CLTs with a sparse decoder, so the comparison is between our three paths, alternated, each one's
fastest of `--repeats` kept (these machines drift by 10-30 % over minutes).

    .venv/bin/python benchmarks/clt_decoder.py            # SmolLM2's shape: L 30, D 576, F 256, N 512
"""

from __future__ import annotations

import argparse
import time

import torch

from dictionary_learning.dictionaries import BatchTopKCrossLayerTranscoder


def seconds(decode) -> float:
    start = time.perf_counter()
    decode().pow(2).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 30), ("width", 576), ("latents", 256), ("k", 16), ("tokens", 512)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    ae = BatchTopKCrossLayerTranscoder(args.width, args.latents, args.layers, args.k)
    scale = torch.rand(args.tokens, 1, 1) * 3  # tokens of different norms keep different numbers of latents
    f = ae.batch_topk(torch.randn(args.tokens, args.layers, args.latents) * scale)
    counts = (f > 0).sum(-1)
    values, indices = f.topk(int(counts.max()), dim=-1, sorted=False)
    paths = {
        "dense": lambda: ae.decode(f),
        "padded": lambda: ae.decode_sparse(indices, values),
        "ragged": lambda: ae.decode_active(f),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):
        for name, decode in paths.items():
            best[name] = min(best[name], seconds(decode))
    print(f"latents per token and layer: mean {counts.float().mean():.1f}, max {int(counts.max())}")
    for name, s in best.items():
        print(f"{name:7s} {s:.3f} s  ({best['dense'] / s:.2f}x dense)")


if __name__ == "__main__":
    main()
