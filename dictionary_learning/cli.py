"""Command line: `python -m dictionary_learning {train,cache,eval,features,download,synthetic} --help`."""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from .data import HELD_OUT_FRACTION
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


def layer_spec(text: str) -> list[int] | str:
    """One --layer item: a layer `3`, an inclusive range `0-29`, or `all` (every layer of the model)."""
    if text == "all":
        return text
    first, dash, last = text.partition("-")
    try:
        layers = [int(text)] if not dash else list(range(int(first), int(last) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer (3), a range (0-29) or 'all', got {text!r}") from None
    if not layers or layers[0] < 0:
        raise argparse.ArgumentTypeError(f"expected layers >= 0 in increasing order, got {text!r}")
    return layers


def _flatten_layers(args) -> None:
    """--layer items as one list of ints, or ["all"] (resolved once the model is loaded: `_resolve_layers`)."""
    items = getattr(args, "layer", None)
    if not items:
        return
    if "all" in items:
        if len(items) > 1:
            raise SystemExit("error: --layer all means every layer: give it alone")
        if args.func not in (cmd_train, cmd_cache):
            raise SystemExit("error: --layer all reads every layer for train and cache; here give the layer(s)")
        args.layer = ["all"]
        return
    args.layer = [layer for item in items for layer in item]


def _resolve_layers(layers: list, model) -> list[int]:
    from .models import num_layers

    return list(range(num_layers(model))) if layers == ["all"] else layers


def _add_model_args(parser: argparse.ArgumentParser, layer_help: str = "transformer layer(s)") -> None:
    group = parser.add_argument_group("model and site")
    group.add_argument("--model", help=f"Hugging Face id or local folder (default: {DEFAULT_MODEL})")
    group.add_argument("--layer", type=layer_spec, nargs="+", help=f"{layer_help}: 3, a range 0-29, or all")
    group.add_argument(
        "--site",
        default=None,
        choices=["resid", "mlp", "attn", "embed"],
        help="which output of the layer (default: resid, the block's output)",
    )
    group.add_argument("--device", default="cpu", help="torch device for the model and training (default: cpu)")


def _add_text_args(parser: argparse.ArgumentParser, part: str) -> None:
    group = parser.add_argument_group("text")
    group.add_argument(
        "--texts", help="a .txt file or folder, or a .jsonl / .jsonl.zst file (default: the bundled BBC News articles)"
    )
    group.add_argument("--dataset", help="a Hugging Face dataset with a 'text' column, streamed")
    group.add_argument(
        "--encoding", default="utf-8", help="encoding of the --texts files (default: utf-8; e.g. latin-1)"
    )
    group.add_argument(
        "--errors",
        default="strict",
        choices=["strict", "replace", "ignore"],
        help="bytes that are not valid in --encoding: stop naming the file (strict, the default), read them "
        "as U+FFFD (replace), or drop them (ignore)",
    )
    group.add_argument("--ctx-len", type=positive_int, default=128, help="tokens per context (default: 128)")
    group.add_argument(
        "--part",
        default=part,
        choices=["train", "held-out", "all"],
        help=f"which part of the text's deterministic train / held-out split to read (default: {part})",
    )
    group.add_argument(
        "--held-out-fraction",
        type=float,
        default=HELD_OUT_FRACTION,
        help=f"share of documents held out, by a hash of each text (default: {HELD_OUT_FRACTION})",
    )
    group.add_argument(
        "--no-pack",
        action="store_true",
        help="one context per document, cut at --ctx-len (the reference's way), instead of packing "
        "the documents into full contexts",
    )


def _add_mask_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("positions left out")
    group.add_argument("--remove-bos", action="store_true", help="leave out BOS positions (see ActivationBuffer)")
    group.add_argument(
        "--max-norm-multiple",
        type=float,
        help="leave out positions whose activation norm exceeds this multiple of the batch median "
        "(attention sinks; e.g. 10)",
    )


def _reading(args) -> dict:
    """How `cache` and `train` turn text into activations: context length, packing, masks."""
    return dict(
        ctx_len=args.ctx_len,
        pack=not args.no_pack,
        remove_bos=args.remove_bos,
        max_activation_norm_multiple=args.max_norm_multiple,
    )


def _load_model(args):
    from .models import load_default_model, load_model

    return load_model(args.model, device=args.device) if args.model else load_default_model(device=args.device)


def _load_named_model(name: str, device: str):
    """A model by the id config.json records (the offline default's id loads the bundled model)."""
    from .models import DEFAULT_MODEL_NAME, load_default_model, load_model

    return load_default_model(device=device) if name == DEFAULT_MODEL_NAME else load_model(name, device=device)


def _documents(args):
    """The text source as a `Documents`, restricted to --part; fails at once when it holds no text."""
    from .data import Documents, hf_dataset_to_generator, jsonl_to_generator, text_files_to_generator
    from .models import default_texts

    part = {"train": "train", "held-out": "held_out", "all": None}[args.part]
    fraction = args.held_out_fraction
    if not 0 < fraction < 1:
        raise SystemExit(f"error: --held-out-fraction must lie strictly between 0 and 1, got {fraction}")
    if args.dataset:
        name = args.dataset
        docs = Documents(f"hf:{name}", lambda: hf_dataset_to_generator(name), part, fraction, finite=False)
        what = f"dataset {name}"
    elif args.texts:
        path = Path(args.texts)
        if not path.exists():
            raise SystemExit(f"error: --texts {path} does not exist")
        codec = dict(encoding=args.encoding, errors=args.errors)
        if ".jsonl" in path.name:
            read = lambda: jsonl_to_generator(path, **codec)  # noqa: E731
        else:
            read = lambda: text_files_to_generator(path, **codec)  # noqa: E731
        docs = Documents(str(path.resolve()), lambda: (t for t in read() if t.strip()), part, fraction)
        what = f"--texts {path}"
    else:
        return default_texts(split=part, held_out_fraction=fraction)
    if next(iter(docs), None) is None:
        where = f" in its {args.part} part (--held-out-fraction {fraction})" if part else ""
        raise SystemExit(f"error: {what} holds no text{where}: give a source with at least one document")
    return docs


def _sites(model, layers: list[int], site: str):
    """One submodule (a single layer), or a dict {"<site>_layer<i>": submodule} for several."""
    from .models import get_submodule

    if len(layers) == 1:
        return get_submodule(model, layers[0], site)
    return {f"{site}_layer{layer}": get_submodule(model, layer, site) for layer in layers}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_trainer_spec(spec: str) -> tuple[str, dict[str, list]]:
    """ "TopKTrainer:k=32,64,lr=3e-4" -> ("TopKTrainer", {"k": [32, 64], "lr": [0.0003]}): each key
    takes the values up to the next key (JSON values; lists in brackets)."""
    name, _, rest = spec.partition(":")
    options: dict[str, list] = {}
    key = None
    for token in _split_top_level(rest) if rest else []:
        token = token.strip()
        if "=" in token and not token.startswith(("[", "{", '"')):
            key, _, value = token.partition("=")
            key = key.strip()
            if not key or key in options:
                raise SystemExit(
                    f"error: --trainer {spec!r}: {'a key is empty' if not key else f'{key} is given twice'}"
                )
            options[key] = [_parse_value(value)]
        elif key is None or not token:
            raise SystemExit(f"error: --trainer {spec!r}: expected NAME or NAME:key=value[,value...][,key=value...]")
        else:
            options[key].append(_parse_value(token))
    return name.strip(), options


def _trainer_configs(args) -> list[dict]:
    """Configs from --config (JSON or YAML: one config, a list, or {"trainers": [...]}) and from
    --trainer NAME[:key=v1,v2,...] (a config per combination of the listed values), both when both
    are given; --set key=value pairs apply to every trainer whose own entry does not set the key
    (a note names each --set value that an entry overrides). "trainer" names a registered class."""
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        overrides[key] = _parse_value(value)
    entries: list[tuple[str, dict]] = []
    if args.config:
        entries += [(f"--config {args.config}", config) for config in _read_config_file(args.config)]
    for spec in args.trainer or []:
        name, options = parse_trainer_spec(spec)
        for values in itertools.product(*options.values()):
            entries.append((f"--trainer {spec}", dict(zip(options, values), trainer=name)))
    if not entries:
        raise SystemExit("error: give --trainer NAME[:key=value,...] (repeatable) and/or --config FILE")
    configs, notes = [], []
    for source, entry in entries:
        notes += [
            f"note: {source} sets {key}={entry[key]!r}, which takes precedence over --set {key}={value!r}"
            for key, value in overrides.items()
            if key in entry and entry[key] != value
        ]
        configs.append(overrides | entry)
    for note in dict.fromkeys(notes):
        print(note, file=sys.stderr)
    for config in configs:
        name = config.get("trainer")
        if name not in TRAINER_REGISTRY:
            close = difflib.get_close_matches(str(name), list(TRAINER_REGISTRY), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SystemExit(f"error: unknown trainer {name!r}{hint}; choose from {', '.join(TRAINER_REGISTRY)}")
        options = {k: v for k, v in config.items() if k != "trainer"}
        TRAINER_REGISTRY[name].Config.check(name, options)  # before the model is loaded
    return configs


def _read_config_file(path: str) -> list[dict]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        loaded = yaml.safe_load(text)
    else:
        loaded = json.loads(text)
    configs = loaded.get("trainers", [loaded]) if isinstance(loaded, dict) else loaded
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
        raise SystemExit(
            f"error: --config {path} must hold a trainer config (an object with a 'trainer' key), a list "
            f"of them, or {{'trainers': [...]}}; got {json.dumps(loaded)[:80]}"
        )
    return configs


def _with_seeds(configs: list[dict], seeds: int | None) -> list[dict]:
    """Each config once per seed 0..seeds-1 (`--seeds`), all trained on the same stream."""
    if not seeds:
        return configs
    fixed = [c["trainer"] for c in configs if "seed" in c]
    if fixed:
        raise SystemExit(f"error: --seeds sets every trainer's seed, but {fixed[0]} sets seed itself: drop one of them")
    return [dict(config, seed=seed) for config in configs for seed in range(seeds)]


def _check_out(path: Path, overwrite: bool) -> None:
    """Fail before loading anything if --out holds another run (trainSAE removes it with --overwrite)."""
    from .run import previous_run_files

    if previous_run_files(path) and not overwrite:
        raise SystemExit(f"error: {path} already holds results; pass --overwrite to replace them, or --resume")


# ----------------------------------------------------------------------------------- subcommands
def _layers(args) -> list[int]:
    site = args.site or "resid"
    if site == "embed":
        return [0]
    if not args.layer:
        raise SystemExit(f"error: give --layer for the {site} site (several for several sites: --layer 2 3 4)")
    return args.layer


def cmd_cache(args) -> None:
    from .cache import ActivationCache

    layers = _layers(args)
    docs = _documents(args)  # before the model: a bad --texts fails at once
    model = _load_model(args)
    layers = _resolve_layers(layers, model)
    if args.stack_sites and len(layers) < 2:
        raise SystemExit("error: --stack-sites caches several sites for a crosscoder: give --layer with two or more")
    cache = ActivationCache.build(
        args.out,
        model,
        _sites(model, layers, args.site or "resid"),
        docs,
        args.tokens,
        io=args.io,
        refresh_batch_size=args.lm_batch_size,
        allow_fewer=args.allow_fewer,
        stack_sites=args.stack_sites,
        **_reading(args),
    )
    widths = sorted({site["d"] for site in cache.manifest["sites"]})
    print(
        f"cached {cache.n_tokens} activations of width {widths[0] if len(widths) == 1 else widths} at "
        f"{', '.join(cache.sites)} in {args.out} ({docs.record['part']} part of {docs.record['source']})"
    )


def _data_for_training(args):
    """(data, {site name: (width, layer)}, model id, e2e objective or None) for `train`."""
    from .buffer import ActivationBuffer
    from .cache import ActivationCache
    from .models import layer_of
    from .nnsight_io import model_id

    if args.e2e:
        from .e2e import E2EObjective, TokenBatches
        from .models import get_submodule

        if args.transcoder or args.crosscoder or args.clt:
            raise SystemExit("error: --e2e trains SAEs: drop --transcoder/--crosscoder/--clt")
        if args.cache or not args.layer or len(args.layer) != 1:
            raise SystemExit("error: --e2e trains through the model: give one --layer (and --site), not --cache")
        docs = _documents(args)
        model = _load_model(args)
        downstream = [get_submodule(model, layer, "resid") for layer in args.downstream_layers or []]
        e2e = E2EObjective(
            model,
            _sites(model, args.layer, args.site or "resid"),
            kl_weight=args.kl_weight,
            local_weight=args.local_weight,
            downstream=downstream,
            downstream_weight=args.downstream_weight,
        )
        data = TokenBatches(docs, model, batch_size=args.lm_batch_size, ctx_len=args.ctx_len, pack=not args.no_pack)
        return data, {None: (e2e.activation_dim, args.layer[0])}, model_id(model), e2e
    if sum(map(bool, (args.transcoder, args.crosscoder, args.clt))) > 1:
        raise SystemExit("error: --transcoder, --crosscoder and --clt train different dictionaries: choose one")
    if args.paired_model and not args.crosscoder:
        raise SystemExit("error: --paired-model reads two models for a crosscoder: add --crosscoder")
    if args.cache:
        stacked = args.crosscoder or args.clt
        data = ActivationCache(args.cache, batch_size=args.batch_size, loop=args.loop, stack_sites=stacked)
        config = data.config
        if stacked:
            layers = [layer_of(module or "") for module in config["modules"].values()]
            if args.clt:
                check_clt_layers(layers)
            return data, {None: (config["d_submodule"][0], layers)}, config["model"], None
        widths = config["d_submodule"] if len(data.sites) > 1 else [config["d_submodule"]]
        given = args.layer[0] if args.layer and len(args.layer) == 1 else None
        sites = {
            name: (width, layer_of(config["modules"].get(name) or "") if given is None else given)
            for name, width in zip(data.sites, widths)
        }
        return data, sites, config["model"], None
    layers = _layers(args)
    docs = _documents(args)
    model = _load_model(args)
    layers = _resolve_layers(layers, model)
    site = args.site or ("mlp" if args.transcoder or args.clt else "resid")
    reading = dict(
        n_ctxs=args.n_ctxs,
        refresh_batch_size=args.lm_batch_size,
        out_batch_size=args.batch_size,
        device=args.device,
        loop=args.loop,
        **_reading(args),
    )
    if args.crosscoder:
        return _crosscoder_data(args, docs, model, layers, site, reading)
    if args.clt:
        return _clt_data(docs, model, layers, site, reading)
    io = "in_and_out" if args.transcoder else "out"
    data = ActivationBuffer(docs, model, _sites(model, layers, site), io=io, **reading)
    widths = data.widths
    return data, {name: (w, layer) for name, w, layer in zip(data.names, widths, layers)}, model_id(model), None


def _crosscoder_data(args, docs, model, layers: list[int], site: str, reading: dict):
    """A crosscoder's buffer: the --layer sites of one model stacked, or one site of two models."""
    from .buffer import ActivationBuffer, PairedActivationBuffer
    from .models import get_submodule
    from .nnsight_io import model_id

    if args.paired_model:
        if len(layers) != 1:
            raise SystemExit("error: --paired-model reads one site of each model: give one --layer")
        other = _load_named_model(args.paired_model, args.device)
        data = PairedActivationBuffer(docs, model, other, get_submodule(model, layers[0], site), **reading)
        return data, {None: (data.widths[0], [layers[0], layers[0]])}, model_id(model), None
    if len(layers) < 2:
        raise SystemExit(
            "error: a crosscoder reads several sites: give --layer with two or more layers, or --paired-model"
        )
    sites = [get_submodule(model, layer, site) for layer in layers]
    data = ActivationBuffer(docs, model, sites, stack_sites=True, **reading)
    return data, {None: (data.widths[0], layers)}, model_id(model), None


def _clt_data(docs, model, layers: list[int], site: str, reading: dict):
    """A cross-layer transcoder's buffer: every --layer MLP's input and output, stacked `[B, L, 2, d]`."""
    from .buffer import ActivationBuffer
    from .models import get_submodule
    from .nnsight_io import model_id

    check_clt_layers(layers)
    if site != "mlp":
        raise SystemExit(f"error: a cross-layer transcoder reads and writes MLPs: drop --site {site}")
    sites = [get_submodule(model, layer, "mlp") for layer in layers]
    data = ActivationBuffer(docs, model, sites, io="in_and_out", stack_sites=True, **reading)
    return data, {None: (data.widths[0], layers)}, model_id(model), None


def check_clt_layers(layers: list[int]) -> None:
    """A CLT's layers are consecutive (a latent writes to every later layer's MLP)."""
    if len(layers) < 2 or layers != list(range(layers[0], layers[0] + len(layers))):
        raise SystemExit(
            f"error: a cross-layer transcoder reads consecutive layers (two or more), got --layer "
            f"{' '.join(map(str, layers))}: give a range such as 0-29, or all"
        )


def _per_site(configs: list[dict], sites: dict, lm_name: str, device: str) -> list[dict]:
    """Each config once per site (when several sites and the config names none), with the
    defaults that come from the data: width, dictionary size (4 x width), layer, model, device."""
    out = []
    for config in configs:
        targets = [config.get("submodule_name")] if config.get("submodule_name") in sites or len(sites) == 1 else sites
        for name in targets:
            key = name if name in sites else next(iter(sites))
            width, layer = sites[key]
            filled = dict(config)
            if len(sites) > 1:
                filled["submodule_name"] = key
            filled.setdefault("activation_dim", width)
            filled.setdefault("dict_size", 4 * width)
            filled.setdefault("lm_name", lm_name)
            if isinstance(layer, list):  # a crosscoder: one dictionary over every site
                filled.setdefault("num_layers", len(layer))
            else:
                filled.setdefault("layer", layer)
            filled.setdefault("device", device)
            out.append(filled)
    return out


def cmd_train(args) -> None:
    import torch

    from .training import trainSAE

    configs = _with_seeds(_trainer_configs(args), args.seeds)
    torch.manual_seed(args.seed)  # the trainers without a seed of their own, and the buffer's shuffle
    out = Path(args.out)
    if not args.resume:
        _check_out(out, args.overwrite)
    data, sites, lm_name, e2e = _data_for_training(args)
    configs = _per_site(configs, sites, lm_name, args.device)  # trainSAE fits warm-ups to a short run
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
        transcoder=args.transcoder,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved {len(configs)} dictionaries under {out}/trainer_*")


def _same_model(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b or Path(a).name == Path(b).name


def _eval_plan(args, dictionaries):
    """Per dictionary (folder, dictionary, site to read, io); checks every recorded model, site,
    width and text against what was asked, failing with one line that names both."""
    from .models import DEFAULT_MODEL_NAME, get_submodule
    from .nnsight_io import model_id, resolve_site

    models = {site["model"] for _, _, _, site in dictionaries if site["measured"]}
    if args.model is None and len(models) > 1:
        raise SystemExit(
            f"error: these dictionaries were trained on different models ({sorted(models)}): evaluate each alone"
        )
    recorded_model = next(iter(models), None)
    docs = _documents(args)
    if args.model is None and recorded_model not in (None, DEFAULT_MODEL_NAME):
        args.model = recorded_model  # load the model the dictionaries were trained on
        try:
            model = _load_model(args)
        except OSError as e:
            raise SystemExit(
                f"error: could not load the recorded model {recorded_model!r} ({e}); pass --model"
            ) from None
    else:
        model = _load_model(args)
    name = model_id(model)
    plan = []
    for folder, ae, config, site in dictionaries:
        if not _same_model(site.get("model"), name):
            if site["measured"]:
                raise SystemExit(
                    f"error: {folder} was trained on {site['model']!r}, not on {name!r}: drop --model to load the "
                    f"recorded one, or evaluate another dictionary"
                )
            print(f"note: {folder} names lm_name {site['model']!r}; evaluating on {name!r}", file=sys.stderr)
        if args.layer or args.site:
            asked = get_submodule(model, (args.layer or [0])[0], args.site or "resid")
            _check_asked_site(folder, site, resolve_site(model, asked, "out").name, args)
        elif site.get("module"):
            asked = site["module"]
        elif site.get("layer") is not None:
            asked = get_submodule(model, site["layer"], site.get("kind") or "resid")
        else:
            raise SystemExit(f"error: {folder} does not record its site: give --layer (and --site)")
        plan.append((folder, ae, asked, site.get("io") or "out"))
        _check_overlap(args, folder, config, docs)
    return model, docs, plan


def _check_overlap(args, folder, config: dict, docs) -> None:
    """Refuse text the dictionary was trained on, unless --allow-training-text."""
    from .data import training_overlap

    overlap = training_overlap((config.get("buffer") or {}).get("text"), docs.record)
    if overlap and not args.allow_training_text:
        raise SystemExit(
            f"error: {folder}: {overlap}. Evaluate on held-out text (--part held-out, the default) or other "
            f"text, or pass --allow-training-text"
        )


def _check_asked_site(folder, site: dict, asked: str, args) -> None:
    """--layer/--site must name the site the dictionary was trained on, when it records one."""
    from .models import layer_of

    recorded = site.get("module")
    wrong_module = recorded is not None and recorded != asked
    wrong_layer = recorded is None and site.get("layer") is not None and layer_of(asked) not in (None, site["layer"])
    if wrong_module or wrong_layer:
        trained = recorded or f"layer {site['layer']}"
        raise SystemExit(
            f"error: {folder} was trained on {trained}, not on {asked}: drop --layer/--site to use the recorded site"
        )


def cmd_eval(args) -> None:
    from .checkpoint import load_dictionary
    from .dictionaries import CrossLayerTranscoderBase
    from .sites import recorded_site
    from .suite import Entry, check_suites, find_dictionaries

    suites = check_suites(args.suite)
    probe_data = _probe_data(args) if "sparse_probing" in suites else None  # a bad file fails before the model
    missing = [folder for folder in args.dictionaries if not Path(folder).exists() and "://" not in folder]
    if missing:
        raise SystemExit(f"error: {missing[0]} does not exist: give a checkpoint folder (with ae.pt and config.json)")
    dictionaries = []  # every dictionary is loaded (and checked) before the model
    for folder in find_dictionaries(args.dictionaries):
        ae, config = load_dictionary(folder, device=args.device)
        dictionaries.append((folder, ae, config, recorded_site(folder, config)))
    if any(isinstance(ae, CrossLayerTranscoderBase) for _, ae, _, _ in dictionaries):
        return _eval_clt(args, suites, dictionaries)
    model, docs, plan = _eval_plan(args, dictionaries)
    entries = [Entry(str(folder), ae, config) for folder, ae, config, _ in dictionaries]
    rows = []
    for (folder, ae, site, io), entry in zip(plan, entries):
        reader = _reader(args, docs, model, entry.config, site, io)
        _check_width(folder, reader, ae, model)
        entry.record |= {"dictionary": str(folder), "site": reader.names[0], "text": docs.record}
        if "core" in suites:
            rows.append((folder, reader.names[0], _core(args, ae, reader, entry)))
    _probing_suites(args, suites, model, plan, entries, probe_data)
    _eval_output(args, suites, entries, rows, docs.record)


def _eval_clt(args, suites: list[str], dictionaries) -> None:
    """A cross-layer transcoder replaces every MLP at once: `replacement.evaluate_replacement`."""
    from .replacement import evaluate_replacement

    if len(dictionaries) > 1:
        raise SystemExit("error: a cross-layer transcoder replaces every MLP: evaluate it by itself")
    if args.layer or args.site or suites != ["core"] or args.plots:
        raise SystemExit("error: a cross-layer transcoder is scored on every MLP at once (the core suite): drop "
                         "--layer, --site, --suite and --plots")  # fmt: skip
    folder, ae, _, site = dictionaries[0]
    model, docs = _model_for(args, site.get("model")), _documents(args)
    result = evaluate_replacement(model, ae, docs, n_contexts=args.n_batches * args.batch_texts,
                                  ctx_len=args.ctx_len, batch_size=args.batch_texts)  # fmt: skip
    if args.json:
        print(json.dumps({"dictionary": str(folder), **result}))
        return
    fve = result["fve"]
    print(f"{folder}: every MLP replaced on {result['n_tokens']} tokens ({docs.record['part']} part)")
    print(f"  CE clean {result['ce_clean']:.3f}, replaced {result['ce_replaced']:.3f}, zeroed {result['ce_zero']:.3f}; "
          f"loss recovered {result['frac_recovered']:.3f}; KL {result['kl_div']:.3f}")  # fmt: skip
    print(f"  FVE per layer: mean {sum(fve) / len(fve):.3f}, min {min(fve):.3f}; L0 per layer {result['l0'][0]:.1f}")


def _core(args, ae, reader, entry) -> dict:
    from .evaluation import evaluate

    metrics = evaluate(
        ae, reader, max_len=args.ctx_len, batch_size=args.batch_texts, n_batches=args.n_batches, device=args.device
    )
    entry.record |= {f"core/{k}": v for k, v in metrics.items()}
    return metrics


def _probing_suites(args, suites, model, plan, entries, probe_data) -> None:
    """Sparse probing and absorption: the SAEs at each site together, one model pass per suite."""
    from .suite import probing_overlap, run_absorption, run_probing

    by_site: dict[str, list[int]] = {}
    for i, (_, ae, site, io) in enumerate(plan):
        if getattr(ae, "transcoder", False) or getattr(ae, "num_layers", 1) != 1 or io not in ("out", "in"):
            entries[i].record["note"] = "sparse probing and absorption score SAEs at one site"
            continue
        by_site.setdefault(site if isinstance(site, str) else _site_name(model, site), []).append(i)
    for site, indices in by_site.items():
        aes = [entries[i].ae for i in indices]
        if "sparse_probing" in suites:
            llm, records = run_probing(model, site, aes, probe_data, args.ctx_len, args.batch_texts)
            for i, record in zip(indices, records):
                overlap = probing_overlap(probe_data.texts, entries[i].config.get("buffer"), probe_data.source)
                entries[i].record |= {f"sparse_probing/{k}": v for k, v in (llm | record).items()}
                entries[i].record |= {"sparse_probing/data": probe_data.record(), "sparse_probing/overlap": overlap}
        if "absorption" in suites:
            probe, records = run_absorption(model, site, aes, args.absorption_words, args.batch_texts)
            for i, record in zip(indices, records):
                entries[i].record |= {f"absorption/{k}": v for k, v in (probe | record).items()}


def _site_name(model, site) -> str:
    from .nnsight_io import resolve_site

    return resolve_site(model, site, "out").name


def _probe_data(args):
    from .probing import bbc_topics, read_probe_file

    data = read_probe_file(args.probe_data, args.text_field, args.label_field) if args.probe_data else bbc_topics()
    data = data.limited(args.probe_texts)
    data.split()  # too few texts of a class on one side fails here, before the model loads
    return data


def _eval_output(args, suites, entries, rows, text_record) -> None:
    from .suite import pareto_plots, report

    if args.json == "-":
        for entry in entries:
            print(json.dumps(_flat(entry.record)))
    elif args.json:
        Path(args.json).write_text(json.dumps([_flat(e.record) for e in entries], indent=1))
        print(f"wrote {args.json} ({len(entries)} dictionaries)")
    if args.json != "-":
        if suites == ["core"] and len(rows) == len(entries) and len(entries) == len({e.setting for e in entries}):
            _print_eval_table(rows, text_record)
        else:
            print("\n".join(report(entries)))
            print(f"text: the {text_record['part']} part of {text_record['source']}; ~: within seed noise of the best")
    if args.plots:
        for path in pareto_plots(entries, Path(args.plots)):
            print(f"wrote {path}")


def _flat(record: dict) -> dict:
    """A record for --json: the core metrics also under their plain names (the reference's keys)."""
    core = {k.removeprefix("core/"): v for k, v in record.items() if k.startswith("core/")}
    return core | record


def _reader(args, docs, model, config: dict, site, io: str):
    """What `eval` and `features` read: the recorded site(s); for a model-diffing crosscoder the
    same tokens through both recorded models (`PairedActivationBuffer`)."""
    from .buffer import PairedActivationBuffer
    from .reader import ActivationReader

    reading = dict(io=io, ctx_len=args.ctx_len, refresh_batch_size=args.batch_texts, pack=not args.no_pack)
    paired = (config.get("buffer") or {}).get("paired_model")
    if paired:
        other = _load_named_model(paired, args.device)
        return PairedActivationBuffer(
            docs, model, other, site[0], other_submodule=site[-1], n_ctxs=args.batch_texts, **reading
        )
    return ActivationReader(docs, model, site, **reading)


def _check_width(folder, reader, ae, model) -> None:
    from .nnsight_io import model_id

    width = reader.widths[0]
    if width != ae.activation_dim:
        raise SystemExit(
            f"error: {folder} reads width {ae.activation_dim}, but {reader.names[0]} of {model_id(model)} has "
            f"width {width}: give the --layer/--site (and --model) it was trained on"
        )


def _print_eval_table(rows, text: dict) -> None:
    print(
        f"{'dictionary':40s} {'site':22s} {'Var. expl. %':>12s} {'L1':>8s} {'L0':>8s} {'% alive':>8s} "
        f"{'clean CE':>8s} {'CE diff [95% CI]':>24s} {'% CE rec. [95% CI]':>24s} {'tokens':>8s}"
    )
    for folder, site, m in rows:
        if "ce_diff_pooled" not in m:  # a crosscoder: one line per site
            _print_crosscoder_rows(folder, m)
            continue
        diff = f"{m['ce_diff_pooled']:.3f} [{m['ce_diff_lo']:.3f}, {m['ce_diff_hi']:.3f}]"
        lo, hi = 100 * m["frac_recovered_lo"], 100 * m["frac_recovered_hi"]
        rec = f"{100 * m['frac_recovered_pooled']:.1f} [{lo:.1f}, {hi:.1f}]"
        print(
            f"{str(folder)[-40:]:40s} {site[-22:]:22s} {100 * m['frac_variance_explained']:12.1f} {m['l1_loss']:8.1f} "
            f"{m['l0']:8.1f} {100 * m['frac_alive']:8.1f} {m['ce_clean_pooled']:8.3f} {diff:>24s} {rec:>24s} "
            f"{m['n_tokens']:8d}"
        )
    print(f"text: the {text['part']} part of {text['source']}")


def _print_crosscoder_rows(folder, m: dict) -> None:
    """A crosscoder's sites, each spliced in alone (no bootstrap intervals: the means over tokens)."""
    site = 0
    while f"loss_original_site_{site}" in m:
        name = f"site {site}"
        diff = m[f"loss_reconstructed_site_{site}"] - m[f"loss_original_site_{site}"]
        print(
            f"{str(folder)[-40:]:40s} {name:22s} {100 * m[f'frac_variance_explained_site_{site}']:12.1f} "
            f"{m['l1_loss']:8.1f} {m['l0']:8.1f} {100 * m['frac_alive']:8.1f} {m[f'loss_original_site_{site}']:8.3f} "
            f"{diff:24.3f} {100 * m[f'frac_recovered_site_{site}']:24.1f} {'':>8s}"
        )
        site += 1


def _clt_reader(args, folder, ae, config: dict):
    """(model, text, a reader of every layer's MLP input): what a CLT's dashboards read."""
    from .models import get_submodule, num_layers
    from .reader import ActivationReader
    from .sites import recorded_site

    if args.layer or args.site:
        raise SystemExit("error: a cross-layer transcoder reads every layer's MLP: drop --layer and --site")
    model, docs = _model_for(args, recorded_site(folder, config).get("model")), _documents(args)
    _check_overlap(args, folder, config, docs)
    if num_layers(model) != ae.num_layers:
        raise SystemExit(f"error: {folder} replaces {ae.num_layers} MLPs, but the model has {num_layers(model)}")
    mlps = [get_submodule(model, layer, "mlp") for layer in range(ae.num_layers)]
    reader = ActivationReader(docs, model, mlps, io="in", ctx_len=args.ctx_len, refresh_batch_size=args.batch_texts,
                              pack=not args.no_pack)  # fmt: skip
    return model, docs, reader


def cmd_features(args) -> None:
    from .checkpoint import load_dictionary
    from .dashboard import collect_feature_stats, write_dashboard
    from .dictionaries import CrossLayerTranscoderBase
    from .nnsight_io import model_id
    from .sites import recorded_site

    folder = args.dictionary
    if not Path(folder).exists() and "://" not in folder:
        raise SystemExit(f"error: {folder} does not exist: give a checkpoint folder (with ae.pt and config.json)")
    ae, config = load_dictionary(folder, device=args.device)
    if isinstance(ae, CrossLayerTranscoderBase):
        model, docs, reader = _clt_reader(args, folder, ae, config)
    else:
        model, docs, plan = _eval_plan(args, [(folder, ae, config, recorded_site(folder, config))])
        _, _, site, io = plan[0]
        reader = _reader(args, docs, model, config, site, io)
        _check_width(folder, reader, ae, model)
    stats = collect_feature_stats(ae, reader, reader.data, batch_size=args.batch_texts, max_contexts=args.contexts)
    recipe = (config.get("trainer") or {}).get("trainer_class", type(ae).__name__)
    where = "every MLP" if isinstance(ae, CrossLayerTranscoderBase) else reader.names[0]
    title = f"{Path(folder).name} ({recipe}, {where} of {model_id(model)})"
    out = Path(args.out or Path(folder) / "features")
    index = write_dashboard(stats, out, title=title, features=args.features)
    print(f"wrote {index} ({stats.n_tokens} {docs.record['part']} tokens of {docs.record['source']})")


def cmd_download(args) -> None:
    if args.site is None and args.trainer is None:
        script = Path(__file__).parent / "scripts" / "download_pythia_dictionaries.sh"
        raise SystemExit(subprocess.call(["bash", str(script), args.dest]))
    if args.site is None or args.trainer is None or not re.fullmatch(r"resid_post_layer_\d+", args.site):
        raise SystemExit(
            "error: one dictionary of a SAEBench Pythia-70m sweep is --site resid_post_layer_<layer> --trainer <i> "
            "(with --sweep); without both, download fetches the whole 10_32768 set"
        )
    from .checkpoint import load_dictionary
    from .hub import fetch_sweep_dictionary

    try:
        target = fetch_sweep_dictionary(args.sweep, args.site, args.trainer, Path(args.dest))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    load_dictionary(target)  # a damaged or foreign file fails here, naming it
    print(f"downloaded {target}")


# ------------------------------------------------------------------------------------------ parser
def _add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="run the model once and write its activations to a cache folder",
        description="Write activations of a model's layer(s) to disk (safetensors shards + manifest), from "
        "the training part of the text, packed into contexts.",
    )
    _add_model_args(p, "transformer layer(s): several cache several sites in one pass")
    _add_text_args(p, "train")
    _add_mask_args(p)
    p.add_argument("--tokens", type=positive_int, required=True, help="how many token activations to cache")
    p.add_argument(
        "--io",
        default="out",
        choices=["out", "in", "in_and_out"],
        help="the site's output, input, or both as (input, output) pairs: what `train --transcoder --cache` "
        "reads (with --site mlp) (default: out)",
    )
    p.add_argument(
        "--stack-sites",
        action="store_true",
        help="several --layer sites of one width, recorded to be read stacked [B, L, d]: what "
        "`train --crosscoder --cache` reads (checked before the model runs)",
    )
    p.add_argument(
        "--allow-fewer", action="store_true", help="keep what there is when the text holds fewer tokens than asked"
    )
    p.add_argument(
        "--lm-batch-size", type=positive_int, default=32, help="contexts per model forward pass (default: 32)"
    )
    p.add_argument("--out", required=True, help="cache folder (an interrupted build resumes there)")
    p.set_defaults(func=cmd_cache)


def trainer_options_help() -> str:
    """Each trainer's options with their defaults and docs, read from its Config."""
    lines = [
        "trainer options (--trainer NAME:KEY=V1,V2,KEY2=V3 trains one dictionary per combination; --set "
        "KEY=VALUE sets it for every trainer; steps, activation_dim and dict_size come from the run):"
    ]
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
        "from --trainer NAME:KEY=VALUES (and --set) or a JSON/YAML --config; activation_dim, dict_size "
        "(4 x width), layer and lm_name default from the data. Warm-ups whose defaults do not fit a "
        "short run are shortened (a note says so) unless set.",
        epilog=trainer_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p, "transformer layer(s): several train every trainer at each site, from one forward pass")
    _add_text_args(p, "train")
    _add_mask_args(p)
    p.add_argument(
        "--trainer",
        action="append",
        metavar="NAME[:KEY=V1,V2,...]",
        help="a trainer to run, with its own options; repeat for several (e.g. --trainer TopKTrainer:k=32,64 "
        "--trainer StandardTrainer:l1_penalty=0.04)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="an option for every trainer, e.g. --set lr=3e-4 (values parsed as JSON when possible); a value "
        "that a trainer's own --trainer or --config entry sets takes precedence (a note says so)",
    )
    p.add_argument(
        "--config",
        help="JSON or YAML file: a trainer config, a list of them, or {'trainers': [...]}; with --trainer, "
        "the run trains both",
    )
    kind = p.add_argument_group("transcoders and crosscoders")
    kind.add_argument(
        "--transcoder",
        action="store_true",
        help="train transcoders: read the site's input and output (default site: mlp) and reconstruct the "
        "output from the input (TopK, BatchTopK, Standard, StandardAprilUpdate, JumpReLU; skip_connection=true "
        "adds a linear skip path)",
    )
    kind.add_argument(
        "--crosscoder",
        action="store_true",
        help="train crosscoders (CrossCoderTrainer, BatchTopKCrossCoderTrainer) on the --layer sites stacked as "
        "[B, L, d], or with --paired-model on one site of two models",
    )
    kind.add_argument(
        "--clt",
        action="store_true",
        help="train a cross-layer transcoder (TopKCLTTrainer, BatchTopKCLTTrainer, JumpReluCLTTrainer) over the "
        "--layer MLPs (consecutive; usually all): each layer's MLP input and output read in one pass, stacked "
        "[B, L, 2, d]",
    )
    kind.add_argument(
        "--paired-model", help="with --crosscoder: a second model (e.g. the fine-tuned one) read on the same tokens"
    )
    p.add_argument("--cache", help="train from this activation cache instead of running the model")
    p.add_argument("--steps", type=positive_int, required=True, help="optimisation steps")
    p.add_argument(
        "--seeds",
        type=positive_int,
        help="train each trainer config once per seed 0..N-1 on the same stream (eval reports mean and spread)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of torch's generator at the start: the initialisation of trainers without a seed option "
        "and the buffer's shuffle derive from it, so a command repeated gives the same weights (default: 0)",
    )
    p.add_argument(
        "--loop", action="store_true", help="read the text (or cache) again when it runs out, instead of refusing"
    )
    p.add_argument("--batch-size", type=positive_int, default=4096, help="activations per step (default: 4096)")
    p.add_argument(
        "--n-ctxs", type=positive_int, default=3000, help="contexts held by the activation buffer (default: 3000)"
    )
    p.add_argument(
        "--lm-batch-size", type=positive_int, default=32, help="contexts per model forward pass (default: 32)"
    )
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
    _add_e2e_args(p)
    p.set_defaults(func=cmd_train)


def _add_e2e_args(p: argparse.ArgumentParser) -> None:
    e2e = p.add_argument_group(
        "end-to-end training",
        "train with the dictionary spliced into the model (Braun et al. 2024): each step is one batch of "
        "--lm-batch-size contexts; the loss is the trainer's sparsity mechanism plus the weighted terms below",
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


def _add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate dictionaries: variance explained, L0, loss recovered, with 95%% intervals",
        description="Evaluate saved dictionaries through the model, on the held-out part of the text by "
        "default. The model, site and io come from each dictionary's config.json (for the published "
        "Pythia folders, .../mlp_out_layer3/10_32768, from the path); a --model, --layer or --site "
        "that contradicts them is refused, and so is text the dictionary trained on.",
    )
    p.add_argument("dictionaries", nargs="+", help="checkpoint folders, or run folders (every trainer_* in them)")
    _add_model_args(p, "transformer layer (default: the recorded one)")
    _add_text_args(p, "held-out")
    p.add_argument("--batch-texts", type=positive_int, default=32, help="contexts per evaluation batch (default: 32)")
    p.add_argument(
        "--n-batches", type=positive_int, default=8, help="evaluation batches (default: 8, 32,768 tokens at ctx 128)"
    )
    p.add_argument(
        "--allow-training-text", action="store_true", help="evaluate even on text the dictionary was trained on"
    )
    p.add_argument(
        "--suite",
        default="core",
        help="comma-separated: core (reconstruction, loss recovered), sparse_probing, absorption (default: core)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT",
        help="one JSON record per dictionary: printed, or written to OUT as a list",
    )
    p.add_argument("--plots", metavar="DIR", help="write Pareto plots (L0 against FVE, CE increase, top-1 accuracy)")
    probe = p.add_argument_group("sparse probing and absorption")
    probe.add_argument("--probe-data", help="a labelled .jsonl or .csv file (default: the BBC News topics, 5 classes)")
    probe.add_argument("--text-field", default="text", help="the probe file's text field (default: text)")
    probe.add_argument("--label-field", default="label", help="the probe file's label field (default: label)")
    probe.add_argument(
        "--probe-texts", type=positive_int, help="probe at most this many texts, an equal share per class (default all)"
    )
    probe.add_argument(
        "--absorption-words", type=positive_int, default=100, help="words per first letter (default: 100)"
    )
    p.set_defaults(func=cmd_eval)


def _add_export_command(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write transcoders in another library's format (circuit-tracer)",
        description="Write MLP transcoders (one per layer, every layer of the model: a run of train "
        "--transcoder --layer all) or a cross-layer transcoder (train --clt) as a circuit-tracer folder. TopK "
        "dictionaries get JumpReLU thresholds calibrated on held-out activations read from the recorded model.",
    )
    p.add_argument("dictionaries", nargs="+", help="checkpoint folders, or run folders (every trainer_* in them)")
    p.add_argument("--format", required=True, choices=["circuit-tracer"], help="the format to write")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--held-out-tokens",
        type=positive_int,
        default=16384,
        help="held-out tokens that TopK thresholds are calibrated on (default: 16384)",
    )
    p.add_argument(
        "--calibration",
        choices=["latent", "layer"],
        default="latent",
        help="TopK thresholds: one per latent matching its TopK firing rate (default), or one per layer",
    )
    p.add_argument("--model", help="the model to calibrate on (default: the recorded one)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    _add_text_args(p, "held-out")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from .circuit_export import export_circuit_tracer, needs_held_out, read_mlp_pairs, transcoders_by_layer
    from .suite import find_dictionaries

    missing = [folder for folder in args.dictionaries if not Path(folder).exists()]
    if missing:
        raise SystemExit(f"error: {missing[0]} does not exist: give a checkpoint or run folder")
    dictionaries, layers, lm_name = transcoders_by_layer(find_dictionaries(args.dictionaries))
    held_out = None
    if needs_held_out(dictionaries):
        model = _model_for(args, lm_name)
        held_out = read_mlp_pairs(model, layers, _documents(args), args.held_out_tokens, args.ctx_len)
    record = export_circuit_tracer(dictionaries, args.out, held_out, model_name=lm_name, calibration=args.calibration)
    kind = record["model_kind"]
    print(f"wrote a circuit-tracer {kind} of {len(layers)} layers to {args.out}")
    for layer, report in (record["dictionary_learning"].get("calibration") or {}).items():
        print(f"  {layer}: {json.dumps(report)}")


def _model_for(args, recorded: str | None):
    """The model a command reads: --model, refused if it contradicts the recorded one; else the
    recorded one (the offline default when that is what was recorded, or nothing was)."""
    from .models import DEFAULT_MODEL_NAME

    if args.model is not None and not _same_model(args.model, recorded):
        raise SystemExit(f"error: the dictionary was trained on {recorded!r}, not {args.model!r}: drop --model")
    if args.model is None and recorded not in (None, DEFAULT_MODEL_NAME):
        args.model = recorded
    return _load_model(args)


def _add_features_command(sub) -> None:
    p = sub.add_parser(
        "features",
        help="write feature dashboards (HTML): an index of every feature and a page per feature",
        description="Read held-out text through the model and a dictionary (at its recorded site) and write "
        "index.html (every feature: density, max activation, promoted tokens, first-position flag) and "
        "feature_<i>.html (histogram, top contexts with text on both sides, quantile samples, logit lens).",
    )
    p.add_argument("dictionary", help="a checkpoint folder")
    _add_model_args(p, "transformer layer (default: the recorded one)")
    _add_text_args(p, "held-out")
    p.add_argument("--contexts", type=positive_int, default=256, help="contexts to read (default: 256)")
    p.add_argument("--batch-texts", type=positive_int, default=32, help="contexts per forward pass (default: 32)")
    p.add_argument(
        "--features",
        type=int,
        nargs="+",
        help="features to write pages for (default: every one that fired); a CLT's latent j of layer s is s * F + j",
    )
    p.add_argument(
        "--allow-training-text", action="store_true", help="read text the dictionary was trained on all the same"
    )
    p.add_argument("--out", help="output folder (default: <dictionary>/features)")
    p.set_defaults(func=cmd_features)


def _add_download_command(sub) -> None:
    from .hub import SWEEPS

    p = sub.add_parser(
        "download",
        help="download published Pythia-70m-deduped dictionaries",
        description="Without options: the 10_32768 set (19 AutoEncoders, one ~2.5 GB zip) into "
        "DEST/dictionaries/pythia-70m-deduped/; rerun to resume. With --site resid_post_layer_<i> --trainer "
        "<n>: one dictionary of a SAEBench sweep (ae.pt + config.json) into DEST/dictionaries/<sweep>/<site>/"
        "trainer_<n>.",
    )
    p.add_argument("dest", nargs="?", default=".", help="destination folder (default: .)")
    p.add_argument("--site", help="resid_post_layer_<i> (a sweep dictionary)")
    p.add_argument("--trainer", type=int, help="the trainer index within the sweep")
    p.add_argument("--sweep", default="topk", choices=list(SWEEPS), help="which SAEBench sweep (default: topk)")
    p.set_defaults(func=cmd_download)


def cmd_synthetic(args) -> None:
    from .synthetic_bench import SyntheticRun, recipe_parts, run_synthetic, table

    recipes = synthetic_recipes(args.trainers)
    unknown = [name for name, _ in map(recipe_parts, recipes) if name not in TRAINER_REGISTRY]
    if unknown:
        raise SystemExit(f"error: unknown trainer {unknown[0]!r}; choose from {', '.join(TRAINER_REGISTRY)}")
    if args.saelens_python and not Path(args.saelens_python).exists():
        raise SystemExit(f"error: --saelens-python {args.saelens_python} does not exist")
    run = SyntheticRun(recipes=recipes, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
                       n_features=args.features, d=args.d, mean_l0=args.mean_l0, dict_size=args.dict_size,
                       k=args.k, lr=args.lr)  # fmt: skip
    for recipe in recipes:  # every recipe's whole config is checked before anything trains
        name = recipe_parts(recipe)[0]
        try:
            options = {k: v for k, v in run.config(recipe, 0).items() if k != "trainer"}
            TRAINER_REGISTRY[name].Config.from_call(name, (), options | {"steps": run.steps})
        except (TypeError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
    rows = run_synthetic(run, args.saelens_python)
    print("\n".join(table(rows, run)))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run.__dict__, "rows": rows}, indent=1, default=str))
        print(f"wrote {args.json}")


