"""Command line: `python -m dictionary_learning {train,cache,eval,download} --help`."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .trainers import TRAINER_REGISTRY

DEFAULT_MODEL = "SmolLM2-135M (offline)"


# ------------------------------------------------------------------------------------- shared bits
def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, site_required: bool = True) -> None:
    group = parser.add_argument_group("model and site")
    group.add_argument("--model", help=f"Hugging Face id or local folder (default: {DEFAULT_MODEL})")
    group.add_argument("--layer", type=int, required=site_required, help="transformer layer")
    group.add_argument(
        "--site",
        default="resid",
        choices=["resid", "mlp", "attn", "embed"],
        help="which output of the layer (default: resid, the block's output)",
    )
    group.add_argument("--device", default="cpu", help="torch device for the model and training (default: cpu)")


def _add_text_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text")
    group.add_argument(
        "--texts", help="a .txt file or folder, or a .jsonl / .jsonl.zst file (default: the bundled BBC News articles)"
    )
    group.add_argument("--dataset", help="a Hugging Face dataset with a 'text' column, streamed")
    group.add_argument("--ctx-len", type=positive_int, default=128, help="tokens per context (default: 128)")


def _load_model(args):
    from .models import load_default_model, load_model

    return load_model(args.model, device=args.device) if args.model else load_default_model(device=args.device)


def _texts(args):
    from .data import hf_dataset_to_generator, jsonl_to_generator, text_files_to_generator
    from .models import default_texts

    if args.dataset:
        return hf_dataset_to_generator(args.dataset)
    if args.texts:
        path = Path(args.texts)
        if not path.exists():
            raise SystemExit(f"error: --texts {path} does not exist")
        documents = jsonl_to_generator(path) if ".jsonl" in path.name else text_files_to_generator(path)
        texts = (text for text in documents if text.strip())
        first = next(texts, None)
        if first is None:
            raise SystemExit(f"error: --texts {path} holds no text: give a file or folder with at least one document")
        return itertools.chain([first], texts)
    return default_texts()


def _site(model, layer: int, site: str):
    from .models import get_submodule

    return get_submodule(model, layer, site)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _trainer_configs(args) -> list[dict]:
    """Configs from --config (JSON or YAML: one config, a list, or {"trainers": [...]}) or from
    --trainer plus --set key=value pairs; "trainer" names a registered trainer class."""
    if args.config:
        text = Path(args.config).read_text()
        if args.config.endswith((".yaml", ".yml")):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
        configs = loaded.get("trainers", [loaded]) if isinstance(loaded, dict) else loaded
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise SystemExit(
                f"error: --config {args.config} must hold a trainer config (an object with a 'trainer' key), a list "
                f"of them, or {{'trainers': [...]}}; got {json.dumps(loaded)[:80]}"
            )
    else:
        if not args.trainer:
            raise SystemExit("error: give --trainer NAME (with --set key=value options) or --config FILE")
        overrides = {}
        for item in args.set or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"error: --set expects key=value, got {item!r}")
            overrides[key] = _parse_value(value)
        configs = [dict(overrides, trainer=name) for name in args.trainer]
    for config in configs:
        name = config.get("trainer")
        if name not in TRAINER_REGISTRY:
            raise SystemExit(f"error: unknown trainer {name!r}; choose from {', '.join(TRAINER_REGISTRY)}")
        options = {k: v for k, v in config.items() if k != "trainer"}
        TRAINER_REGISTRY[name].check_config_keys(options)  # before the model is loaded
        TRAINER_REGISTRY[name].check_config_values(options)
    return configs


def _check_out(path: Path, overwrite: bool) -> None:
    """Fail before loading anything if --out holds another run (trainSAE removes it with --overwrite)."""
    from .run import previous_run_files

    if previous_run_files(path) and not overwrite:
        raise SystemExit(f"error: {path} already holds results; pass --overwrite to replace them, or --resume")


# ----------------------------------------------------------------------------------- subcommands
def cmd_cache(args) -> None:
    from .cache import ActivationCache

    texts = _texts(args)  # before the model: a bad --texts fails at once
    model = _load_model(args)
    cache = ActivationCache.build(
        args.out,
        model,
        _site(model, args.layer, args.site),
        texts,
        args.tokens,
        ctx_len=args.ctx_len,
        refresh_batch_size=args.lm_batch_size,
    )
    print(f"cached {cache.n_tokens} activations of width {cache.config['d_submodule']} in {args.out}")


def cmd_train(args) -> None:
    from .buffer import ActivationBuffer
    from .cache import ActivationCache
    from .training import trainSAE

    configs = _trainer_configs(args)
    out = Path(args.out)
    if not args.resume:
        _check_out(out, args.overwrite)
    e2e = None
    if args.e2e:
        from .e2e import E2EObjective, TokenBatches
        from .models import get_submodule

        if args.cache or args.layer is None:
            raise SystemExit("error: --e2e trains through the model: give --layer (and --site), not --cache")
        model = _load_model(args)
        downstream = [get_submodule(model, layer, "resid") for layer in args.downstream_layers or []]
        e2e = E2EObjective(
            model,
            _site(model, args.layer, args.site),
            kl_weight=args.kl_weight,
            local_weight=args.local_weight,
            downstream=downstream,
            downstream_weight=args.downstream_weight,
        )
        data = TokenBatches(_texts(args), model, batch_size=args.lm_batch_size, ctx_len=args.ctx_len)
        d_submodule, lm_name = e2e.activation_dim, args.model or "SmolLM2-135M-Instruct"
    elif args.cache:
        data = ActivationCache(args.cache, batch_size=args.batch_size, loop=True)
        d_submodule, lm_name = data.config["d_submodule"], data.config["model"]
    else:
        texts = _texts(args)
        model = _load_model(args)
        data = ActivationBuffer(
            texts,
            model,
            _site(model, args.layer, args.site),
            ctx_len=args.ctx_len,
            n_ctxs=args.n_ctxs,
            refresh_batch_size=args.lm_batch_size,
            out_batch_size=args.batch_size,
            device=args.device,
        )
        d_submodule, lm_name = data.d_submodule, args.model or "SmolLM2-135M-Instruct"
    for config in configs:
        config.setdefault("activation_dim", d_submodule)
        config.setdefault("dict_size", 4 * d_submodule)
        config.setdefault("lm_name", lm_name)
        config.setdefault("layer", args.layer)
        config.setdefault("device", args.device)
    trainSAE(
        data,
        configs,
        args.steps,
        save_dir=out,
        normalize_activations=args.normalize,
        save_steps=args.save_steps,
        backup_steps=args.backup_steps,
        log_steps=args.log_steps,
        resume_from=out if args.resume else None,
        e2e=e2e,
        parallel=args.parallel,
        overwrite=args.overwrite and not args.resume,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved {len(configs)} dictionaries under {out}/trainer_*")


_PUBLISHED_SITE = re.compile(r"(?P<kind>attn|mlp|resid)_out_layer(?P<layer>\d+)|(?P<embed>embed)")


def cmd_eval(args) -> None:
    from .buffer import ActivationReader
    from .checkpoint import load_dictionary
    from .evaluation import evaluate

    missing = [folder for folder in args.dictionaries if not Path(folder).exists() and "://" not in folder]
    if missing:
        raise SystemExit(f"error: {missing[0]} does not exist: give a checkpoint folder (with ae.pt and config.json)")
    dictionaries = []  # every dictionary is loaded (and checked) before the model
    for folder in args.dictionaries:
        layer, site = args.layer, args.site
        match = _PUBLISHED_SITE.search(str(folder))
        if layer is None and match:  # the published Pythia folders name their site
            layer, site = (0, "embed") if match["embed"] else (int(match["layer"]), match["kind"])
        if layer is None:
            raise SystemExit(f"error: give --layer (and --site) for {folder}")
        dictionaries.append((folder, layer, site, load_dictionary(folder, device=args.device)[0]))
    model = _load_model(args)
    rows = []
    for folder, layer, site, ae in dictionaries:
        reader = ActivationReader(
            _texts(args), model, _site(model, layer, site), ctx_len=args.ctx_len, refresh_batch_size=args.batch_texts
        )
        metrics = evaluate(
            ae, reader, max_len=args.ctx_len, batch_size=args.batch_texts, n_batches=args.n_batches, device=args.device
        )
        rows.append((folder, metrics))
        if args.json:
            print(json.dumps({"dictionary": str(folder), **metrics}))
    if not args.json:
        print(
            f"{'dictionary':50s} {'Var. expl. %':>12s} {'L1':>8s} {'L0':>8s} {'% alive':>8s} {'CE diff':>8s} "
            f"{'% CE rec.':>9s}"
        )
        for folder, m in rows:
            print(
                f"{str(folder)[-50:]:50s} {100 * m['frac_variance_explained']:12.1f} {m['l1_loss']:8.1f} "
                f"{m['l0']:8.1f} {100 * m['frac_alive']:8.1f} {m['loss_reconstructed'] - m['loss_original']:8.3f} "
                f"{100 * m['frac_recovered']:9.1f}"
            )


def cmd_download(args) -> None:
    script = Path(__file__).parent / "scripts" / "download_pythia_dictionaries.sh"
    raise SystemExit(subprocess.call(["bash", str(script), args.dest]))


# ------------------------------------------------------------------------------------------ parser
def _add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="run the model once and write its activations to a cache folder",
        description="Write activations of a model's layer to disk (safetensors shards + manifest).",
    )
    _add_model_args(p)
    _add_text_args(p)
    p.add_argument("--tokens", type=positive_int, required=True, help="how many token activations to cache")
    p.add_argument("--lm-batch-size", type=positive_int, default=32, help="texts per model forward pass (default: 32)")
    p.add_argument("--out", required=True, help="cache folder (an interrupted build resumes there)")
    p.set_defaults(func=cmd_cache)


def trainer_options_help() -> str:
    """Each trainer's --set options with their defaults and docs, read from its Config."""
    lines = ["trainer options (--set KEY=VALUE; steps, activation_dim and dict_size come from the run):"]
    for name, cls in TRAINER_REGISTRY.items():
        lines.append(f"  {name}:")
        docs = cls.Config.docs()
        for field in cls.Config.signature().parameters.values():
            if field.name in ("steps", "activation_dim", "dict_size"):
                continue
            default = (
                "required"
                if field.default is field.empty
                else f"default {getattr(field.default, '__name__', field.default)!r}"
            )
            lines.append(f"    {field.name} ({default}): {docs.get(field.name, '')}")
    return "\n".join(lines)


