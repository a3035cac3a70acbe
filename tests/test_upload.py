"""Upload: refuses what verify rejects, --dry-run lists where files go without a token or network, and the real
path hands huggingface_hub a staging folder laid out as in the repo (the Hub client is replaced at its boundary)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from exporters.pack import feature_json_bytes, pack_entry, write_pack
from exporters.hub_upload import plan_upload, upload
from featurestore.errors import UserError


def document(layer: int, feature: int) -> dict:
    return {"layer": layer, "feature": feature, "examples_quantiles": [{"quantile_name": "Top activations", "examples": [
        {"tokens": ["a", "b"], "tokens_acts_list": [0.0, 1.5], "train_token_ind": 1, "is_repeated_datapoint": False}]}]}


@pytest.fixture()
def pack(tmp_path) -> Path:
    out = tmp_path / "features"
    write_pack(out, range(2), 3, ((l, f, pack_entry(feature_json_bytes(document(l, f)))) for l in range(2) for f in (0, 2)))
    return out


class RecordingHub:
    """Stands in for HfApi at the network boundary; records each call and what the staging folder holds."""

    def __init__(self):
        self.calls = []
        self.staged = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_large_folder(self, **kwargs):
        self.calls.append(("upload_large_folder", kwargs["repo_id"], {k: v for k, v in kwargs.items() if k != "folder_path"}))
        root = Path(kwargs["folder_path"])
        self.staged = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class ExplodingHub:
    def __getattr__(self, name):
        raise AssertionError(f"the Hub was contacted ({name}) for a directory that should have been refused")


def test_dry_run_lists_destinations_and_scan(pack, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["upload", str(pack), "--repo", "me/feats", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sizes = {name: (pack / name).stat().st_size for name in ("index.json.gz", "layer_0.bin", "layer_1.bin")}
    for name, size in sizes.items():
        assert f"{name} -> https://huggingface.co/me/feats/blob/main/features/{name} ({size} bytes)" in lines
    assert f"3 files, {sum(sizes.values())} bytes, pack from {pack}" in lines
    assert lines[-1] == "scan: me/feats"
    assert main(["upload", str(pack), "--repo", "me/feats", "--path-in-repo", "tc/l0/features", "--revision", "v1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "blob/v1/tc/l0/features/layer_1.bin" in out and out.splitlines()[-1] == "scan: me/feats//tc/l0@v1"
    assert main(["upload", str(pack), "--repo", "me/feats", "--path-in-repo", "packs", "--dry-run"]) == 0
    assert "no scan string reaches this one" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "missing_layer"])
def test_refuses_a_pack_that_verify_rejects(pack, capsys, damage):
    layer_file = pack / "layer_1.bin"
    data = layer_file.read_bytes()
    if damage == "truncate":
        layer_file.write_bytes(data[:-7])
    elif damage == "corrupt":
        layer_file.write_bytes(data[:20] + bytes(b ^ 0x5A for b in data[20:30]) + data[30:])
    else:
        layer_file.unlink()
    with pytest.raises(UserError, match="fails verification"):
        upload(pack, "me/feats", api=ExplodingHub())
    assert main(["upload", str(pack), "--repo", "me/feats", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fails verification" in err and err.count("\n") == 1


def test_bad_repo_id_and_path(pack):
    with pytest.raises(UserError, match="OWNER/NAME"):
        plan_upload(pack, "just-a-name")
    with pytest.raises(UserError, match="'..'"):
        plan_upload(pack, "me/feats", path_in_repo="../x")


def test_upload_stages_files_under_path_in_repo(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hub = RecordingHub()
    plan = upload(pack, "me/feats", path_in_repo="sub/features", revision="v2", private=True, api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_large_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["branch"] == "v2"
    assert hub.calls[2][2] == {"repo_id": "me/feats", "repo_type": "model", "revision": "v2", "private": True}
    assert hub.staged == {f"sub/features/{name}": (pack / name).read_bytes() for name in ("index.json.gz", "layer_0.bin", "layer_1.bin")}
    assert plan.scan() == "me/feats//sub@v2"
    # a rerun (resume) reuses the same staging folder; files that vanished from the source are unstaged
    (pack / "extra.txt").write_text("note")
    upload(pack, "me/feats", path_in_repo="sub/features", revision="v2", api=hub)
    assert "sub/features/extra.txt" in hub.staged
    (pack / "extra.txt").unlink()
    upload(pack, "me/feats", path_in_repo="sub/features", revision="v2", api=hub)
    assert "sub/features/extra.txt" not in hub.staged
    assert len(list((tmp_path / "cache" / "featurestore" / "uploads").iterdir())) == 1


def test_missing_token_is_one_line_error(pack, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    assert main(["upload", str(pack), "--repo", "me/feats"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`\n"


def test_hub_errors_are_one_line(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    class FailingHub(RecordingHub):
        def create_repo(self, repo_id, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nmore")

    with pytest.raises(UserError) as info:
        upload(pack, "me/feats", api=FailingHub())
    assert str(info.value) == "upload to me/feats failed: RuntimeError: 401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create"
