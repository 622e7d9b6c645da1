"""Train SAELens's own training SAEs on given batches; run with the SAELens side venv's python
(tools/setup_saelens_venv.sh). `python -m dictionary_learning synthetic --saelens-python ...`
calls it so that both libraries train on the same batches with the same width, k, lr and steps.

    python tools/saelens_synthetic.py BATCHES.pt SPECS.json OUT_DIR

BATCHES.pt: a `[steps, batch, d]` tensor. SPECS.json: a list of {"name", "architecture" (topk,
batchtopk, matryoshka_batchtopk, abstopk or matching_pursuit), "d_sae", "k", "lr", "seed", and for
Matryoshka "matryoshka_widths"}. Matching pursuit runs exactly k steps (max_iterations=k, no
residual threshold, no stop on a repeated support), as ours does. Each SAE is trained by SAELens's
`SAETrainer` (constant learning rate, its defaults otherwise) and saved in SAELens's inference
format to OUT_DIR/<name>, with the training's seconds per step in OUT_DIR/<name>/timing.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from sae_lens import (
    AbsTopKTrainingSAE,
    AbsTopKTrainingSAEConfig,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatchingPursuitTrainingSAE,
    MatchingPursuitTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

ARCHITECTURES = {
    "topk": (TopKTrainingSAEConfig, TopKTrainingSAE),
    "batchtopk": (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE),
    "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE),
    "abstopk": (AbsTopKTrainingSAEConfig, AbsTopKTrainingSAE),
    "matching_pursuit": (MatchingPursuitTrainingSAEConfig, MatchingPursuitTrainingSAE),
}


def train(batches: torch.Tensor, spec: dict, out: Path) -> None:
    torch.manual_seed(spec["seed"])
    config_cls, sae_cls = ARCHITECTURES[spec["architecture"]]
    options = {"matryoshka_widths": spec["matryoshka_widths"]} if "matryoshka_widths" in spec else {}
    if spec["architecture"] == "matching_pursuit":
        options |= {"max_iterations": spec["k"], "residual_threshold": 0.0, "stop_on_duplicate_support": False}
    else:
        options["k"] = spec["k"]
    sae = sae_cls(config_cls(d_in=batches.shape[-1], d_sae=spec["d_sae"], dtype="float32", device="cpu",
                             **options))  # fmt: skip
    steps, batch = batches.shape[0], batches.shape[1]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=spec["lr"],
        lr_end=spec["lr"],
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    start = time.perf_counter()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(batches), save_checkpoint_fn=lambda path: None).fit()
    seconds = (time.perf_counter() - start) / steps
    folder = out / spec["name"]
    sae.save_inference_model(folder)
    (folder / "timing.json").write_text(json.dumps({"seconds_per_step": seconds}))


def main() -> None:
    batches = torch.load(sys.argv[1], weights_only=True)
    out = Path(sys.argv[3])
    for spec in json.loads(Path(sys.argv[2]).read_text()):
        train(batches, spec, out)
        print(f"trained {spec['name']}", flush=True)


if __name__ == "__main__":
    main()