def _add_train_command(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one or many dictionaries on one activation stream",
        description="Train dictionaries; every trainer sees the same batches. Trainer settings come "
        "from --trainer/--set or a JSON/YAML --config; activation_dim, dict_size (4 x "
        "width), layer and lm_name default from the data.",
        epilog=trainer_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p, site_required=False)
    _add_text_args(p)
    p.add_argument(
        "--trainer",
        action="append",
        choices=list(TRAINER_REGISTRY),
        help="a trainer to run (repeat for several); its options via --set",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a trainer option, e.g. --set k=32 --set lr=3e-4 (values parsed as JSON when possible)",
    )
    p.add_argument("--config", help="JSON or YAML file: a trainer config, a list of them, or {'trainers': [...]}")
    p.add_argument("--cache", help="train from this activation cache instead of running the model")
    p.add_argument("--steps", type=positive_int, required=True, help="optimisation steps")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="activations per step (default: 4096)")
    p.add_argument(
        "--n-ctxs", type=positive_int, default=3000, help="contexts held by the activation buffer (default: 3000)"
    )
    p.add_argument("--lm-batch-size", type=positive_int, default=32, help="texts per model forward pass (default: 32)")
    p.add_argument("--normalize", action="store_true", help="normalise activations (folded into saved weights)")
    p.add_argument("--save-steps", type=int, nargs="*", help="steps at which to save checkpoints/ae_{step}.pt")
    p.add_argument("--backup-steps", type=positive_int, help="write a resumable state every this many steps")
    p.add_argument("--log-steps", type=positive_int, help="progress statistics every this many steps")
    p.add_argument("--out", required=True, help="output folder (trainer_0, trainer_1, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument(
        "--parallel",
        default="data",
        choices=["data", "trainers"],
        help="under torchrun: split each batch over processes (data) or spread the trainers over them (trainers)",
    )
    e2e = p.add_argument_group(
        "end-to-end training",
        "train with the dictionary spliced into the model (Braun et al. 2024): each step is one batch of "
        "--lm-batch-size texts; the loss is the trainer's sparsity mechanism plus the weighted terms below",
    )
    e2e.add_argument("--e2e", action="store_true", help="train end to end instead of on activations alone")
    e2e.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(clean || spliced) (default: 1)")
    e2e.add_argument(
        "--local-weight", type=float, default=0.0, help="weight of the reconstruction at the site (default: 0)"
    )
    e2e.add_argument(
        "--downstream-layers", type=int, nargs="*", help="layers whose residual outputs the spliced model should keep"
    )
    e2e.add_argument(
        "--downstream-weight", type=float, default=1.0, help="weight of each downstream MSE term (default: 1)"
    )
    p.set_defaults(func=cmd_train)


