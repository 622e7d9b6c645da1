"""Does torch.compile pay for a training step on CPU? Standard SAE loss and backward, B=4096 D=576 F=4608:
autograd through the plain modules, the same under torch.compile, and our hand-written fused backward.

    python benchmarks/compile_check.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dictionary_learning.dictionaries import AutoEncoder
from dictionary_learning.ops import row_sums

torch.manual_seed(0)
x = torch.randn(4096, 576)
ae = AutoEncoder(576, 4608)


def plain_loss(x):  # autograd through the plain modules
    f = ae.encode(x)
    x_hat = ae.decode(f)
    return (x - x_hat).pow(2).sum(-1).mean() + 0.1 * f.sum(-1).mean()


def fused_loss(x, md=0.0):  # our hand-written backward
    f, x_hat = ae.encode_decode(x, md)
    return (x - x_hat).pow(2).sum(-1).mean() + 0.1 * row_sums(f).mean()


compiled = torch.compile(plain_loss)


def timeit(fn, n=4):
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def step(lossfn):
    def run():
        ae.zero_grad()
        lossfn(x).backward()

    return run


t0 = time.perf_counter()
step(compiled)()
print(f"compile time {time.perf_counter() - t0:.1f}s")
for name, fn in [("eager autograd", plain_loss), ("torch.compile", compiled), ("ours fused (dense)", fused_loss)]:
    print(f"{name:22s} {timeit(step(fn)):.3f} s/step (forward+backward)", flush=True)
