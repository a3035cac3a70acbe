"""Errors users can fix are one line, never a traceback: bad bytes, missing devices, full disks, old formats,
backwards layer ranges; and what a failed or killed export leaves behind (nothing)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from conftest import make_rows, write_jsonl
from exporters.integrity import verify
from exporters.staging import staged_directory

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """The command failed with exactly one ``error:`` line (progress bars aside) and no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store_copy(tiny, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny["store_path"], dst)
    return dst


def test_invalid_utf8_names_line_and_byte_offset(tiny, tmp_path, capsys):
    lines = [json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in make_rows(3)]
    bad = lines[1].replace(b'"user"', b'"us\xff\xfer"', 1)
    (tmp_path / "bad.jsonl").write_bytes(lines[0] + bad + lines[2])
    column = bad.index(b"\xff")
    offset = len(lines[0]) + column
    code, _, err = run(capsys, "collect", "--model", tiny["model"], "--data", tmp_path / "bad.jsonl",
                       "--store", tmp_path / "s")
    one_line_error(code, err, "bad.jsonl line 2: invalid UTF-8", f"byte offset {offset} in the file",
                   f"byte {column + 1} of the line: ff)")
    assert not (tmp_path / "s").exists()


def test_missing_device_lists_the_devices_that_exist(tiny, tmp_path, capsys):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code, _, err = run(capsys, "collect", "--model", tiny["model"], "--data", tiny["data"], "--store", tmp_path / "s",
                       "--device", f"cuda:{count + 7}")
    expected = "CUDA is not available on this machine" if count == 0 else f"this machine has {count} CUDA device"
    one_line_error(code, err, f"--device cuda:{count + 7}", expected, "devices here: cpu")
    code, _, err = run(capsys, "collect", "--model", tiny["model"], "--data", tiny["data"], "--store", tmp_path / "s",
                       "--device", "warp:0")
    one_line_error(code, err, "unknown --device 'warp:0'", "this machine has cpu")
    assert not (tmp_path / "s").exists()


def test_backwards_layer_range(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "collect", "--model", tiny["model"], "--data", tiny["data"], "--store", tmp_path / "s",
                       "--layers", "3-1")
    one_line_error(code, err, "bad --layers '3-1'", "runs backwards; write 1-3")
    code, _, err = run(capsys, "export", "json", tiny["store_path"], "--out", tmp_path / "o", "--layers", "2-0")
    one_line_error(code, err, "runs backwards; write 0-2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("version, needle", [("1", "has store format '1' (a str in featurestore.json, not an integer)"),
                                             (3, "has store format 3; this featurestore reads formats 1, 2 (upgrade"),
                                             (None, "has store format unknown")])