def _add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate dictionaries: variance explained, L0, loss recovered",
        description="Evaluate saved dictionaries on held-out text through the model. For the "
        "published Pythia folders (.../mlp_out_layer3/10_32768) the site is read from "
        "the path.",
    )
    p.add_argument("dictionaries", nargs="+", help="checkpoint folders")
    _add_model_args(p, site_required=False)
    _add_text_args(p)
    p.add_argument("--batch-texts", type=positive_int, default=32, help="texts per evaluation batch (default: 32)")
    p.add_argument("--n-batches", type=positive_int, default=2, help="evaluation batches (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object per dictionary")
    p.set_defaults(func=cmd_eval)


def _add_download_command(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download the published Pythia-70m-deduped dictionaries (~2.5 GB)",
        description="Download and unpack the 10_32768 set into DEST/dictionaries/pythia-70m-deduped/; "
        "rerun to resume an interrupted download.",
    )
    p.add_argument("dest", nargs="?", default=".", help="destination folder (default: .)")
    p.set_defaults(func=cmd_download)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dictionary_learning",
        description="Train, cache, evaluate and download sparse dictionaries (SAEs).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def with_debug(*args, **kwargs) -> argparse.ArgumentParser:
        p = add_parser(*args, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    sub.add_parser = with_debug  # --debug works before or after the subcommand
    _add_cache_command(sub)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_download_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. The library's errors print as one line (`--debug` shows the traceback)."""
    from .run import TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingInterrupted as e:
        if args.debug:
            raise
        print(f"stopped: {e} (on the command line: the same command with --resume)", file=sys.stderr)
        raise SystemExit(143 if "SIGTERM" in str(e) else 130) from None
    except (ValueError, TypeError, RuntimeError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        raise SystemExit(f"error: {e} (run with --debug for the traceback)") from None


if __name__ == "__main__":
    main(sys.argv[1:])
