"""End to end on SmolLM2-135M: text in, trained dictionary out (buffer + training), ours against the
reference and SAELens, each in its own process on the same documents.

    python benchmarks/end_to_end.py --reference-python /path/to/venv_dl/bin/python \\
        --saelens-python /path/to/venv_sl/bin/python

Every implementation streams layer-3 MLP outputs of SmolLM2-135M-Instruct (contexts of 128 tokens,
32 documents per model call, a buffer of `--n-ctxs` contexts) from the BBC News articles that ship
with the package, and trains one dictionary (`--trainer`: TopK k=32 by default, or Standard) of
4608 features for `--steps` steps of 4096 tokens:

  * ours: `dictionary_learning.ActivationBuffer` + `trainSAE`;
  * reference: dictionary-learning 0.1.0's `ActivationBuffer` + `trainSAE` (nnsight 0.3, its venv);
  * SAELens: `LanguageModelSAETrainingRunner` over the same Hugging Face model (its `HookedProxyLM`)
    and the same articles as an in-memory dataset (its own token packing, no wandb, no checkpoints).

The clock covers building the buffer and the whole training run, not loading the model. Printed:
seconds, trained tokens/s, and the ratios to ours (> 1: ours is faster).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import _config, _trainer_classes  # noqa: E402  (benchmarks/ is not a package)

LAYER, CTX_LEN, LM_BATCH, WIDTH, BATCH = 3, 128, 32, 576, 4096
HOOK = f"model.layers.{LAYER}.mlp"


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(model_dir)


def run_ours(a: argparse.Namespace, texts: list[str]) -> float:
    from dictionary_learning import trainSAE
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.models import get_submodule, load_default_model

    model = load_default_model()
    cfg = _config(_trainer_classes("ours"), a.trainer, _sizes(a), steps=a.steps)
    start = time.perf_counter()
    buffer = ActivationBuffer(
        iter(texts),
        model,
        get_submodule(model, LAYER, "mlp"),
        n_ctxs=a.n_ctxs,
        ctx_len=CTX_LEN,
        refresh_batch_size=LM_BATCH,
        out_batch_size=BATCH,
    )
    trainSAE(buffer, [cfg], steps=a.steps, device="cpu", progress=False)
    return time.perf_counter() - start


def run_reference(a: argparse.Namespace, texts: list[str]) -> float:
    """Inside the reference's venv, where `dictionary_learning` is the reference package."""
    from nnsight import LanguageModel

    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.training import trainSAE

    hf, tokenizer = _hf_model(a.model_dir)
    model = LanguageModel(hf, tokenizer=tokenizer)
    cfg = _config(_trainer_classes("reference"), a.trainer, _sizes(a), steps=a.steps)
    start = time.perf_counter()
    buffer = ActivationBuffer(
        iter(texts),
        model,
        model.model.layers[LAYER].mlp,
        d_submodule=WIDTH,
        io="out",
        n_ctxs=a.n_ctxs,
        ctx_len=CTX_LEN,
        refresh_batch_size=LM_BATCH,
        out_batch_size=BATCH,
        device="cpu",
    )
    trainSAE(buffer, [cfg], steps=a.steps, device="cpu")
    return time.perf_counter() - start


def run_saelens(a: argparse.Namespace, texts: list[str]) -> float:
    import datasets
    import sae_lens
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.load_model import HookedProxyLM

    hf, tokenizer = _hf_model(a.model_dir)
    model = HookedProxyLM(hf, tokenizer, hook_names=[HOOK])
    kind = {"TopKTrainer": "TopK", "StandardTrainer": "Standard"}[a.trainer]
    sae_kwargs = dict(d_in=WIDTH, d_sae=a.dict_size) | ({"k": a.k} if kind == "TopK" else {})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LanguageModelSAERunnerConfig(
            sae=getattr(sae_lens, f"{kind}TrainingSAEConfig")(**sae_kwargs),
            model_name=a.model_dir,
            model_class_name="AutoModelForCausalLM",
            hook_name=HOOK,
            is_dataset_tokenized=False,
            streaming=False,
            context_size=CTX_LEN,
            n_batches_in_buffer=a.n_ctxs,  # SAELens 6 sizes its buffer as this times context_size tokens
            store_batch_size_prompts=LM_BATCH,
            training_tokens=a.steps * BATCH,
            train_batch_size_tokens=BATCH,
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
            checkpoint_path=tmp,
            output_path=None,
            n_checkpoints=0,
            save_final_checkpoint=False,
            verbose=False,
            n_batches_for_norm_estimate=1,
        )
        start = time.perf_counter()
        dataset = datasets.Dataset.from_dict({"text": texts})
        LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
        return time.perf_counter() - start


def _sizes(a: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(dim=WIDTH, dict_size=a.dict_size, k=a.k, device="cpu")


def child(a: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    with open(a.texts) as fh:
        texts = json.load(fh)
    run = {"ours": run_ours, "reference": run_reference, "saelens": run_saelens}[a.impl]
    return {"seconds": run(a, texts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", help="python of a venv with dictionary-learning==0.1.0")
    p.add_argument("--saelens-python", help="python of a venv with sae-lens")
    p.add_argument("--trainer", default="TopKTrainer", choices=["TopKTrainer", "StandardTrainer"])
    p.add_argument("--steps", type=int, default=30, help="training steps of 4096 tokens")
    p.add_argument("--n-ctxs", type=int, default=256, help="buffer size in contexts of 128 tokens")
    p.add_argument("--dict-size", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--impl", default="main", help=argparse.SUPPRESS)
    p.add_argument("--texts", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.impl != "main":
        print(json.dumps(child(a)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dictionary_learning.models import default_cache_dir, default_texts, load_default_model

    load_default_model()  # writes the safetensors copy the other implementations load
    pythons = {"ours": sys.executable}
    if a.reference_python:
        pythons["reference"] = str(Path(a.reference_python).absolute())
    if a.saelens_python:
        pythons["saelens"] = str(Path(a.saelens_python).absolute())
    tokens = a.steps * BATCH
    print(
        f"SmolLM2-135M layer {LAYER} MLP -> {a.trainer} (F={a.dict_size}"
        + (f", k={a.k}" if a.trainer == "TopKTrainer" else "")
        + f"), {a.steps} steps x {BATCH} tokens, buffer {a.n_ctxs} x {CTX_LEN}; {os.cpu_count()} cpus"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(list(default_texts()), fh)
    results = {}
    for impl, python in pythons.items():
        cmd = [python, str(Path(__file__).resolve()), "--impl", impl, "--texts", fh.name]
        cmd += ["--model-dir", str(default_cache_dir()), "--trainer", a.trainer, "--steps", str(a.steps)]
        cmd += ["--n-ctxs", str(a.n_ctxs), "--dict-size", str(a.dict_size), "--k", str(a.k)]
        # away from the repository, whose dictionary_learning must not shadow the reference package
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
        if out.returncode != 0:
            print(f"  {impl} failed: {out.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
            continue
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        ratio = f"  x{results[impl] / results['ours']:.2f}" if "ours" in results and impl != "ours" else ""
        print(f"  {impl:10s} {results[impl]:7.1f} s  {tokens / results[impl]:7.0f} tok/s{ratio}", flush=True)
    os.unlink(fh.name)


if __name__ == "__main__":
    main()
