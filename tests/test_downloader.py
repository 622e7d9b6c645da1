"""pretrained_dictionary_downloader.sh, run against file:// URLs standing in for the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import make_dictionary

from dictionary_learning import load_dictionary

SCRIPT = Path(__file__).parents[1] / "pretrained_dictionary_downloader.sh"
SITES = ["embed"] + [f"{kind}_layer{i}" for i in range(6) for kind in ("attn_out", "mlp_out", "resid_out")]


def run(dest: Path, url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DL_PRETRAINED_URL=url, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), str(dest)], env=env, capture_output=True, text=True)


@pytest.fixture
def archive(tmp_path) -> Path:
    """A small zip with the published layout (tiny AutoEncoders instead of 512 x 32768 ones)."""
    staging = tmp_path / "staging"
    for site in SITES:
        make_dictionary("AutoEncoder").save_pretrained(staging / "dictionaries/pythia-70m-deduped" / site / "10_32768")
    path = tmp_path / "dictionaries_pythia-70m-deduped_10.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in staging.rglob("*"):
            zf.write(file, file.relative_to(staging))
    return path


def test_downloads_unpacks_and_checks_every_site(tmp_path, archive):
    dest = tmp_path / "dest"
    result = run(dest, archive.as_uri())
    assert result.returncode == 0, result.stderr
    assert "done: 19 dictionaries" in result.stdout
    ae, _ = load_dictionary(dest / "dictionaries/pythia-70m-deduped/mlp_out_layer3/10_32768")
    assert type(ae).__name__ == "AutoEncoder"
    assert not (dest / archive.name).exists()
    again = run(dest, archive.as_uri())
    assert "already in" in again.stdout


def test_unreachable_source_gives_one_clear_error(tmp_path):
    result = run(tmp_path / "dest", (tmp_path / "nowhere.zip").as_uri())
    assert result.returncode == 1
    assert "error: could not download" in result.stderr and "Rerun this script" in result.stderr


def test_incomplete_archive_is_reported(tmp_path):
    path = tmp_path / "partial.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dictionaries/pythia-70m-deduped/embed/10_32768/ae.pt", b"x")
    result = run(tmp_path / "dest", path.as_uri())
    assert result.returncode == 1 and "archive lacks these files" in result.stderr
    assert not (tmp_path / "dest" / "dictionaries").exists()  # nothing half-unpacked that looks complete
    assert not (tmp_path / "dest" / ".unpacking").exists()
