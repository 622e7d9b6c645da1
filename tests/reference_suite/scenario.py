"""The scenario of the reference's tests/test_end_to_end.py and tests/test_pytorch_end_to_end.py
(saprmarks/dictionary_learning at 60ec6bf), written anew with the same calls and keywords: an
activation buffer on a model's layer-3 residual stream, a TopK and a Standard SAE trained together by
`trainSAE`, the two folders found by `get_nested_folders`, loaded by `load_dictionary` and scored by
`evaluate` on a fresh buffer built from `config["buffer"]["ctx_len"]`.

It uses only the reference's public API, so the same file runs against the reference package too:
    python scenario.py MODEL_DIR TEXTS_JSON SAVE_DIR [nnsight|pytorch]
prints {dict_class: metrics} as JSON (run it from outside our checkout to get the reference).

Adaptations forced by this machine (offline, 2 CPU cores), and only these:
- the model is SmolLM2-135M-Instruct from a local folder (the offline default, layer 3 of 30),
  not EleutherAI/pythia-70m-deduped; the submodule path is `model.model.layers[3]` for it;
- with the reference's nnsight 0.3, `patch_llama_scan=False` (else it rewrites SmolLM2's rope type
  to "llama3" and transformers fails on the missing `factor`);
- the texts are the offline BBC News articles (a JSON list) instead of monology/pile-uncopyrighted;
- device "cpu" instead of "cuda:0";
- sizes scaled down: 64k training tokens instead of 10M (steps 62), batches of 1024 instead of
  8192, LM batches of 32 instead of 512/100, 2 evaluation batches of 16 texts instead of 10 of 100;
  warm-up steps 1000 -> 10 and the TopK trainer's decay_start 24000 -> None (the reference's value
  lies past the end of its own run, where our schedule refuses it);
- a dictionary expansion factor of 4 instead of 8 (the same 2304 latents as an 8x Pythia SAE would
  be too slow here: 576 x 4 = 2304).
The expected values of the reference's tests are Pythia's on its GPU; they are replaced by checks
that hold for any working implementation, and, where the reference can run here (its nnsight
buffer), by the side-by-side table in README.md.
"""

from __future__ import annotations

import json
import random
import sys

import torch as t

from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
from dictionary_learning.training import trainSAE
from dictionary_learning.utils import get_nested_folders, load_dictionary

DEVICE = "cpu"
RANDOM_SEED = 42
LAYER = 3
METRICS = [
    "l2_loss",
    "l1_loss",
    "l0",
    "frac_variance_explained",
    "cossim",
    "l2_ratio",
    "relative_reconstruction_bias",
    "frac_alive",
]
CE_METRICS = ["loss_original", "loss_reconstructed", "loss_zero", "frac_recovered"]


def load_model(model_dir: str, buffer_kind: str):
    if buffer_kind == "nnsight":
        import nnsight
        from nnsight import LanguageModel

        # nnsight 0.3 (the reference's) rewrites a Llama config's rope type to "llama3" unless told not to.
        old_nnsight = nnsight.__version__.startswith("0.3")
        kwargs = {"patch_llama_scan": False} if old_nnsight else {}
        return LanguageModel(model_dir, dispatch=True, device_map=DEVICE, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=t.float32).to(DEVICE)


def make_buffer(buffer_kind, data, model, submodule, **kwargs):
    if buffer_kind == "nnsight":
        from dictionary_learning.buffer import ActivationBuffer
    else:
        from dictionary_learning.pytorch_buffer import ActivationBuffer
    return ActivationBuffer(data, model, submodule, **kwargs)


