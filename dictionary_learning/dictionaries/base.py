"""The `Dictionary` base class, the registry of architectures, and the one place that knows layouts.

Two weight layouts exist in the reference's files and we must keep both for compatibility:
`nn.Linear`-style matrices (decoder `[D, F]`, a feature is a column) and raw parameters
(decoder `[F, D]`, a feature is a row). Each class declares where its per-feature tensors live in a
`FeatureLayout`; trainers, resampling and checkpoint code read that declaration instead of
special-casing classes.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..files import CheckpointError, read_checkpoint, save_dictionary, write_saelens_folder

logger = logging.getLogger(__name__)

DICTIONARY_REGISTRY: dict[str, type[Dictionary]] = {}


def register_dictionary(cls: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: make `cls` known to `load_dictionary`, the CLI and the tests by its name."""
    if cls.__name__ in DICTIONARY_REGISTRY:
        raise ValueError(f"a dictionary class named {cls.__name__!r} is already registered")
    DICTIONARY_REGISTRY[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class FeatureLayout:
    """Where the per-feature slices of a dictionary's parameters live.

    Each entry maps a state-dict name to the dimension that indexes features (F). The decoder and
    encoder entries are the matrices whose feature slices are directions in activation space.
    """

    decoder: tuple[str, int]
    encoder: tuple[str, int] | None = None
    feature_biases: tuple[tuple[str, int], ...] = ()


def check_sizes(activation_dim: int, dict_size: int, k: int | None = None) -> None:
    """Raise a ValueError naming the argument when a size is not a positive integer (or k > dict_size)."""
    sizes = {"activation_dim": activation_dim, "dict_size": dict_size}
    if k is not None:
        sizes["k"] = k
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if k is not None and k > dict_size:
        raise ValueError(f"k={k} is larger than dict_size={dict_size}; choose k <= dict_size")


def device_of(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of a module's first parameter (`default` for modules without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device(default)


def feature_first(t: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """A view of `t` with its feature dimension first (`[F, ...]`); writes go through to `t`."""
    return t if feature_dim == 0 else t.transpose(0, feature_dim)


@dataclass
class SaelensWeights:
    """A SAELens SAE's config and weights, checked against each other by
    `dictionaries.saelens.parse_saelens` (fp32, SAELens's layouts: `W_enc [D, F]`, `W_dec [F, D]`)."""

    arch: str
    cfg: dict
    source: str
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    extra: dict[str, torch.Tensor]
    subtracts_b_dec: bool  # SAELens's apply_b_dec_to_input

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def transcoder(self) -> bool:
        return self.arch.endswith("transcoder")

    def transcoder_kwargs(self) -> dict[str, Any]:
        """Our constructors' transcoder arguments for SAELens's transcoder architectures (none for an SAE)."""
        if not self.transcoder:
            return {}
        return {"output_dim": self.d_out, "transcoder": True, "skip_connection": "W_skip" in self.extra}

    @property
    def shift_F(self) -> torch.Tensor:
        """What a class that always subtracts b_dec must add to its encoder bias when SAELens did not."""
        return torch.zeros(self.d_sae) if self.subtracts_b_dec else self.b_dec @ self.W_enc


class Dictionary(nn.Module):
    """A sparse dictionary: `encode` maps activations `[..., D]` to features `[..., F]`, `decode` back.

    Subclasses set `layout`, `bias_names` (tensors that `scale_biases` multiplies) and implement
    `encode`, `decode` and `_from_state_dict_shapes`.
    """

    activation_dim: int
    dict_size: int
    layout: ClassVar[FeatureLayout | None] = None
    bias_names: ClassVar[tuple[str, ...]] = ()
    # TopK-style classes keep threshold = -1 as "not yet estimated"; a negative one is never scaled.
    threshold_is_sentinel: ClassVar[bool] = False
    # Whether the class can be built as a transcoder (`_init_transcoder`); instances say if they are one.
    can_transcode: ClassVar[bool] = False
    transcoder: bool = False
    skip_connection: bool = False
    # The bias an SAE of this class subtracts before encoding: its output bias, tied (a transcoder
    # gets an input bias `b_in` of its own instead). None: the encoder reads its input as it is.
    tied_input_bias: ClassVar[str | None] = None

    @property
    def input_shift(self) -> torch.Tensor | None:
        """What the encoder subtracts from its input: the tied output bias of an SAE, a transcoder's
        own `b_in` (its input and output live in different spaces), or None."""
        if self.tied_input_bias is None:
            return None
        return self.b_in if self.transcoder else getattr(self, self.tied_input_bias)

    @property
    def output_dim(self) -> int:
        """Width of what `decode` returns: `activation_dim`, unless a transcoder maps to another width."""
        value = self.__dict__.get("_output_dim")
        return self.activation_dim if value is None else value

    @output_dim.setter
    def output_dim(self, value: int) -> None:
        self.__dict__["_output_dim"] = value

    def _init_transcoder(
        self, activation_dim: int, output_dim: int | None, transcoder: bool, skip_connection: bool, device=None
    ) -> None:
        """Make this dictionary a transcoder when asked (or implied by a skip path or another output
        width): it then encodes an input and reconstructs another output. A class with a tied input
        bias (`tied_input_bias`) gets a parameter `b_in` of its own. A skip transcoder adds
        `x @ W_skip` (`[d_in, d_out]`, zero init: training starts from the plain transcoder;
        sparsify's name)."""
        if output_dim is not None and (
            isinstance(output_dim, bool) or not isinstance(output_dim, numbers.Integral) or output_dim < 1
        ):
            raise ValueError(f"output_dim must be a positive integer (or None: activation_dim), got {output_dim!r}")
        self.output_dim = activation_dim if output_dim is None else output_dim
        self.transcoder = bool(transcoder or skip_connection or self.output_dim != activation_dim)
        self.skip_connection = bool(skip_connection)
        if self.transcoder and self.tied_input_bias is not None:
            self.b_in = nn.Parameter(torch.zeros(activation_dim, device=device))
            self.bias_names = (*type(self).bias_names, "b_in")
        if self.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(activation_dim, self.output_dim, device=device))

    def _copy_saelens_skip(self, weights: SaelensWeights) -> None:
        """A SAELens skip transcoder's `W_skip` (`[d_out, d_in]` there) into ours."""
        if "W_skip" in weights.extra:
            self.W_skip.copy_(weights.extra["W_skip"].T)

    @staticmethod
    def _transcoder_kwargs(state_dict: dict[str, torch.Tensor], output_dim: int) -> dict[str, Any]:
        """The transcoder arguments of a state dict's shapes and optional keys (`_from_state_dict_shapes`)."""
        return {"output_dim": output_dim, "transcoder": "b_in" in state_dict, "skip_connection": "W_skip" in state_dict}

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip transcoder's linear path `x @ W_skip`; 0 for the others."""
        return x @ self.W_skip if self.skip_connection else 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(f, x_hat)` for training; classes may override it with a cheaper backward."""
        f = self.encode(x)
        return f, self.decode(f)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f) + self.skip(x)
        return (x_hat, f) if output_features else x_hat

    # ----------------------------------------------------------------------------------------- checks
    def _check_width(self, x: torch.Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.activation_dim:
            got = "a scalar" if x.ndim == 0 else f"width {x.shape[-1]} (shape {tuple(x.shape)})"
            raise ValueError(
                f"{type(self).__name__} expects inputs of width activation_dim={self.activation_dim} "
                f"in the last dimension, got {got}"
            )

    # ------------------------------------------------------------------------------- bias scaling
    def _scaled_tensor(self, name: str, t: torch.Tensor, scale: float) -> torch.Tensor:
        if name == "threshold" and self.threshold_is_sentinel and bool((t < 0).all()):
            return t
        return t * scale

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply every additive bias and threshold by `scale`, in place.

        For an input normalised as `x / s`, `scale_biases(s)` gives a dictionary with
        `new(x) == s * old(x / s)`: the normalisation is folded into the weights (spec section 7.4).
        """
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        for name in self.bias_names:
            t = tensors[name]
            t.copy_(self._scaled_tensor(name, t, scale))

    def scaled_state_dict(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the state dict with biases multiplied by `scale` (self unchanged)."""
        out = {}
        for name, t in self.state_dict().items():
            t = t.detach()
            if scale != 1.0 and name in self.bias_names:
                t = self._scaled_tensor(name, t, scale)
            out[name] = t.to("cpu", copy=True).contiguous()
        return out

    # ------------------------------------------------------------------------------ layout access
    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.get_parameter(name)
        except AttributeError:  # not a parameter: a buffer (get_parameter walks the path, no full scan)
            return self.get_buffer(name)

    def decoder_FD(self) -> torch.Tensor:
        """The decoder weight as a `[F, D]` view (row f = feature f's direction)."""
        name, dim = self.layout.decoder
        return feature_first(self._tensor(name), dim)

    def encoder_FD(self) -> torch.Tensor:
        """The encoder weight as a `[F, D]` view (row f = feature f's read-out direction)."""
        name, dim = self.layout.encoder
        return feature_first(self._tensor(name), dim)

    def feature_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """Every parameter indexed by feature, with its feature dimension (for resampling)."""
        entries = [self.layout.decoder, *self.layout.feature_biases]
        if self.layout.encoder is not None:
            entries.append(self.layout.encoder)
        return [(self.get_parameter(name), dim) for name, dim in entries]

    # ------------------------------------------------------------------------- construction & I/O
    def architecture_config(self) -> dict[str, Any]:
        """The constructor facts a loader needs, in config.json's `trainer` section vocabulary."""
        config = {"dict_class": type(self).__name__, "activation_dim": self.activation_dim, "dict_size": self.dict_size}
        if self.transcoder:
            config |= {"transcoder": True, "output_dim": self.output_dim, "skip_connection": self.skip_connection}
        return config

    @classmethod
    def _from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor], **kwargs: Any) -> Dictionary:
        """Build an (untrained) instance whose parameter shapes match `state_dict`."""
        raise NotImplementedError

    @classmethod
    def matches_state_dict(cls, keys: set[str], state_dict: dict[str, torch.Tensor] | None = None) -> bool:
        """Whether a state dict with these keys (and, when given, these tensors) belongs to this architecture."""
        expected = set(cls._keys_of(keys))
        fits = expected <= keys <= expected | set(cls._optional_keys())
        return fits and (state_dict is None or cls._shapes_fit(state_dict))

    @classmethod
    def _shapes_fit(cls, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether the tensors' ranks are this architecture's (told apart where two share their keys)."""
        return all(t.ndim <= 2 for t in state_dict.values() if isinstance(t, torch.Tensor))

    @classmethod
    def _optional_keys(cls) -> tuple[str, ...]:
        """Keys a variant of the architecture adds (a transcoder's input bias and skip path)."""
        return ("b_in", "W_skip") if cls.can_transcode else ()

    @classmethod
    def _expected_keys(cls) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def _keys_of(cls, keys: set[str]) -> tuple[str, ...]:
        """The keys a state dict with these keys must hold: `_expected_keys()`, unless the class's
        keys depend on its size (one decoder per layer: `W_dec.0`, `W_dec.1`, ...)."""
        return cls._expected_keys()

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        source: str = "state dict",
        **kwargs: Any,
    ) -> Dictionary:
        """Build an instance from a state dict (strict key and shape check; errors name `source`)."""
        expected = set(cls._keys_of(set(state_dict)))
        missing = expected - set(state_dict)
        unexpected = set(state_dict) - expected - set(cls._optional_keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: keys do not match {cls.__name__} "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )
        try:
            ae = cls._from_state_dict_shapes(state_dict, **kwargs)
            ae.load_state_dict(state_dict, strict=True)
        except (RuntimeError, ValueError) as e:
            detail = " ".join(str(e).replace("Error(s) in loading state_dict for", "").split())
            raise CheckpointError(f"{source}: cannot load into {cls.__name__}: {detail}") from e
        return ae.to(device=device, dtype=dtype) if (dtype or device) else ae

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Dictionary:
        """Load weights from `ae.pt` / `ae.safetensors`, or from a folder holding one of them.

        Loading never executes code from the file. `dtype`/`device` cast the result when given.
        """
        from ..hub import download, is_hub_address  # below this module; imported here to keep import light

        if is_hub_address(path):
            path = download(path)
        weights, _ = read_checkpoint(path)
        ae = cls.from_state_dict(weights.state_dict, source=weights.source, **kwargs)
        if weights.bias_scale != 1.0:
            ae.scale_biases(weights.bias_scale)
        return ae.to(device=device, dtype=dtype) if (dtype or device) else ae

    def save_pretrained(self, folder: str | Path, config: dict | None = None, safetensors: bool = False) -> Path:
        """Write `ae.pt` (or `ae.safetensors`) and `config.json` into `folder`; returns the weights path."""
        return save_dictionary(self, folder, config=config, safetensors=safetensors)

    def push_to_hub(self, repo_id: str, folder: str = "", **kwargs: Any) -> str:
        """Upload to the Hugging Face Hub (see `hub.push_to_hub`); returns the `hf://` address to load."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, folder, **kwargs)

    # ---------------------------------------------------------------------------------------- SAELens
    # SAELens's architecture name that this class reads (set by the class itself, not inherited).
    saelens_architecture: ClassVar[str | None] = None

    @classmethod
    def claims_saelens(cls, weights: SaelensWeights) -> bool:
        """Whether `from_saelens` converts these SAELens weights (see `dictionaries.saelens`)."""
        return weights.arch == cls.__dict__.get("saelens_architecture")

    @classmethod
    def from_saelens(cls, weights: SaelensWeights) -> Dictionary:
        """An instance equal to the parsed SAELens SAE `weights` (which `claims_saelens` accepted)."""
        raise NotImplementedError(f"{cls.__name__} does not read SAELens weights")

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """SAELens config fields beyond d_in/d_sae/apply_b_dec_to_input, and its state dict, exactly."""
        raise ValueError(f"{type(self).__name__} has no SAELens equivalent")

    def saelens_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(SAELens config fields, SAELens state dict) describing this dictionary exactly."""
        fields, state = self.to_saelens()
        base = {"d_in": self.activation_dim, "d_sae": self.dict_size, "apply_b_dec_to_input": True}
        if self.transcoder:
            base, (fields, state) = base | {"d_out": self.output_dim}, self._saelens_transcoder(fields, state)
        return base | fields, {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def _saelens_transcoder(self, fields: dict[str, Any], state: dict[str, torch.Tensor]):
        """SAELens's transcoder architectures: "transcoder" (ReLU, from our Standard) and
        "jumprelu_transcoder" (from JumpReLU, or BatchTopK's threshold inference), "skip_" variants
        with `W_skip [d_out, d_in]`. SAELens's transcoders subtract nothing from their input: our
        input bias `b_in` is folded into `b_enc`."""
        names = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
        arch = names.get(fields["architecture"])
        if arch is None:
            raise ValueError(
                f"SAELens has no {fields['architecture']!r} transcoder: export a Standard, JumpReLU or BatchTopK "
                f"transcoder (a {type(self).__name__} transcoder has no SAELens equivalent)"
            )
        state = dict(state)
        if hasattr(self, "b_in"):
            state["b_enc"] = state["b_enc"] - self.b_in @ state["W_enc"]
        if self.skip_connection:
            state["W_skip"] = self.W_skip.T
            arch = arch.replace("transcoder", "skip_transcoder")
        return {**fields, "architecture": arch, "apply_b_dec_to_input": False}, state

    def save_saelens(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """Write a SAELens folder (`cfg.json` + `sae_weights.safetensors`) that
        `sae_lens.SAE.load_from_disk(folder)` loads with the same outputs; `metadata` (e.g.
        `model_name`, `hook_name`) goes into the config's `metadata` field."""
        fields, state = self.saelens_state()
        return write_saelens_folder(fields, state, folder, metadata)

    def extra_repr(self) -> str:
        return f"activation_dim={self.activation_dim}, dict_size={self.dict_size}"
