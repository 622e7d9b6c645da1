"""Export transcoders to circuit-tracer (the library behind Neuronpedia's attribution graphs), and
read its folders back.

Two of circuit-tracer's formats (0.5), both a folder with `config.yaml`:
- `transcoder_set`: one transcoder per MLP, `layer_{i}.safetensors` for i = 0..L-1 holding `W_enc`
  `[F, D]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]`, optional `activation_function.threshold [F]`
  (JumpReLU `pre * 1[pre > threshold]`; absent: ReLU) and `W_skip [D, D]` (adds `x @ W_skip.T`);
- `cross_layer_transcoder`: `W_enc_{i}.safetensors` (`W_enc_{i} [F, D]`, `b_enc_{i}`, `b_dec_{i}`,
  `threshold_{i}`) and `W_dec_{i}.safetensors` (`W_dec_{i} [F, L - i, D]`).
The hooks are `mlp.hook_in` (the MLP's input: the post-attention norm's output) and `mlp.hook_out`,
which circuit-tracer maps for both its TransformerLens and nnsight backends.

circuit-tracer loads ReLU and JumpReLU activations only. A TopK dictionary keeps the k largest
latents per token, which no per-latent threshold reproduces exactly: it is exported as a JumpReLU
whose thresholds are calibrated on held-out MLP inputs. The default rule (`calibration="latent"`)
gives each latent its own threshold, at which it fires on as many of those tokens as the TopK code
kept it, so every latent keeps its firing rate and a layer keeps k per token on average; the other
(`"layer"`) gives all of a layer's latents one threshold that keeps k per token on average.
`export_circuit_tracer` reports, per layer, the variance of the MLP output that the TopK code and
the calibrated JumpReLU code explain on the calibration tokens. A BatchTopK dictionary whose
training tracked its inference threshold keeps that threshold.

`config.yaml` also records the sha256 of every weight file (`dictionary_learning.sha256`, a key
circuit-tracer ignores): `load_circuit_tracer` refuses a folder whose files were changed since.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .dictionaries import (
    AutoEncoderTopK,
    BatchTopKCrossLayerTranscoder,
    BatchTopKSAE,
    CrossLayerTranscoderBase,
    Dictionary,
    JumpReluAutoEncoder,
    JumpReluCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from .files import CheckpointError, save_state_dict
from .safe_io import atomic_write, sha256_file

__all__ = [
    "export_circuit_tracer",
    "load_circuit_tracer",
    "calibrate_threshold",
    "jumprelu_thresholds",
    "rate_matched_thresholds",
]

CONFIG = "config.yaml"
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


# ---------------------------------------------------------------------------------- thresholds
@torch.no_grad()
def calibrate_threshold(pre_NF: torch.Tensor, k: int) -> float:
    """The threshold at which `pre > threshold` keeps k entries per row on average over the rows of
    `pre_NF` (one value for all latents: BatchTopK's inference rule). Never below 0."""
    n = pre_NF.shape[0] * k
    flat = pre_NF.reshape(-1).float()
    if n >= flat.numel():
        return 0.0
    kept = flat.topk(n + 1).values
    return max(float(kept[-2:].mean()), 0.0)  # between the k-th and the next: rounding keeps the k-th


@torch.no_grad()
def rate_matched_thresholds(a_NF: torch.Tensor, kept_NF: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """`[F]` thresholds at which each latent's `a > threshold` holds on as many rows of `a_NF`
    (ReLU pre-activations) as `kept_NF` (the dictionary's own code) kept it: midway between its n-th
    and (n+1)-th largest value for n kept rows; at its largest for a latent never kept (so it fires on
    none of these rows). Never below 0."""
    N, F = a_NF.shape
    out = torch.empty(F, device=a_NF.device)
    for start in range(0, F, chunk):  # sorting [N, chunk] at a time bounds the memory
        ranked = a_NF[:, start : start + chunk].float().sort(0, descending=True).values
        n = kept_NF[:, start : start + chunk].sum(0)
        nth = ranked.gather(0, (n - 1).clamp(0, N - 1)[None])[0]
        next_ = ranked.gather(0, n.clamp(max=N - 1)[None])[0]
        threshold = torch.where(n == 0, ranked[0], (nth + next_) / 2)
        out[start : start + chunk] = torch.where(n >= N, 0.0, threshold)
    return out.clamp_min(0)


CALIBRATIONS = ("latent", "layer")


def jumprelu_thresholds(a_NF: torch.Tensor, kept_NF: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """`[F]` JumpReLU thresholds standing in for the top-k code `kept_NF` of the ReLU pre-activations
    `a_NF` (k per row): `rule` "latent" (`rate_matched_thresholds`) or "layer" (`calibrate_threshold`)."""
    _check_rule(rule)
    if rule == "latent":
        return rate_matched_thresholds(a_NF, kept_NF)
    return torch.full((a_NF.shape[1],), calibrate_threshold(a_NF, k), device=a_NF.device)


def _check_rule(calibration: str) -> None:
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")


def _fve(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.float(), y_hat.float()
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# ------------------------------------------------------------------------------ a per-layer set
def _transcoder_tensors(
    ae: Dictionary, layer: int, held_out: torch.Tensor | None, calibration: str = "latent"
) -> tuple[dict, dict | None]:
    """circuit-tracer's tensors for one of our transcoders, and for a TopK one the calibration report."""
    if not getattr(ae, "transcoder", False) or isinstance(ae, CrossLayerTranscoderBase):
        raise ValueError(
            f"layer {layer}: a {type(ae).__name__} {'CLT' if ae.transcoder else 'SAE'} is not a per-layer "
            f"transcoder: export MLP transcoders (train --transcoder) or one cross-layer transcoder"
        )
    if ae.output_dim != ae.activation_dim:
        raise ValueError(
            f"layer {layer}: circuit-tracer's transcoders write the input's width; this one writes {ae.output_dim}"
        )
    if _needs_calibration(ae):
        return _topk_tensors(ae, layer, held_out, calibration)
    fields, state = ae.saelens_state()  # Standard -> "transcoder" (ReLU), JumpReLU -> "jumprelu_transcoder"
    if fields["architecture"] not in (
        "transcoder",
        "skip_transcoder",
        "jumprelu_transcoder",
        "jumprelu_skip_transcoder",
    ):
        raise ValueError(
            f"layer {layer}: circuit-tracer has no {type(ae).__name__} transcoder (ReLU and JumpReLU only)"
        )
    tensors = {"W_enc": state["W_enc"].T, "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if "threshold" in state:  # ours is ReLU(pre * 1[pre > t]): the same as circuit-tracer's at max(t, 0)
        tensors["activation_function.threshold"] = state["threshold"].clamp_min(0)
    if "W_skip" in state:
        tensors["W_skip"] = state["W_skip"]
    return tensors, None


def _topk_tensors(ae, layer: int, held_out: torch.Tensor | None, calibration: str) -> tuple[dict, dict]:
    if held_out is None:
        raise ValueError(
            f"layer {layer}: a {type(ae).__name__} keeps the top k latents, which circuit-tracer cannot load: give "
            f"held-out MLP inputs and outputs of this layer ([N, 2, d]: a buffer or cache with io='in_and_out') to "
            f"calibrate a JumpReLU threshold"
        )
    W_FD, b_F = ae.encoder_weight_bias()
    shift = ae.input_shift
    b_F = b_F if shift is None else b_F - shift @ W_FD.T  # circuit-tracer subtracts nothing from its input
    _check_held_out(held_out, (2, ae.activation_dim), f"layer {layer}: held-out activations", "(MLP input, output)")
    x, y = held_out[:, 0], held_out[:, 1]
    with torch.no_grad():
        a = ae.relu_pre_activations(x)
        topk = ae.encode(x, use_threshold=False) if isinstance(ae, BatchTopKSAE) else ae.encode(x)
        threshold = jumprelu_thresholds(a, topk > 0, ae.active_k, calibration)
        jump = a * (a > threshold)
        report = {"k": ae.active_k, "rule": calibration, "threshold_median": float(threshold.median()),
                  "l0": float((jump > 0).sum(-1).float().mean()), "fve_topk": _fve(y, ae.decode(topk) + ae.skip(x)),
                  "fve_jumprelu": _fve(y, ae.decode(jump) + ae.skip(x))}  # fmt: skip
    tensors = {"W_enc": W_FD, "b_enc": b_F, "W_dec": ae.decoder_FD(), "b_dec": ae.b_dec,
               "activation_function.threshold": threshold}  # fmt: skip
    if ae.skip_connection:
        tensors["W_skip"] = ae.W_skip.T
    return tensors, report


def _check_held_out(held_out: Any, tail: tuple[int, ...], what: str, meaning: str) -> None:
    """Held-out activations must be `[N, *tail]`; the error names the shape and what it holds."""
    if not (isinstance(held_out, torch.Tensor) and held_out.ndim == len(tail) + 1 and held_out.shape[1:] == tail):
        shape = tuple(held_out.shape) if isinstance(held_out, torch.Tensor) else type(held_out).__name__
        raise ValueError(f"{what} must be [N, {', '.join(map(str, tail))}] {meaning}, got {shape}")


def _held_out_by_layer(held_out: Any, layers: int, width: int) -> dict[int, torch.Tensor]:
    """A set's held-out activations by layer: from `{layer: [N, 2, d]}`, a list by layer, or one
    `[N, L, 2, d]` tensor of every layer's (what `read_mlp_pairs` returns)."""
    if held_out is None:
        return {}
    if isinstance(held_out, Mapping):
        return dict(held_out)
    if isinstance(held_out, torch.Tensor):
        _check_held_out(held_out, (layers, 2, width), "held-out activations", "(every layer's MLP input, output)")
        return {layer: held_out[:, layer] for layer in range(layers)}
    return dict(enumerate(held_out))


def _needs_calibration(ae: Dictionary) -> bool:
    """A TopK dictionary (k per token), or a BatchTopK one whose inference threshold was never set."""
    topk = type(ae) in (AutoEncoderTopK, TopKCrossLayerTranscoder)
    batch = type(ae) in (BatchTopKSAE, BatchTopKCrossLayerTranscoder)
    return topk or (batch and bool((ae.threshold < 0).any()))


# ------------------------------------------------------------------------------------ a CLT
def _clt_tensors(
    ae: CrossLayerTranscoderBase, held_out: torch.Tensor | None, calibration: str = "latent"
) -> tuple[dict, dict | None]:
    L, D = ae.num_layers, ae.activation_dim
    report = None
    if isinstance(ae, JumpReluCrossLayerTranscoder):
        thresholds = ae.threshold.detach()  # the same JumpReLU as circuit-tracer's: pre * 1[pre > threshold]
    elif _needs_calibration(ae):
        if held_out is None:
            raise ValueError(
                f"a {type(ae).__name__} keeps the top k latents per layer, which circuit-tracer cannot load: give "
                f"held-out MLP inputs and outputs of every layer ([N, L, 2, d]) to calibrate JumpReLU thresholds"
            )
        _check_held_out(held_out, (L, 2, D), "held-out activations", "(every layer's MLP input, output)")
        thresholds, report = _calibrate_clt(ae, held_out, calibration)
    elif isinstance(ae, BatchTopKCrossLayerTranscoder):  # its tracked thresholds: ReLU(pre) > t_l, t_l >= 0
        thresholds = ae.threshold.detach().clamp_min(0)[:, None].expand(L, ae.dict_size)
    else:
        raise ValueError(f"circuit-tracer has no {type(ae).__name__}")
    files = {}
    for s in range(L):
        files[f"W_enc_{s}.safetensors"] = {
            f"W_enc_{s}": ae.W_enc[s].T,
            f"b_enc_{s}": ae.b_enc[s],
            f"b_dec_{s}": ae.b_dec[s],
            f"threshold_{s}": thresholds[s],
        }
        files[f"W_dec_{s}.safetensors"] = {f"W_dec_{s}": ae.W_dec[s]}
    return files, report


@torch.no_grad()
def _calibrate_clt(ae: TopKCrossLayerTranscoder, held_out: torch.Tensor, calibration: str) -> tuple[torch.Tensor, dict]:
    x, y = held_out[:, :, 0], held_out[:, :, 1]
    pre, k = ae.pre_activations(x), ae.active_k
    topk = ae.encode(x)  # the training rule: top k per token, or BatchTopK's k * N per layer
    thresholds = torch.stack(
        [jumprelu_thresholds(torch.relu(pre[:, s]), topk[:, s] > 0, k, calibration) for s in range(ae.num_layers)]
    )
    jump = pre * (pre > thresholds)
    y_topk, y_jump = ae.decode(topk), ae.decode(jump)
    report = {
        "k": k,
        "rule": calibration,
        "threshold_median": thresholds.median(-1).values.tolist(),
        "l0": (jump > 0).sum(-1).float().mean(0).tolist(),
        "fve_topk": [_fve(y[:, s], y_topk[:, s]) for s in range(ae.num_layers)],
        "fve_jumprelu": [_fve(y[:, s], y_jump[:, s]) for s in range(ae.num_layers)],
    }
    return thresholds, report


# --------------------------------------------------------------------------------- the folder
def export_circuit_tracer(
    dictionaries: Dictionary | Sequence[Dictionary],
    out: str | Path,
    held_out: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
    model_name: str | None = None,
    calibration: str = "latent",
) -> dict[str, Any]:
    """Write `dictionaries` as a circuit-tracer folder `out`: one cross-layer transcoder, or one MLP
    transcoder per layer (a list whose i-th entry is layer i's, every layer of the model, no gaps).

    `held_out`: what TopK dictionaries are calibrated on: `[N, L, 2, d]` (every layer's MLP input and
    output), or for a set also `{layer: [N, 2, d]}` or a list by layer. `calibration`: "latent"
    (a threshold per latent matching its TopK firing rate) or "layer" (one per layer). Returns the
    record written to config.yaml, with the calibration report of each TopK layer under "calibration"."""
    out = Path(out)
    _check_rule(calibration)
    if isinstance(dictionaries, CrossLayerTranscoderBase):
        files, report = _clt_tensors(dictionaries, held_out, calibration)
        kind, layers = "cross_layer_transcoder", dictionaries.num_layers
        reports = {} if report is None else {"clt": report}
    else:
        dictionaries = list(dictionaries)
        if not dictionaries:
            raise ValueError("nothing to export: give one transcoder per layer, or a cross-layer transcoder")
        widths = {(ae.activation_dim, ae.dict_size) for ae in dictionaries}
        if len(widths) > 1:
            raise ValueError(
                f"circuit-tracer's transcoder sets have one width and size for every layer, got {sorted(widths)}"
            )
        files, reports = {}, {}
        by_layer = _held_out_by_layer(held_out, len(dictionaries), dictionaries[0].activation_dim)
        for layer, ae in enumerate(dictionaries):
            tensors, report = _transcoder_tensors(ae, layer, by_layer.get(layer), calibration)
            files[f"layer_{layer}.safetensors"] = tensors
            if report is not None:
                reports[layer] = report
        kind, layers = "transcoder_set", len(dictionaries)
    out.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, tensors in files.items():
        state = {key: t.detach().float().cpu().contiguous() for key, t in tensors.items()}
        checksums[name] = save_state_dict(state, out / name)
    record = {"model_kind": kind, **HOOKS, "scan": model_name or str(out.resolve()), "num_layers": layers,
              "dictionary_learning": {"model": model_name, "sha256": checksums}}  # fmt: skip
    if reports:
        record["dictionary_learning"]["calibration"] = {str(key): value for key, value in reports.items()}
    _write_yaml(record, out / CONFIG)
    return record


def _write_yaml(record: dict, path: Path) -> None:
    """config.yaml as JSON, which YAML parsers read as they are (no YAML writer needed)."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")

    atomic_write(path, write)


def _read_yaml(path: Path) -> dict:
    import yaml  # a dependency of transformers and huggingface-hub

    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot read it as YAML ({e})") from None
    if not isinstance(record, dict) or "model_kind" not in record:
        raise CheckpointError(f"{path} is not a circuit-tracer config (it names no model_kind)")
    return record


def load_circuit_tracer(folder: str | Path) -> Dictionary | list[Dictionary]:
    """Read a circuit-tracer folder back: a `JumpReluCrossLayerTranscoder`, or one
    `JumpReluAutoEncoder` transcoder per layer (thresholds 0 for ReLU ones). Every weight file must
    match the sha256 that `export_circuit_tracer` recorded, when it recorded one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = _read_yaml(folder / CONFIG)
    for name, digest in ((record.get("dictionary_learning") or {}).get("sha256") or {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; export the dictionaries again")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"{path} changed since it was exported (its sha256 differs from config.yaml's): export again, or "
                f"remove the dictionary_learning section of {folder / CONFIG} to load the edited file"
            )
    if record["model_kind"] == "cross_layer_transcoder":
        return _read_clt(folder, load_file)
    if record["model_kind"] != "transcoder_set":
        raise CheckpointError(f"{folder / CONFIG}: unknown model_kind {record['model_kind']!r}")
    layers = sorted(int(p.stem.split("_")[1]) for p in folder.glob("layer_*.safetensors"))
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"{folder}: layer files {layers} are not layer_0 .. layer_N without gaps")
    return [_read_transcoder(load_file(str(folder / f"layer_{i}.safetensors")), folder / f"layer_{i}.safetensors")
            for i in layers]  # fmt: skip


def _read_transcoder(tensors: dict, path: Path) -> JumpReluAutoEncoder:
    allowed = {"W_enc", "b_enc", "W_dec", "b_dec", "activation_function.threshold", "W_skip"}
    if not {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(tensors) <= allowed:
        raise CheckpointError(f"{path}: keys {sorted(tensors)} are not a circuit-tracer transcoder's")
    F, D = tensors["W_enc"].shape
    ae = JumpReluAutoEncoder(D, F, transcoder=True, skip_connection="W_skip" in tensors)
    threshold = tensors.get("activation_function.threshold", torch.zeros(F))  # absent: ReLU
    state = {"W_enc": tensors["W_enc"].T, "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"],
             "b_dec": tensors["b_dec"], "threshold": threshold}  # fmt: skip
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"].T
    try:
        ae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())}") from None
    return ae


def _read_clt(folder: Path, load_file) -> JumpReluCrossLayerTranscoder:
    L = len(list(folder.glob("W_enc_*.safetensors")))
    if L == 0:
        raise CheckpointError(f"{folder} holds no W_enc_0.safetensors: not a circuit-tracer cross-layer transcoder")
    encoders, decoders, b_enc, b_dec, thresholds = [], {}, [], [], []
    for s in range(L):
        try:
            enc = load_file(str(folder / f"W_enc_{s}.safetensors"))
            dec = load_file(str(folder / f"W_dec_{s}.safetensors"))
            encoders.append(enc[f"W_enc_{s}"].T)
            b_enc.append(enc[f"b_enc_{s}"])
            b_dec.append(enc[f"b_dec_{s}"])
            thresholds.append(enc.get(f"threshold_{s}", torch.zeros_like(enc[f"b_enc_{s}"])))
            decoders[f"W_dec.{s}"] = dec[f"W_dec_{s}"]
        except (OSError, KeyError) as e:
            raise CheckpointError(f"{folder}: layer {s} of {L} is incomplete ({e})") from None
    state = {"W_enc": torch.stack(encoders), "b_enc": torch.stack(b_enc), "b_dec": torch.stack(b_dec),
             "threshold": torch.stack(thresholds), **decoders}  # fmt: skip
    return JumpReluCrossLayerTranscoder.from_state_dict(state, source=str(folder))


# ------------------------------------------------------------------------- what the CLI reads
def transcoders_by_layer(folders: Sequence[Path]) -> tuple[Dictionary | list[Dictionary], list[int], str | None]:
    """Load the dictionaries to export: one cross-layer transcoder, or MLP transcoders of layers
    0..L-1 (ordered by their recorded layer). Returns (the CLT or the list, the layers, the model id)."""
    from .checkpoint import load_dictionary
    from .sites import recorded_site

    loaded = []
    for folder in folders:
        ae, config = load_dictionary(folder)
        loaded.append((folder, ae, recorded_site(folder, config)))
    models = {site.get("model") for _, _, site in loaded} - {None}
    if len(models) > 1:
        raise ValueError(f"these dictionaries were trained on different models ({sorted(models)}): export one model's")
    model = next(iter(models), None)
    clts = [folder for folder, ae, _ in loaded if isinstance(ae, CrossLayerTranscoderBase)]
    if clts:
        if len(loaded) > 1:
            raise ValueError(
                f"{clts[0]} is a cross-layer transcoder, which replaces every MLP alone: export it by itself"
            )
        folder, ae, site = loaded[0]
        layers = site.get("layer") if isinstance(site.get("layer"), list) else list(range(ae.num_layers))
        if layers != list(range(ae.num_layers)):
            raise ValueError(f"{folder} was trained on layers {layers}: circuit-tracer needs every layer from 0")
        return ae, layers, model
    by_layer: dict[int, Dictionary] = {}
    for folder, ae, site in loaded:
        module, layer = site.get("module") or "", site.get("layer")
        if (
            not getattr(ae, "transcoder", False)
            or site.get("io") not in (None, "in_to_out")
            or not module.endswith("mlp")
        ):
            raise ValueError(
                f"{folder} is not an MLP transcoder (a {type(ae).__name__} on {module or 'an unrecorded site'}): "
                f"export transcoders trained with train --transcoder --layer all"
            )
        if not isinstance(layer, int) or layer in by_layer:
            raise ValueError(f"{folder}: its layer {layer!r} is unrecorded or given twice; export one per layer")
        by_layer[layer] = ae
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise ValueError(f"no transcoder for layers {missing}: circuit-tracer replaces every MLP, from layer 0 on")
    return [by_layer[i] for i in range(len(by_layer))], list(range(len(by_layer))), model


def needs_held_out(dictionaries: Dictionary | Sequence[Dictionary]) -> bool:
    """Whether exporting needs held-out activations (a TopK dictionary to calibrate)."""
    items = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    return any(_needs_calibration(ae) for ae in items)


def read_mlp_pairs(model, layers: Sequence[int], docs, n_tokens: int, ctx_len: int = 128) -> torch.Tensor:
    """`[N, L, 2, d]`: about `n_tokens` tokens' MLP inputs and outputs at `layers`, read in one pass."""
    from .buffer import ActivationBuffer
    from .models import get_submodule, num_layers

    if list(layers) != list(range(num_layers(model))):
        raise ValueError(
            f"these transcoders cover layers {layers[0]}..{layers[-1]}, but the model has {num_layers(model)}: "
            f"circuit-tracer replaces every MLP"
        )
    sites = [get_submodule(model, layer, "mlp") for layer in layers]
    n_ctxs = max(1, -(-n_tokens // ctx_len))
    buffer = ActivationBuffer(docs, model, sites, io="in_and_out", stack_sites=len(sites) > 1, n_ctxs=n_ctxs,
                              ctx_len=ctx_len, out_batch_size=n_tokens, refresh_batch_size=32, seed=0)  # fmt: skip
    pairs = next(buffer)
    return pairs if len(sites) > 1 else pairs.unsqueeze(1)
