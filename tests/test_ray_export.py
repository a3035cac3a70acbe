"""Exports on Ray (one task per layer) write the same bytes as the single-machine exports."""
from __future__ import annotations

from pathlib import Path

import pytest

from ray_cluster import needs_ray, ray_cluster  # noqa: F401


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_exports(tiny, tmp_path_factory):
    from exporters.feature_json import export_json, export_pack

    root = tmp_path_factory.mktemp("local-export")
    export_pack(tiny["store"], root / "pack", workers=1, progress=False)
    export_pack(tiny["store"], root / "pack-stub", layers=[0, 2], dead_stub=True, level=3, workers=1, progress=False)
    export_json(tiny["store"], root / "json", workers=1, progress=False)
    return root


@needs_ray
def test_distributed_pack_is_byte_identical(tiny, ray_cluster, local_exports, tmp_path):  # noqa: F811
    from exporters.distributed import export_pack_distributed

    summary = export_pack_distributed(tiny["store"], tmp_path / "pack", progress=False)
    local, remote = _tree(local_exports / "pack"), _tree(tmp_path / "pack")
    assert sorted(local) == ["index.json.gz", "layer_0.bin", "layer_1.bin", "layer_2.bin"]
    assert remote == local
    assert summary.bytes_written == sum(len(v) for k, v in remote.items() if k.endswith(".bin"))
    assert summary.entries == tiny["store"].sql("SELECT count(*) FROM features WHERE source = 'transcoder'").fetchall()[0][0]
    # a subset of layers, dead stubs and another gzip level: the tasks get every option
    export_pack_distributed(tiny["store"], tmp_path / "pack-stub", layers=[0, 2], dead_stub=True, level=3, progress=False)
    assert _tree(tmp_path / "pack-stub") == _tree(local_exports / "pack-stub")


@needs_ray
def test_cli_distributed_json_is_byte_identical(tiny, ray_cluster, local_exports, tmp_path, capsys):  # noqa: F811
    from cli.main import main

    code = main(["export", "json", str(tiny["store_path"]), "--out", str(tmp_path / "json"), "--no-metadata", "--ray"])
    assert code == 0, capsys.readouterr().err
    local, remote = _tree(local_exports / "json" / "features"), _tree(tmp_path / "json" / "features")
    assert len(local) > 50 and remote == local
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind
