"""Hub push and pull against a local folder standing in for the Hugging Face Hub (no network)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from dictionary_learning import hub, load_dictionary
from dictionary_learning.dictionaries import AutoEncoderTopK, JumpReluAutoEncoder
from dictionary_learning.hub import parse_hub_address

FIXTURES = Path(__file__).parent / "fixtures"


class LocalHub:
    """`HfApi` and `snapshot_download` over `root/<owner>/<repo>/`, with their calling conventions."""

    def __init__(self, root: Path):
        self.root, self.online, self.downloads = root, True, []

    def api(self, token=None):
        hub_ = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False):
                (hub_.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

            def upload_folder(self, repo_id, folder_path, path_in_repo=None, revision=None, commit_message=None):
                assert commit_message
                shutil.copytree(folder_path, hub_.root / repo_id / (path_in_repo or ""), dirs_exist_ok=True)

        return Api()

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, cache_dir=None, local_files_only=False):
        repo = self.root / repo_id
        if local_files_only and not self.online and repo_id not in self.downloads:
            raise FileNotFoundError("not cached")
        if not repo.is_dir():
            raise FileNotFoundError(f"404 {repo_id}")
        self.downloads.append(repo_id)
        out = self.root.parent / "hf_cache" / repo_id
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, out / rel)
        return str(out)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    fake = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", fake.api)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr("dictionary_learning.hub.hub_reachable", lambda timeout=5.0: fake.online)
    return fake


def test_parse_hub_address():
    assert parse_hub_address("hf://me/saes") == hub.HubAddress("me/saes", "", None)
    expected = hub.HubAddress("me/saes", "layer_3/trainer_0", "v1")
    assert parse_hub_address("hf://me/saes@v1/layer_3/trainer_0") == expected
    assert str(parse_hub_address("hf://me/saes@v1/a/b")) == "hf://me/saes@v1/a/b"
    with pytest.raises(ValueError, match="owner and repository"):
        parse_hub_address("hf://only-owner")


def test_push_then_load_same_layout_as_local(local_hub, tmp_path):
    torch.manual_seed(0)
    ae = AutoEncoderTopK(8, 32, 4)
    address = ae.push_to_hub("me/saes", "layer_3/trainer_0")
    assert address == "hf://me/saes/layer_3/trainer_0"
    pushed = local_hub.root / "me/saes/layer_3/trainer_0"
    assert sorted(p.name for p in pushed.iterdir()) == ["ae.safetensors", "config.json"]
    ae.save_pretrained(tmp_path / "local", safetensors=True)  # the same files as a local save
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["ae.safetensors", "config.json"]

    loaded, config = load_dictionary(address)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), ae(x))
    assert config["trainer"]["dict_class"] == "AutoEncoderTopK"
    again = AutoEncoderTopK.from_pretrained(address)
    torch.testing.assert_close(again(x), ae(x))


def test_saelens_folder_on_the_hub(local_hub):
    shutil.copytree(FIXTURES / "saelens" / "jumprelu", local_hub.root / "someone/gemma-like/layer_0")
    ae, cfg = load_dictionary("hf://someone/gemma-like/layer_0")
    assert isinstance(ae, JumpReluAutoEncoder) and cfg["architecture"] == "jumprelu"


def test_offline_uses_the_cache_or_names_the_repository(local_hub):
    AutoEncoderTopK(8, 32, 4).push_to_hub("me/saes", "a")
    load_dictionary("hf://me/saes/a")  # now cached
    local_hub.online = False
    load_dictionary("hf://me/saes/a")  # still loads, from the cache
    with pytest.raises(OSError, match="'me/other' is not in the local Hugging Face cache") as info:
        load_dictionary("hf://me/other/a")
    assert "\n" not in str(info.value)


def test_missing_folder_in_repository(local_hub):
    AutoEncoderTopK(8, 32, 4).push_to_hub("me/saes", "a")
    with pytest.raises(FileNotFoundError, match="has no folder 'b'"):
        load_dictionary("hf://me/saes/b")


def test_real_client_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the probe answers at once; huggingface_hub looks in its cache only
    with pytest.raises(OSError, match="'nobody-here/no-such-saes' is not in the local Hugging Face cache") as info:
        load_dictionary("hf://nobody-here/no-such-saes/layer_0")
    assert "\n" not in str(info.value)


def test_push_offline_names_the_repository(local_hub):
    local_hub.online = False
    with pytest.raises(OSError, match="cannot push to 'me/saes'"):
        AutoEncoderTopK(8, 32, 4).push_to_hub("me/saes", "a")
