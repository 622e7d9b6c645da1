"""Run by test_fast_paths.py in a subprocess with TRITON_INTERPRET=1: the Triton kernels of the sparse
path against the PyTorch path, on CPU tensors (the interpreter). Exits non-zero on a mismatch."""

import collections

import torch

from dictionary_learning import sparse, triton_kernels
from dictionary_learning.trainers import BatchTopKTrainer, StandardTrainer, TopKTrainer

assert sparse.USE_TRITON, "run with DICTIONARY_LEARNING_TRITON=1"
calls = collections.Counter()


def counted(name):
    """The kernel wrapper `name`, counting its calls (to be sure the kernels ran)."""
    fn = getattr(triton_kernels, name)

    def wrapper(*args):
        calls[name] += 1
        return fn(*args)

    return wrapper


for name in ("sampled_products", "group_sums"):
    setattr(triton_kernels, name, counted(name))


def both(fn, *args):
    """fn(*args) with the Triton kernels, then with the PyTorch path."""
    out = []
    for use in (True, False):
        sparse.USE_TRITON = use
        out.append(fn(*args))
    sparse.USE_TRITON = True
    return out


torch.manual_seed(0)
# widths below, at and above the kernels' block of 128; features with no entries; no entries at all
for width, n_rows, n_features, density in ((24, 16, 40, 0.2), (128, 8, 30, 0.3), (200, 12, 50, 0.1), (24, 4, 10, 0.0)):
    a, W = torch.randn(n_rows, width), torch.randn(n_features, width)
    mask = torch.rand(n_rows, n_features) < density
    for rows, features, offsets in (
        sparse.active_entries(mask, 1.0),
        sparse.row_topk_entries(torch.randn(n_rows, n_features), 3),  # unsorted features within a row
    ):
        tri, ref = both(sparse.sampled_products, a, W, rows, features, offsets)
        torch.testing.assert_close(tri, ref)
        torch.testing.assert_close(tri, (a @ W.T)[rows, features])
        w = torch.randn(rows.shape[0])
        tri, ref = both(sparse.feature_sums, w, a, rows, features, n_features)
        torch.testing.assert_close(tri, ref)
        dense = torch.zeros(n_rows, n_features).index_put((rows, features), w)
        torch.testing.assert_close(tri, dense.T @ a, atol=1e-5, rtol=1e-5)

# whole training steps: the TopK family and a dense recipe on its sparse path
x = torch.randn(6, 32, 20) * 2
common = dict(steps=10, activation_dim=20, dict_size=48, seed=1, device="cpu", layer=0, lm_name="t")
configs = (
    (TopKTrainer, dict(k=4, warmup_steps=0)),
    (BatchTopKTrainer, dict(k=4, warmup_steps=0)),
    (StandardTrainer, dict(warmup_steps=0, sparsity_warmup_steps=0, l1_penalty=0.1)),
)
sparse.SPARSE_MAX_DENSITY = 1.0  # the sparse path at any density


def train(cls, kwargs):
    trainer = cls(**common, **kwargs)
    for i, batch in enumerate(x):
        trainer.update(i, batch)
    return trainer.ae.state_dict()


for cls, kwargs in configs:
    tri, ref = both(train, cls, kwargs)
    for name in ref:
        torch.testing.assert_close(tri[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"{cls.__name__} {name}")
assert calls["sampled_products"] >= 8 + 3 * 6 and calls["group_sums"] >= 8 + 3 * 6 * 2, calls
print("triton parity ok", dict(calls))