def synthetic_recipes(text: str) -> tuple:
    """`--trainers` of `synthetic`: "TopKTrainer,TopKTrainer:encoder_init_norm=0.1,0.3" -> ("TopKTrainer",
    ("TopKTrainer", {"encoder_init_norm": 0.1}), ("TopKTrainer", {"encoder_init_norm": 0.3})). Each
    recipe in `--trainer`'s syntax (one variant per combination of the listed values); a token
    starts a new recipe when it names a trainer or holds a colon, or when the one before sets nothing."""
    specs: list[str] = []
    for token in (t.strip() for t in _split_top_level(text)):
        if not token:
            continue
        if not specs or ":" in token or token in TRAINER_REGISTRY or "=" not in specs[-1]:
            specs.append(token)
        else:
            specs[-1] += "," + token
    recipes: list = []
    for spec in specs:
        name, options = parse_trainer_spec(spec)
        for values in itertools.product(*options.values()):
            recipes.append((name, dict(zip(options, values))) if options else name)
    return tuple(recipes)


def _add_synthetic_command(sub) -> None:
    p = sub.add_parser(
        "synthetic",
        help="train recipes on a synthetic model and score them against its ground truth",
        description="Train recipes on activations of a synthetic model with known features (Zipfian firing, "
        "hierarchy, correlations), several seeds each, and print MCC, F1, shrinkage, FVE, L0, dead latents and "
        "seconds per step (mean ± sd over seeds). With --saelens-python, SAELens's recipe of each architecture "
        "both libraries train (TopK, BatchTopK, Matryoshka, AbsTopK, matching pursuit) trains beside ours on the "
        "same batches, width, k, lr and steps.",
    )
    p.add_argument("--trainers", default="TopKTrainer,BatchTopKTrainer,MatryoshkaBatchTopKTrainer",
                   help="comma-separated recipes (default: the TopK family); a variant sets options as "
                        "--trainer does: TopKTrainer:encoder_init_norm=0.1,lr=1e-3")  # fmt: skip
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per recipe (default: 3)")
    p.add_argument("--steps", type=positive_int, default=1500, help="training steps (default: 1500)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="samples per step (default: 1024)")
    p.add_argument("--features", type=positive_int, default=1024, help="true features (default: 1024)")
    p.add_argument("--d", type=positive_int, default=128, help="activation width (default: 128)")
    p.add_argument("--mean-l0", type=float, default=16.0, help="true features firing per sample (default: 16)")
    p.add_argument("--dict-size", type=positive_int, default=1024, help="latents (default: 1024)")
    p.add_argument("--k", type=positive_int, default=16, help="k of the TopK family, JumpReLU's target L0 (16)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of every recipe (default: 3e-4)")
    p.add_argument("--saelens-python", help="python of a venv with sae-lens (tools/setup_saelens_venv.sh)")
    p.add_argument("--json", help="write the rows (every seed's metrics) to this file")
    p.set_defaults(func=cmd_synthetic)


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
    _add_features_command(sub)
    _add_export_command(sub)
    _add_download_command(sub)
    _add_synthetic_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. The library's errors print as one line (`--debug` shows the traceback)."""
    from .run import TrainingInterrupted

    args = build_parser().parse_args(argv)
    _flatten_layers(args)
    logging.basicConfig(format="note: %(message)s", level=logging.WARNING)  # the library's notes, one line each
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
