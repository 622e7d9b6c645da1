"""What the demos share: their model / output-folder arguments and how a run starts."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dictionary_learning.models import load_default_model, load_model


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """--model, --out (default `out`), --device and --overwrite."""
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def start_run(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`(output folder, model)`: refuses a folder holding finished results unless --overwrite, which
    empties it; loads --model or the offline default."""
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        parser.error(f"{out} already holds results; pass --overwrite to replace them or choose another --out")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    model = load_model(args.model, device=args.device) if args.model else load_default_model(device=args.device)
    return out, model
