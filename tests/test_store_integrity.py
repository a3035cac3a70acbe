"""Verified files: every damaged-store case gives a one-line error naming the file (never a traceback, never an
export), `featurestore check` reports each problem on its own line, and old stores upgrade with one command."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import pytest

import featurestore as fs
from cli.main import main
from featurestore.checks import check_store, sha256_of

if importlib.util.find_spec("moto") is not None:
    from test_object_store import s3, s3_env  # noqa: F401 (fixtures: a moto S3 server on 127.0.0.1)

LAYER0 = "activations/source=transcoder/layer=0"


@pytest.fixture(scope="module")
def chunked(tiny, tmp_path_factory):
    """The tiny store collected without compaction: one activation file per chunk and layer."""
    path = tmp_path_factory.mktemp("chunked") / "store"
    fs.collect(str(tiny["model"]), str(tiny["data"]), path, chunk_size=8, batch_tokens=512, progress=False, compact=False)
    return path


@pytest.fixture
def damaged(chunked, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(chunked, dst)
    assert check_store(dst, progress=False) == []  # also refreshes the stat cache of the copy
    return dst


def _manifest(store):
    return json.loads((store / "featurestore.json").read_text())


def _write_manifest(store, data):
    (store / "featurestore.json").write_text(json.dumps(data))


def _garble(store):
    path = store / LAYER0 / "chunk-000001-000.parquet"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    return f"{LAYER0}/chunk-000001-000.parquet"


def _truncate(store):
    path = store / LAYER0 / "chunk-000002-000.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    return f"{LAYER0}/chunk-000002-000.parquet"


def _delete(store):
    (store / LAYER0 / "chunk-000003-000.parquet").unlink()
    return f"{LAYER0}/chunk-000003-000.parquet"


def _swap(store):
    shutil.copyfile(store / LAYER0 / "chunk-000000-000.parquet", store / LAYER0 / "chunk-000004-000.parquet")
    return f"{LAYER0}/chunk-000004-000.parquet"


def _listed_twice(store):
    data = _manifest(store)
    rel = data["chunks"][0]["files"]["activations"][0]
    data["chunks"][1]["files"]["activations"].append(rel)
    _write_manifest(store, data)
    return rel


def _outside(store):
    data = _manifest(store)
    data["chunks"][0]["files"]["activations"].append("../../etc/passwd")
    _write_manifest(store, data)
    return "../../etc/passwd"


def _null_manifest(store):
    (store / "featurestore.json").write_text("null")
    return "featurestore.json"


def _missing_vocab(store):
    (store / "vocab.parquet").unlink()
    return "vocab.parquet"


DAMAGE = {"garbled": (_garble, "wrong hash"), "truncated": (_truncate, "truncated"), "deleted": (_delete, "missing"),
          "swapped": (_swap, ""), "listed twice": (_listed_twice, "twice"), "outside": (_outside, "outside the store"),
          "null manifest": (_null_manifest, "corrupt"), "missing vocab": (_missing_vocab, "missing")}


def one_line_error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_store_gives_one_line_errors_and_no_export(damaged, tmp_path, capsys, case):
    damage, words = DAMAGE[case]
    rel = damage(damaged)
    out = tmp_path / "pack"
    for args in (["export", "pack", damaged, "--out", out, "--workers", "1"], ["sql", damaged, "SELECT sum(act) FROM activations"],
                 ["info", damaged], ["export", "json", damaged, "--out", tmp_path / "json", "--workers", "1"]):
        line = one_line_error(capsys, *args)
        assert rel in line and words in line, line
    assert not out.exists() and not (tmp_path / "json").exists()
    code = main(["check", str(damaged)])
    out_text, err = capsys.readouterr()
    if case == "null manifest":  # nothing to check against: the manifest itself is the problem
        assert code == 2 and rel in err and len(err.strip().splitlines()) == 1
        return
    assert code == 1
    problems = out_text.strip().splitlines()
    assert any(rel in p and words in p for p in problems), problems
    assert "Traceback" not in err


def test_api_refuses_damage_too(damaged):
    rel = _garble(damaged)
    with pytest.raises(fs.UserError, match=re.escape(rel) + ": wrong hash"):
        fs.open(damaged)


def test_check_names_every_problem_on_its_own_line(damaged, capsys):
    garbled, truncated, deleted = _garble(damaged), _truncate(damaged), _delete(damaged)
    extra = f"{LAYER0}/chunk-000099-000.parquet"
    shutil.copyfile(damaged / LAYER0 / "chunk-000000-000.parquet", damaged / extra)
    twice = _listed_twice(damaged)
    _outside(damaged)
    problems = check_store(damaged, progress=False)
    expected = {garbled: "wrong hash", truncated: "truncated", deleted: "missing", extra: "not listed",
                twice: "listed twice", "'../../etc/passwd'": "outside the store"}
    assert len(problems) == len(expected), problems
    for rel, words in expected.items():
        assert sum(1 for p in problems if p.startswith(rel) and words in p) == 1, (rel, problems)


def test_unlisted_extra_file_is_invisible_and_reported_by_check(damaged, tmp_path, capsys):
    before = fs.open(damaged).sql("SELECT count(*), sum(act) FROM activations").fetchall()
    extra = f"{LAYER0}/chunk-000099-000.parquet"
    shutil.copyfile(damaged / LAYER0 / "chunk-000000-000.parquet", damaged / extra)
    assert fs.open(damaged).sql("SELECT count(*), sum(act) FROM activations").fetchall() == before
    assert main(["check", str(damaged)]) == 1
    assert f"{extra}: present but not listed" in capsys.readouterr().out


def test_clean_store_checks_ok_and_records_hashes_of_the_bytes_written(chunked, capsys):
    assert main(["check", str(chunked)]) == 0
    assert "ok" in capsys.readouterr().out
    manifest = fs.open(chunked).manifest_obj
    hashes = manifest.hashes()
    listed = manifest.listed()
    assert set(listed) == set(hashes) and len(listed) > 20
    for rel in listed[:: max(1, len(listed) // 10)]:
        assert hashes[rel] == [(chunked / rel).stat().st_size, sha256_of(chunked / rel)]


def test_version_1_store_opens_and_upgrades_with_one_command(chunked, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(chunked, old)
    data = _manifest(old)
    data["format_version"] = 1
    data.pop("hashes")
    for record in data["chunks"]:
        record.pop("hashes")
    _write_manifest(old, data)
    (old / ".verified.json").unlink()
    expected = fs.open(chunked).sql("SELECT count(*), sum(act) FROM activations").fetchall()
    assert fs.open(old).sql("SELECT count(*), sum(act) FROM activations").fetchall() == expected
    assert "no recorded hash" in capsys.readouterr().err
    assert main(["check", str(old)]) == 1
    assert "no recorded hash" in capsys.readouterr().out
    assert main(["check", "--upgrade", str(old)]) == 0
    capsys.readouterr()
    assert _manifest(old)["format_version"] == 2
    assert fs.open(old).manifest_obj.hashes() == fs.open(chunked).manifest_obj.hashes()


def test_stale_manifest_temporaries_are_removed_by_the_next_writer(damaged):
    stale = damaged / ".featurestore.json.0badf00d.tmp"
    stale.write_text("{half a manif")
    assert check_store(damaged, progress=False) == [".featurestore.json.0badf00d.tmp: present but not listed in the manifest"]
    from featurestore.compaction import compact

    compact(damaged, progress=False)
    assert not stale.exists()
    assert check_store(damaged, progress=False) == []


@pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server]")
def test_check_compact_and_export_refusal_on_s3(tiny, s3, tmp_path, capsys):
    uri = "s3://stores/verified"
    fs.collect(str(tiny["model"]), str(tiny["data"]), uri, chunk_size=8, batch_tokens=512, progress=False, compact=False)
    assert main(["compact", uri]) == 0 and main(["check", uri]) == 0
    capsys.readouterr()
    store = fs.open(uri)
    assert store.sql("SELECT count(*), sum(act) FROM activations").fetchall() == \
        tiny["store"].sql("SELECT count(*), sum(act) FROM activations").fetchall()
    rel = store.manifest_obj.files("activations", "transcoder")[0]
    target = store.path / rel
    data = bytearray(target.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    target.write_bytes(bytes(data))
    assert main(["check", uri]) == 1
    assert f"{rel}: wrong hash" in capsys.readouterr().out
    line = one_line_error(capsys, "export", "pack", uri, "--out", tmp_path / "pack", "--workers", "1")
    assert rel in line and "wrong hash" in line
    assert not (tmp_path / "pack").exists()
