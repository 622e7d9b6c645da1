"""Our package against the reference's public API (saprmarks/dictionary_learning at 60ec6bf): every
module and name importable from where the reference has it, every parameter of the reference in the
same positional order, and no new required parameter. The reference's API is
tests/fixtures/reference_api.json (made by tools/reference_api_to_json.py). Differences not yet
closed are listed in KNOWN_DIFFERENCES with their reason; the list may only shrink."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

ENTRIES = json.loads((Path(__file__).parent / "fixtures" / "reference_api.json").read_text())


def resolve(entry: dict):
    module = importlib.import_module(entry["module"])
    obj = module
    for part in filter(None, entry["name"].split(".")):
        obj = getattr(obj, part) if not isinstance(obj, type) else inspect.getattr_static(obj, part)
    return obj


def our_parameters(entry: dict, obj) -> list[inspect.Parameter]:
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    target = obj  # a class: inspect.signature(cls), the signature its callers see
    params = list(inspect.signature(target).parameters.values())
    if params and params[0].name in ("self", "cls") and entry["kind"] != "staticmethod":
        params = params[1:]
    return params


def differences(entry: dict) -> list[str]:
    """What code written against the reference's entry would find different here."""
    where = f"{entry['module']}{'.' + entry['name'] if entry['name'] else ''}"
    try:
        obj = resolve(entry)
    except (ImportError, AttributeError) as e:
        return [f"{where}: missing ({type(e).__name__}: {e})"]
    if "params" not in entry:
        return []
    try:
        ours = our_parameters(entry, obj)
    except (TypeError, ValueError):
        return []  # no signature to compare (a builtin)
    problems = []
    positional = [p for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in ours}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in ours)
    reference_positional = [p for p in entry["params"] if p["kind"] == "positional"]
    for i, ref in enumerate(reference_positional):
        if i >= len(positional) or positional[i].name != ref["name"]:
            got = positional[i].name if i < len(positional) else "nothing"
            problems.append(f"{where}: positional parameter {i} is {got!r}, the reference has {ref['name']!r}")
            break
    for ref in entry["params"]:
        if ref["kind"] in ("*args", "**kwargs"):
            continue
        if ref["name"] not in by_name and not takes_kwargs:
            problems.append(f"{where}: no parameter {ref['name']!r}")
    reference_names = {p["name"] for p in entry["params"]}
    for p in ours:
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and p.name not in reference_names:
            problems.append(f"{where}: new required parameter {p.name!r}")
    return problems


# Differences still open (issue 19), each with its reason; an entry that no longer differs fails
# the test below, so that the list only shrinks.
KNOWN_DIFFERENCES: dict[str, str] = json.loads(
    (Path(__file__).parent / "fixtures" / "reference_api_known_differences.json").read_text()
)


def test_the_reference_api_is_kept():
    found = [problem for entry in ENTRIES for problem in differences(entry)]
    new = [p for p in found if p not in KNOWN_DIFFERENCES]
    assert not new, "differences from the reference's API:\n" + "\n".join(new)


def test_the_list_of_known_differences_only_shrinks():
    found = {problem for entry in ENTRIES for problem in differences(entry)}
    closed = [p for p in KNOWN_DIFFERENCES if p not in found]
    assert not closed, "no longer differing; remove from the known list:\n" + "\n".join(closed)


@pytest.mark.parametrize("module", sorted({e["module"] for e in ENTRIES}))
def test_listed_modules_are_covered(module):
    assert any(e["module"] == module for e in ENTRIES)
