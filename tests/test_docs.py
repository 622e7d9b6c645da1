"""The front door stays true: README is a front page whose relative links resolve, and every page
the documentation site lists exists (CI also runs `mkdocs build --strict`, which checks the links
between pages and the API page's docstrings)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(path.read_text()) if "://" not in t and not t.startswith("#")]


def test_readme_is_a_front_page_whose_links_resolve():
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: keep it a front page, move the rest to docs/"
    assert lines[3].startswith("bash tools/setup_env.sh && .venv/bin/python demos/demo.py")
    assert lines[4].startswith("bash tools/setup_env.sh && .venv/bin/python -m pytest -q")
    missing = [t for t in relative_links(readme) if not (ROOT / t.split("#")[0]).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"


def test_every_page_of_the_site_exists_and_every_doc_is_in_the_site():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = set(re.findall(r":\s+(\S+\.md)\s*$", config, re.M))
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == docs, f"in the nav but missing: {pages - docs}; not in the nav: {docs - pages}"