def train(model_dir: str, texts: list[str], save_dir: str, buffer_kind: str = "nnsight") -> list[str]:
    random.seed(RANDOM_SEED)
    t.manual_seed(RANDOM_SEED)
    model = load_model(model_dir, buffer_kind)
    context_length, llm_batch_size, sae_batch_size = 128, 32, 1024
    num_inputs_in_buffer = sae_batch_size // context_length * 20
    steps = 64_000 // sae_batch_size
    k, sparsity_penalty, expansion_factor = 40, 0.05, 4
    submodule = model.model.layers[LAYER]
    submodule_name = f"resid_post_layer_{LAYER}"
    activation_dim = model.config.hidden_size
    activation_buffer = make_buffer(
        buffer_kind,
        iter(texts),
        model,
        submodule,
        n_ctxs=num_inputs_in_buffer,
        ctx_len=context_length,
        refresh_batch_size=llm_batch_size,
        out_batch_size=sae_batch_size,
        io="out",
        d_submodule=activation_dim,
        device=DEVICE,
    )
    common = {
        "activation_dim": activation_dim,
        "dict_size": expansion_factor * activation_dim,
        "steps": steps,
        "seed": RANDOM_SEED,
        "device": DEVICE,
        "layer": LAYER,
        "lm_name": model_dir,
        "submodule_name": submodule_name,
    }
    trainer_configs = [
        {
            "trainer": TopKTrainer,
            "dict_class": AutoEncoderTopK,
            "k": k,
            "auxk_alpha": 1 / 32,
            "warmup_steps": 10,
            "decay_start": None,
            "wandb_name": f"TopKTrainer-{submodule_name}",
            **common,
        },
        {
            "trainer": StandardTrainer,
            "dict_class": AutoEncoder,
            "lr": 3e-4,
            "l1_penalty": sparsity_penalty,
            "warmup_steps": 10,
            "sparsity_warmup_steps": 10,
            "resample_steps": None,
            "wandb_name": f"StandardTrainer-{submodule_name}",
            **common,
        },
    ]
    output_dir = f"{save_dir}/{submodule_name}"
    trainSAE(
        data=activation_buffer,
        trainer_configs=trainer_configs,
        steps=steps,
        save_steps=None,
        save_dir=output_dir,
    )
    return get_nested_folders(output_dir)


def evaluate_all(model_dir: str, texts: list[str], save_dir: str, buffer_kind: str = "nnsight") -> dict:
    random.seed(RANDOM_SEED)
    t.manual_seed(RANDOM_SEED)
    model = load_model(model_dir, buffer_kind)
    llm_batch_size, sae_batch_size, n_batches, buffer_size = 16, 1024, 2, 64
    submodule = model.model.layers[LAYER]
    input_strings = texts[-(buffer_size * n_batches) :]  # the end of the list: not trained on
    results = {}
    for ae_path in sorted(get_nested_folders(save_dir)):
        dictionary, config = load_dictionary(ae_path, DEVICE)
        dictionary = dictionary.to(dtype=model.dtype)
        activation_buffer = make_buffer(
            buffer_kind,
            iter(input_strings),
            model,
            submodule,
            n_ctxs=buffer_size,
            ctx_len=config["buffer"]["ctx_len"],
            refresh_batch_size=llm_batch_size,
            out_batch_size=sae_batch_size,
            io="out",
            d_submodule=config["trainer"]["activation_dim"],
            device=DEVICE,
        )
        eval_results = evaluate(
            dictionary,
            activation_buffer,
            config["buffer"]["ctx_len"],
            llm_batch_size,
            io="out",
            device=DEVICE,
            n_batches=n_batches,
        )
        results[config["trainer"]["dict_class"]] = {k: float(v) for k, v in eval_results.items()}
    return results


if __name__ == "__main__":
    model_dir, texts_json, save_dir = sys.argv[1:4]
    kind = sys.argv[4] if len(sys.argv) > 4 else "nnsight"
    texts = json.loads(open(texts_json).read())
    folders = train(model_dir, texts, save_dir, kind)
    assert len(folders) == 2, folders
    print(json.dumps(evaluate_all(model_dir, texts, save_dir, kind)))
