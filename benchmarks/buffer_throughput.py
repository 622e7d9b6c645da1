"""Activation extraction speed and memory on SmolLM2-135M (layer 3 MLP output, ctx 128, BBC News text).

    python benchmarks/buffer_throughput.py --reference-python /path/to/venv_dl/bin/python

Speed: tokens per second in steady state: after the first fill, batches are served until the
buffer has refilled `--fills` times half its `n_ctxs` contexts; the window is charged the rows read
from the model in it (rows served plus the change in the unread stock: a buffer serves its stock
down to half before it reads again, so rows served alone overstate its speed up to twofold):
  * floor: the model's forward pass with a plain PyTorch forward hook that stops it after layer 3,
    and a copy of the rows, on contexts tokenized and packed before the clock starts (so the floor
    leaves out tokenizing, which every buffer must do);
  * ours: dictionary_learning.buffer.ActivationBuffer (nnsight 0.8), in the same process as the floor;
  * ours, pytorch_buffer: the same buffer on the plain Hugging Face model with PyTorch hooks (no nnsight);
  * reference: dictionary-learning 0.1.0's ActivationBuffer (nnsight 0.3) in its own venv.
The three in our process run in turn, `--repeats` rounds; the ratio to the floor is the median of
the rounds' ratios (a round's three measurements share the machine's drift).
Memory: the resident set of a process whose buffer holds N2 contexts minus that of one with N1
contexts, read once both have read the same documents (the smaller buffer keeps serving and
refilling), against the growth of the activation tensor. The model's memory is the same in both and
cancels out (the processes' peaks would not: loading the model peaks above what it keeps); the
probes run with a fixed glibc mmap threshold so that RSS tracks live memory rather than freed
blocks the allocator keeps.
"""

from __future__ import annotations

import argparse
import json
import os
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


