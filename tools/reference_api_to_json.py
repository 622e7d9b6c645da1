"""Turn the reference's public API listing (shared/reference/reference_api.md: modules, names and the
`inspect.signature` of each, read from saprmarks/dictionary_learning at 60ec6bf) into the JSON that
tests/test_api_surface.py checks our package against.

    python tools/reference_api_to_json.py ../shared/reference/reference_api.md tests/fixtures/reference_api.json

Each entry: module, name (`Class.method` for methods), kind (class, function, method, classmethod,
property, constant) and, for callables, the parameters in order: name, kind (positional, *args,
keyword-only, **kwargs) and whether it has a default.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ENTRY = re.compile(
    r"^(?P<indent>\s*)- (?P<kind>class |classmethod |property |staticmethod )?`(?P<body>[^`]+)`(?P<rest>.*)$"
)


def split_params(signature: str) -> list[str]:
    """Top-level comma-separated parts of a parameter list (brackets and quotes respected)."""
    parts, depth, current, quote = [], 0, "", None
    for ch in signature:
        if quote:
            current += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_params(text: str) -> list[dict]:
    params, keyword_only = [], False
    for part in split_params(text):
        if part in ("self", "cls"):
            continue
        if part == "*":
            keyword_only = True
            continue
        if part.startswith("**"):
            params.append({"name": part[2:].split(":")[0].strip(), "kind": "**kwargs", "default": True})
            continue
        if part.startswith("*"):
            params.append({"name": part[1:].split(":")[0].strip(), "kind": "*args", "default": True})
            keyword_only = True
            continue
        name = re.split(r"[:=]", part, maxsplit=1)[0].strip()
        params.append({"name": name, "kind": "keyword-only" if keyword_only else "positional", "default": "=" in part})
    return params


def parse(markdown: str) -> list[dict]:
    entries, module, owner = [], None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            module, owner = line[3:].strip(), None
            entries.append({"module": module, "name": "", "kind": "module", "reexport": False})
            continue
        match = ENTRY.match(line)
        if module is None or match is None:
            continue
        body, kind, nested = match["body"], (match["kind"] or "").strip(), bool(match["indent"])
        name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", body).group(0)
        entry = {"module": module}
        if kind == "property" or body.endswith("<property>"):
            entry |= {"name": f"{owner}.{name}", "kind": "property"}
        elif "(" in body:
            inner = body[body.index("(") + 1 : body.rindex(")")]
            if kind == "class":
                owner = name
                entry |= {"name": name, "kind": "class"}
            elif nested:
                entry |= {"name": f"{owner}.{name}", "kind": kind or "method"}
            else:
                entry |= {"name": name, "kind": "function"}
            entry["params"] = parse_params(inner)
        else:
            entry |= {"name": name, "kind": "constant"}
        entry["reexport"] = "re-export" in match["rest"]
        entries.append(entry)
    return entries


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    entries = parse(source.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"{len(entries)} entries -> {target}")


if __name__ == "__main__":
    main()
