"""Collection on Ray actors: same rows as one process, recovery from a dead worker or driver, one commit per chunk."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import featurestore as fs
from cli.main import main
from ray_cluster import chunk_files_on_disk, committed_files, needs_ray, ray_cluster, snapshot  # noqa: F401

# The tiny fixture's store was collected in one process with these settings.
SETTINGS = dict(chunk_size=8, batch_tokens=512)


@pytest.fixture(scope="module")
def two_worker_store(tiny, ray_cluster, tmp_path_factory):  # noqa: F811
    """``featurestore collect --ray --num-workers 2`` into a new store: (path, exit status)."""
    out = tmp_path_factory.mktemp("ray") / "store"
    code = main(["collect", "-m", str(tiny["model"]), "-d", str(tiny["data"]), "-s", str(out), "--chunk-size", "8",
                 "--batch-tokens", "512", "--ray", "--num-workers", "2"])
    return out, code


@needs_ray
def test_cli_two_workers_equal_single_process(tiny, two_worker_store):
    out, code = two_worker_store
    assert code == 0
    assert snapshot(out) == snapshot(tiny["store_path"])
    manifest = fs.open(out).manifest
    chunks = sorted(c["chunk"] for c in manifest["chunks"])
    assert chunks == [0, 1, 2, 3, 4]
    assert all(len(c["attempt"]) == 8 and f".{c['attempt']}.parquet" in c["files"]["sequences"][0] for c in manifest["chunks"])
    assert manifest["compacted_tokens"]["chunks"] == chunks  # every chunk's tokens merged by the final compaction
    assert manifest["runs"][-1]["finished"] and manifest["runs"][-1]["workers"] == 2
    assert chunk_files_on_disk(out) == committed_files(out)


@needs_ray
def test_dead_worker_is_replaced_and_store_identical(tiny, ray_cluster, tmp_path):  # noqa: F811
    from featurestore.distributed import ClusterOptions, DriverStats, collect_distributed

    stats = DriverStats()
    out = tmp_path / "recovered"
    collect_distributed(str(tiny["model"]), str(tiny["data"]), out, ClusterOptions(num_workers=2, fail_after_chunks=1),
                        stats=stats, progress=False, **SETTINGS)
    assert stats.worker_failures == 1  # the first worker died on its second chunk, files written, never reported
    assert stats.chunks == 5 and stats.duplicates == 0
    assert snapshot(out) == snapshot(tiny["store_path"])
    assert chunk_files_on_disk(out) == committed_files(out)  # the dead attempt's files were swept


@needs_ray
def test_racing_attempt_is_never_committed_twice(tiny, ray_cluster, two_worker_store, tmp_path):  # noqa: F811
    from featurestore.data import open_dataset
    from featurestore.distributed import CollectWorker, DriverStats, commit_attempt
    from featurestore.manifest import Manifest

    out = tmp_path / "raced"
    shutil.copytree(two_worker_store[0], out)
    before = (out / "featurestore.json").read_bytes()
    # a second worker finishes chunk 2 after the first attempt was committed
    racer = ray_cluster.remote(CollectWorker).remote(str(tiny["model"]), str(out), dict(SETTINGS, progress=False))
    rows = list(open_dataset(str(tiny["data"])).rows(16, 24))
    record = ray_cluster.get(racer.run_chunk.remote(2, rows, (16, 24), True, "racer001"))
    ray_cluster.kill(racer)
    late_files = [f for files in record["files"].values() for f in files]
    assert late_files and all((out / f).is_file() and "racer001" in f for f in late_files)
    stats = DriverStats()
    assert commit_attempt(Manifest.load(out), record, stats) is False
    assert stats.duplicates == 1
    assert not any((out / f).exists() for f in late_files)
    assert (out / "featurestore.json").read_bytes() == before
    assert snapshot(out) == snapshot(tiny["store_path"])


_KILLABLE_DRIVER = """
import sys, time, ray
from featurestore.manifest import Manifest
from featurestore.distributed import ClusterOptions, collect_distributed
commit = Manifest.commit_chunk
def slow_commit(self, record):  # gives the test time to kill this driver between two commits
    commit(self, record)
    time.sleep(30)
Manifest.commit_chunk = slow_commit
ray.init(address=sys.argv[1], logging_level="warning", log_to_driver=False)
collect_distributed(sys.argv[2], sys.argv[3], sys.argv[4], ClusterOptions(num_workers=1), progress=False,
                    chunk_size=8, batch_tokens=512)
"""


@needs_ray
def test_killed_driver_loses_nothing_and_rerun_resumes(tiny, ray_cluster, tmp_path):  # noqa: F811
    from featurestore.distributed import ClusterOptions, DriverStats, collect_distributed

    out = tmp_path / "killed"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_DRIVER, address, str(tiny["model"]), str(tiny["data"]), str(out)],
                            env=os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    manifest = out / "featurestore.json"
    deadline, committed = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and committed == 0:
        try:
            committed = len(json.loads(manifest.read_text())["chunks"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            committed = 0
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed == 1 and proc.returncode == -signal.SIGKILL
    kept = json.loads(manifest.read_text())["chunks"]
    assert len(kept) == 1 and all((out / f).is_file() for files in kept[0]["files"].values() for f in files)
    stats = DriverStats()
    collect_distributed(str(tiny["model"]), str(tiny["data"]), out, ClusterOptions(num_workers=2), stats=stats,
                        progress=False, **SETTINGS)
    assert stats.chunks == 4 and stats.worker_failures == 0  # only the missing chunks ran
    final = fs.open(out).manifest
    unchanged = lambda c: {k: v for k, v in c.items() if k not in ("files", "hashes")} | {  # noqa: E731
        "files": {"sequences": c["files"]["sequences"]}}  # compaction took over activations, feature_stats, tokens
    assert [unchanged(c) for c in final["chunks"] if c["chunk"] == kept[0]["chunk"]] == [unchanged(kept[0])]
    assert snapshot(out) == snapshot(tiny["store_path"])
    assert chunk_files_on_disk(out) == committed_files(out)


def test_ray_flags_without_ray_name_the_extra(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    out = tmp_path / "never"
    code = main(["collect", "-m", str(tiny["model"]), "-d", str(tiny["data"]), "-s", str(out), "--ray", "--num-workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --ray needs Ray, an optional extra: pip install 'featurestore[ray]'"
    assert not out.exists()
    code = main(["collect", "-m", str(tiny["model"]), "-d", str(tiny["data"]), "-s", str(out), "--num-workers", "2"])
    assert code == 2 and "need --ray" in capsys.readouterr().err and not out.exists()
