"""Where a dictionary was trained, as config.json's "site" records it: written once per run from
the data's record (`site_record`) and read back by eval and features (`recorded_site`, which also
knows the published folders' names)."""

from __future__ import annotations

import re
from typing import Any

from .models import layer_of


def site_record(buffer: dict | None, trainer: dict[str, Any], key: str | int | None) -> dict[str, Any]:
    """Where a trainer's activations came from, as config.json's "site" records it: the model id,
    the module's dotted path, io and layer. From the buffer or cache when it says (the trainer's
    `lm_name` and `layer` otherwise: `trainer` is its config record); None where neither knows."""
    buffer = buffer or {}
    modules = buffer.get("modules") or {}
    module = modules.get(key) if isinstance(key, str) else next(iter(modules.values()), None)
    layer = layer_of(module) if module else None
    if buffer.get("stack_sites") or buffer.get("paired_model"):  # a crosscoder's sites: all of them, in order
        module = list(modules.values())
        layer = [layer_of(m) for m in module]
    return {
        "model": buffer.get("model") or trainer.get("lm_name"),
        "module": module,
        "io": buffer.get("io"),
        "layer": layer if layer is not None else trainer.get("layer"),
        "head": key if isinstance(key, int) else None,
    }


_PUBLISHED_SITE = re.compile(r"(?P<kind>attn|mlp|resid)_out_layer(?P<layer>\d+)|(?P<embed>embed)")
_PUBLISHED_SWEEP_SITE = re.compile(r"resid_post_layer_(?P<layer>\d+)")


def recorded_site(folder, config: dict) -> dict:
    """What a dictionary says about where it was trained: config.json's "site" (ours), else the
    trainer's lm_name / layer and the buffer's io, else the site a published folder's name
    encodes; missing entries are None."""
    site = dict(config.get("site") or {})
    trainer, buffer = config.get("trainer") or {}, config.get("buffer") or {}
    site["measured"] = bool(site.get("model"))  # recorded from the data, not a user's lm_name
    site.setdefault("model", None)
    if site["model"] is None:
        site["model"] = trainer.get("lm_name")
    site.setdefault("io", buffer.get("io"))
    if site.get("layer") is None:
        site["layer"] = trainer.get("layer")
    site.setdefault("module", None)
    published = _PUBLISHED_SITE.search(str(folder))
    sweep = _PUBLISHED_SWEEP_SITE.search(str(folder))
    if site["module"] is None and published:
        site["kind"] = "embed" if published["embed"] else published["kind"]
        site["layer"] = 0 if published["embed"] else int(published["layer"])
    elif site["module"] is None and sweep:
        site["kind"], site["layer"] = "resid", int(sweep["layer"])
    return site