def test_format_version_message_tells_the_versions_apart(store_copy, capsys, version, needle):
    manifest = json.loads((store_copy / "featurestore.json").read_text())
    manifest["format_version"] = version
    (store_copy / "featurestore.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "info", store_copy)
    line = one_line_error(code, err, needle)
    assert "reads 1" not in line.replace("reads format 1", "")


# ---- full disks: a real tmpfs of a few hundred KB, mounted in a private mount namespace ----

def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")


def on_small_disk(mount: Path, size_kb: int, command: list[str], after: str = "") -> subprocess.CompletedProcess:
    """Run the CLI with ``mount`` a tmpfs of ``size_kb``; ``after`` (shell) runs in the same namespace afterwards."""
    mount.mkdir()
    cli = " ".join(f"'{part}'" for part in [sys.executable, "-m", "cli.main", *command])
    script = f"mount -t tmpfs -o size={size_kb}k tmpfs '{mount}' && {{ {cli}; echo \"rc=$?\" >&2; }}; {after}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, env=env)


def _rc(result: subprocess.CompletedProcess) -> int:
    return int([line for line in result.stderr.splitlines() if line.startswith("rc=")][-1][3:])


@needs_tmpfs
def test_full_disk_during_collect_keeps_a_resumable_store(tiny, tmp_path):
    import featurestore as fs

    mount, partial = tmp_path / "disk", tmp_path / "partial"
    result = on_small_disk(mount, 320, ["collect", "--model", str(tiny["model"]), "--data", str(tiny["data"]),
                                        "--store", str(mount / "store"), "--chunk-size", "8", "--batch-tokens", "512"],
                           after=f"cp -a '{mount}/store' '{partial}'")
    one_line_error(_rc(result), result.stderr, f"cannot write {mount / 'store'}: No space left on device;",
                   "committed chunks are kept")
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp")]  # no half-written file left
    store = fs.open(partial)
    for record in store.manifest["chunks"]:  # every committed file is whole
        for files in record["files"].values():
            assert all((partial / f).is_file() for f in files)
    assert len(store.manifest["chunks"]) < 5  # the disk did run out before the end
    fs.collect(str(tiny["model"]), str(tiny["data"]), partial, chunk_size=8, batch_tokens=512, progress=False)
    query = "SELECT layer, feature, seq_id, pos, act FROM activations ORDER BY ALL"
    assert fs.open(partial).sql(query).fetchall() == tiny["store"].sql(query).fetchall()


@needs_tmpfs
@pytest.mark.parametrize("kind, workers", [("json", "1"), ("json", "2"), ("pack", "1"), ("metadata", None)])
def test_full_disk_during_export_leaves_no_output(tiny, tmp_path, kind, workers):
    mount = tmp_path / "disk"
    out = mount / "out"
    size = len(_metadata_bytes(tiny)) if kind == "metadata" else 0  # a disk of half the file
    result = on_small_disk(mount, max(size // 2048, 4) if kind == "metadata" else 256,
                           ["export", kind, str(tiny["store_path"]), "--out", str(out)] +
                           (["--workers", workers] if workers else []),
                           after=f"ls -A '{mount}' >&2; echo listed >&2")
    if kind == "metadata":
        one_line_error(_rc(result), result.stderr, f"cannot write {out / 'feature_metadata.json'}: No space left")
    else:
        final = out / "features" if kind == "json" else out
        one_line_error(_rc(result), result.stderr, f"cannot write {final}: No space left on device",
                       "nothing was written there")
    listing = result.stderr.split(f"rc={_rc(result)}\n", 1)[1].split("listed")[0]
    assert listing.strip() == ""  # no output folder, no staging folder, no empty parent


def _metadata_bytes(tiny) -> bytes:
    from exporters.metadata import feature_metadata

    return json.dumps(feature_metadata(tiny["store"])).encode()


# ---- what failed and killed exports leave behind ----

def test_failed_export_removes_the_folders_it_created(tmp_path):
    final = tmp_path / "a" / "b" / "features"
    with pytest.raises(RuntimeError):
        with staged_directory(final, replaceable=lambda p: True) as staging:
            (staging / "1.json").write_text("{}")
            raise RuntimeError("render failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "kept" / "features", replaceable=lambda p: True):
            raise RuntimeError("render failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kind", ["json", "pack"])
def test_stale_staging_folders_are_cleaned_on_the_next_run(tiny, tmp_path, capsys, kind):
    out = tmp_path / "out"
    parent, name = (out, "features") if kind == "json" else (tmp_path, "out")
    parent.mkdir(exist_ok=True)
    host = socket.gethostname()
    stale = [parent / f".{name}.tmp-0123abcd", parent / f".{name}.tmp-{host}-{_dead_pid()}-0123abcd"]
    live = parent / f".{name}.tmp-{host}-{os.getpid()}-89abcdef"  # a run still going (this process) is left alone
    for folder in stale + [live]:
        folder.mkdir()
        (folder / "0.json").write_text("{}")
    code, _, err = run(capsys, "export", kind, tiny["store_path"], "--out", out, "--workers", "1")
    assert code == 0, err
    assert [p.exists() for p in stale] == [False, False] and live.exists()
    assert verify(parent / name).ok