def rss_mb() -> float:
    """This process's resident set now (Linux), in MB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


KEPT: list = []  # the memory probes' buffers, alive until their RSS has been read


def fill_and_read(buffer, source: Counting, documents: int) -> float:
    """Seconds of the first fill (the first batch); then serve until `documents` have been read."""
    start = time.perf_counter()
    next(buffer)
    seconds = time.perf_counter() - start
    while source.taken < documents:
        next(buffer)
    KEPT.append(buffer)
    return seconds


def clock() -> float:
    """Wall-clock seconds (this process's CPU time would count the threads that spin while they
    wait, which differ between tokenizer and model work)."""
    return time.perf_counter()


def stock(buffer) -> int:
    """Rows read from the model and not yet served: our buffer's unread rows plus the rows of its
    last model batch that did not fit (kept for the next refill); the reference and our
    PyTorch-hooks buffer keep a `read` mask over what they store."""
    if hasattr(buffer, "read") and isinstance(buffer.read, torch.Tensor):
        return int((~buffer.read).sum())
    pending = getattr(buffer, "_pending", None)
    return int(buffer.unread) + (int(pending[0].shape[0]) if pending else 0)


def steady(buffer, capacity: int, fills: int) -> float:
    """Tokens per second read from the model and stored, after the first fill, over at least `fills`
    refills of half the buffer. Counting what the buffer serves would overstate it: a buffer serves
    its stock down to half before it reads again, so the window is charged `served + stock change`."""
    next(buffer)
    served, before, start = 0, stock(buffer), clock()
    while served < fills * capacity // 2:
        served += next(buffer).shape[0]
    seconds, after = clock() - start, stock(buffer)
    return (served + after - before) / seconds


def floor(n_tokens: int, texts: list[str]) -> float:
    """Tokens/s of the model's forward pass to layer 3 with a plain hook that stops it there, and a
    copy of the rows: nothing else. The contexts are tokenized and packed before the clock starts,
    so the floor leaves out work every buffer must do (tokenizing), and the ratio is conservative."""
    from dictionary_learning.data import pack_documents
    from dictionary_learning.models import load_default_model

    model = load_default_model()
    hf, tok = model._module, model.tokenizer
    contexts = iter(pack_documents(iter(texts), tok, CTX_LEN))
    batches = []
    while len(batches) * LM_BATCH * CTX_LEN < n_tokens:
        batches.append(torch.tensor([next(contexts) for _ in range(LM_BATCH)]))

    class Stop(Exception):
        pass

    captured = {}

    def hook(module, args, output):
        captured["x"] = output
        raise Stop

    handle = hf.model.layers[LAYER].mlp.register_forward_hook(hook)
    kept = []
    start = clock()
    with torch.no_grad():
        for ids in batches:
            try:
                hf(input_ids=ids, attention_mask=torch.ones_like(ids))
            except Stop:
                pass
            kept.append(captured["x"].reshape(-1, WIDTH).clone())
            kept = kept[-8:]
    seconds = clock() - start
    handle.remove()
    return sum(b.numel() for b in batches) / seconds


def ours(n_ctxs: int, texts: list[str], documents: int = 0, fills: int = 0) -> float:
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
    if fills:
        return steady(buffer, n_ctxs * CTX_LEN, fills)
    return n_ctxs * CTX_LEN / fill_and_read(buffer, source, documents)


def ours_pytorch(n_ctxs: int, texts: list[str], fills: int) -> float:
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
    return steady(buffer, n_ctxs * CTX_LEN, fills)


def reference(n_ctxs: int, texts: list[str], model_dir: str, documents: int = 0, fills: int = 0) -> float:
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
    if fills:
        return steady(buffer, n_ctxs * CTX_LEN, fills)
    return n_ctxs * CTX_LEN / fill_and_read(buffer, source, documents)


def child(args) -> dict:
    """One measurement in this process: speed runs (repeats > 0) or a memory probe (repeats == 0)."""
    texts = corpus(args.texts)
    if args.repeats == 0:
        if args.impl == "ours":
            ours(args.n_ctxs, texts, args.documents)
        else:
            reference(args.n_ctxs, texts, args.model_dir, args.documents)
        return {"rss_mb": rss_mb()}
    if args.impl == "ours":  # the floor, ours and our PyTorch-hooks buffer take turns in one process
        tokens = args.fills * args.n_ctxs * CTX_LEN // 2
        floor(4 * LM_BATCH * CTX_LEN, texts)  # warm-up, discarded: a process's first forward passes are slower
        rounds = [
            (
                floor(tokens, texts),
                ours(args.n_ctxs, texts, fills=args.fills),
                ours_pytorch(args.n_ctxs, texts, args.fills),
            )
            for _ in range(args.repeats)
        ]
        return {"rounds": rounds}
    return {
        "tokens_per_s": max(
            reference(args.n_ctxs, texts, args.model_dir, fills=args.fills) for _ in range(args.repeats)
        )
    }


def run_child(
    python: str, impl: str, n_ctxs: int, texts: str, repeats: int, documents: int = 0, fills: int = 0
) -> dict:
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
        "--fills",
        str(fills),
    ]
    # run away from the repository, whose dictionary_learning must not shadow the reference's
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ctxs", type=int, default=256, help="buffer size (contexts) for the speed runs")
    parser.add_argument("--fills", type=int, default=4, help="refills of half the buffer timed in steady state")
    parser.add_argument("--memory-ctxs", type=int, nargs=2, default=[64, 1024], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the speed runs")
    parser.add_argument("--reference-python", help="python of a venv with dictionary-learning==0.1.0")
    parser.add_argument("--speed-only", action="store_true", help="skip the memory probes")
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
    tokens = args.fills * args.n_ctxs * CTX_LEN // 2
    print(f"speed in steady state: {tokens} tokens served after the first fill of {args.n_ctxs} contexts")
    speed = {name: run_child(python, name, args.n_ctxs, fh.name, args.repeats, fills=args.fills)
             for name, python in impls.items()}  # fmt: skip
    rounds = speed["ours"]["rounds"]
    for i, (fl, o, p) in enumerate(rounds):
        print(f"  round {i}: floor {fl:6.0f}  ours {o:6.0f} ({o / fl:.3f})  pytorch_buffer {p:6.0f} ({p / fl:.3f})")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    floor_tps = median([r[0] for r in rounds])
    print(f"  floor (forward to layer {LAYER} with a hook, copy; pre-tokenized)  {floor_tps:6.0f} tok/s (median)")
    print(f"  ours                     {median([r[1] for r in rounds]):6.0f} tok/s  "
          f"{median([r[1] / r[0] for r in rounds]):.3f} of floor (median of the rounds' ratios)")  # fmt: skip
    print(f"  ours, pytorch_buffer     {median([r[2] for r in rounds]):6.0f} tok/s  "
          f"{median([r[2] / r[0] for r in rounds]):.3f} of floor   (no nnsight)")  # fmt: skip
    if "reference" in speed:
        ref = speed["reference"]["tokens_per_s"]
        print(f"  reference                {ref:6.0f} tok/s  {ref / floor_tps:.3f} of the median floor (own venv)")

    if args.speed_only:
        return
    documents = n2 + LM_BATCH
    tensor_mb = (n2 - n1) * CTX_LEN * WIDTH * 4 / 2**20
    print(f"memory, RSS growth from a {n1}- to a {n2}-context buffer ({tensor_mb:.0f} MB more activations),")
    print(f"both reading {documents} documents:")
    for name, python in impls.items():
        peaks = [run_child(python, name, n, fh.name, 0, documents)["rss_mb"] for n in (n1, n2)]
        grown = peaks[1] - peaks[0]
        print(f"  {name:30s} {grown:7.0f} MB   {grown / tensor_mb:.2f}x the tensor growth")


if __name__ == "__main__":
    main()
