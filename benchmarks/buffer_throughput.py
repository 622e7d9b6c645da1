"""Activation extraction speed and memory on SmolLM2-135M (layer 3 MLP output, ctx 128, BBC News text).

    python benchmarks/buffer_throughput.py --reference-python /path/to/venv_dl/bin/python

Speed: tokens per second of a buffer's first fill (`n_ctxs` contexts), best of `--repeats`:
  * floor: plain PyTorch forward hooks that stop the model after layer 3, nothing else;
  * ours: dictionary_learning.buffer.ActivationBuffer (nnsight 0.8), in the same process as the floor;
  * ours, pytorch_buffer: the same buffer on the plain Hugging Face model with PyTorch hooks (no nnsight);
  * reference: dictionary-learning 0.1.0's ActivationBuffer (nnsight 0.3) in its own venv.
Memory: the peak RSS of a process with a buffer of N2 contexts minus that of one with N1 contexts,
both reading the same documents (the smaller buffer keeps serving and refilling), against the growth
of the activation tensor. The model's transient working set (several hundred MB) is the same in
both and cancels out; the probes run with a fixed glibc mmap threshold so that RSS tracks live
memory rather than freed blocks the allocator keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYER, CTX_LEN, LM_BATCH, WIDTH = 3, 128, 32, 576


class Counting:
    """An iterator that counts the documents taken from it."""

    def __init__(self, items):
        self.items, self.taken = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.taken += 1
        return item


def corpus(path: str) -> list[str]:
    with open(path) as fh:
        return json.load(fh)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill_and_read(buffer, source: Counting, documents: int) -> float:
    """Seconds of the first fill (the first batch); then serve until `documents` have been read."""
    start = time.perf_counter()
    next(buffer)
    seconds = time.perf_counter() - start
    while source.taken < documents:
        next(buffer)
    return seconds


def floor(n_ctxs: int, texts: list[str]) -> float:
    """Tokens/s of tokenize + forward to layer 3 + mask, with nothing else."""
    from dictionary_learning.models import load_default_model

    model = load_default_model()
    hf, tok = model._module, model.tokenizer

    class Stop(Exception):
        pass

    captured = {}

    def hook(module, args, output):
        captured["x"] = output
        raise Stop

    handle = hf.model.layers[LAYER].mlp.register_forward_hook(hook)
    source, n = iter(texts), 0
    start = time.perf_counter()
    with torch.no_grad():
        while n < n_ctxs * CTX_LEN:
            enc = tok(
                [next(source) for _ in range(LM_BATCH)],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=CTX_LEN,
                padding_side="right",
            )
            try:
                hf(**enc)
            except Stop:
                pass
            n += captured["x"][enc["attention_mask"].bool()].shape[0]
    handle.remove()
    return n / (time.perf_counter() - start)


def ours(n_ctxs: int, texts: list[str], documents: int = 0) -> float:
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.models import get_submodule, load_default_model

    model = load_default_model()
    source = Counting(texts)
    buffer = ActivationBuffer(
        source,
        model,
        get_submodule(model, LAYER, "mlp"),
        n_ctxs=n_ctxs,
        ctx_len=CTX_LEN,
        refresh_batch_size=LM_BATCH,
        out_batch_size=4096,
    )
    return n_ctxs * CTX_LEN / fill_and_read(buffer, source, documents)


def ours_pytorch(n_ctxs: int, texts: list[str]) -> float:
    """Our `pytorch_buffer.ActivationBuffer`: the same buffer on the plain Hugging Face model, read
    with PyTorch hooks instead of nnsight."""
    from dictionary_learning.models import load_default_model
    from dictionary_learning.pytorch_buffer import ActivationBuffer

    model = load_default_model()
    source = Counting(texts)
    hf = model._module
    buffer = ActivationBuffer(
        source,
        hf,
        hf.model.layers[LAYER].mlp,
        n_ctxs=n_ctxs,
        ctx_len=CTX_LEN,
        refresh_batch_size=LM_BATCH,
        out_batch_size=4096,
        tokenizer=model.tokenizer,
    )
    return n_ctxs * CTX_LEN / fill_and_read(buffer, source, 0)


def reference(n_ctxs: int, texts: list[str], model_dir: str, documents: int = 0) -> float:
    """Runs inside the reference's venv (there, `dictionary_learning` is the reference package)."""
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dictionary_learning.buffer import ActivationBuffer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = LanguageModel(hf, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    source = Counting(texts)
    buffer = ActivationBuffer(
        source,
        model,
        model.model.layers[LAYER].mlp,
        d_submodule=WIDTH,
        io="out",
        n_ctxs=n_ctxs,
        ctx_len=CTX_LEN,
        refresh_batch_size=LM_BATCH,
        out_batch_size=4096,
        device="cpu",
    )
    return n_ctxs * CTX_LEN / fill_and_read(buffer, source, documents)


def child(args) -> dict:
    """One measurement in this process: speed runs (repeats > 0) or a memory probe (repeats == 0)."""
    texts = corpus(args.texts)
    if args.repeats == 0:
        if args.impl == "ours":
            ours(args.n_ctxs, texts, args.documents)
        else:
            reference(args.n_ctxs, texts, args.model_dir, args.documents)
        return {"peak_mb": peak_rss_mb()}
    if args.impl == "ours":  # the floor, ours and our PyTorch-hooks buffer alternate in one process
        runs = [
            (floor(args.n_ctxs, texts), ours(args.n_ctxs, texts), ours_pytorch(args.n_ctxs, texts))
            for _ in range(args.repeats)
        ]
        return {
            "floor": max(r[0] for r in runs),
            "tokens_per_s": max(r[1] for r in runs),
            "pytorch_tokens_per_s": max(r[2] for r in runs),
        }
    return {"tokens_per_s": max(reference(args.n_ctxs, texts, args.model_dir) for _ in range(args.repeats))}


def run_child(python: str, impl: str, n_ctxs: int, texts: str, repeats: int, documents: int = 0) -> dict:
    from dictionary_learning.models import default_cache_dir

    env = dict(os.environ)
    if repeats == 0:
        env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    command = [
        python,
        __file__,
        "--impl",
        impl,
        "--n-ctxs",
        str(n_ctxs),
        "--model-dir",
        str(default_cache_dir()),
        "--texts",
        texts,
        "--repeats",
        str(repeats),
        "--documents",
        str(documents),
    ]
    # run away from the repository, whose dictionary_learning must not shadow the reference's
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ctxs", type=int, default=512, help="buffer size (contexts) for the speed runs")
    parser.add_argument("--memory-ctxs", type=int, nargs=2, default=[64, 1024], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=2, help="speed runs per implementation (best is kept)")
    parser.add_argument("--reference-python", help="python of a venv with dictionary-learning==0.1.0")
    parser.add_argument("--impl", default="main", choices=["main", "ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--documents", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl != "main":
        print(json.dumps(child(args)))
        return

    from dictionary_learning.models import default_texts, load_default_model

    load_default_model()  # build the safetensors cache once, outside the timings
    n1, n2 = args.memory_ctxs
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(list(default_texts()), fh)  # all 2,127 articles: the reference discards more of each refill
    impls = {"ours": sys.executable}
    if args.reference_python:
        impls["reference"] = str(Path(args.reference_python).absolute())

    print(f"SmolLM2-135M layer {LAYER} MLP, ctx {CTX_LEN}, LM batch {LM_BATCH}, {torch.get_num_threads()} threads")
    print(f"speed, first fill of {args.n_ctxs * CTX_LEN} tokens, best of {args.repeats}:")
    speed = {name: run_child(python, name, args.n_ctxs, fh.name, args.repeats) for name, python in impls.items()}
    floor_tps = speed["ours"]["floor"]
    print(f"  floor (raw hooks, early stop)  {floor_tps:7.0f} tok/s   (same process as ours)")
    for name in impls:
        tps = speed[name]["tokens_per_s"]
        print(f"  {name:30s} {tps:7.0f} tok/s   {tps / floor_tps:.2f} of floor")
    pytorch_tps = speed["ours"]["pytorch_tokens_per_s"]
    name = "ours, pytorch_buffer"
    print(f"  {name:30s} {pytorch_tps:7.0f} tok/s   {pytorch_tps / floor_tps:.2f} of floor   (no nnsight)")
    if "reference" in speed:
        print(f"  ours / reference = {speed['ours']['tokens_per_s'] / speed['reference']['tokens_per_s']:.2f}")

    documents = n2 + LM_BATCH
    tensor_mb = (n2 - n1) * CTX_LEN * WIDTH * 4 / 2**20
    print(f"memory, peak RSS growth from a {n1}- to a {n2}-context buffer ({tensor_mb:.0f} MB more activations),")
    print(f"both reading {documents} documents:")
    for name, python in impls.items():
        peaks = [run_child(python, name, n, fh.name, 0, documents)["peak_mb"] for n in (n1, n2)]
        grown = peaks[1] - peaks[0]
        print(f"  {name:30s} {grown:7.0f} MB   {grown / tensor_mb:.2f}x the tensor growth")


if __name__ == "__main__":
    main()
