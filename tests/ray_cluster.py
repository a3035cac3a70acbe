"""One local Ray instance for the Ray tests, bound to 127.0.0.1, started once per test session.

Imported by the tests/test_ray*.py modules; tests skip when Ray (the ``featurestore[ray]`` extra) is absent.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'featurestore[ray]')")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local cluster, no dashboard, loopback only; left to Ray's own exit handler at session end."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node address 127.0.0.1 (read at import)
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    return ray


def snapshot(store_path) -> dict:
    """Every view of a store, fully ordered: two stores with equal snapshots hold the same rows."""
    import featurestore as fs

    store = fs.open(store_path)
    out = {}
    for view, order in [("activations", "source, layer, feature, seq_id, pos"), ("feature_stats", "source, layer, feature, n_active, sum_act, max_act"),
                        ("tokens", "seq_id, pos"), ("sequences", "seq_id"), ("logit_lens", "source, layer, feature, side, rank"),
                        ("features", "source, layer, feature"), ("vocab", "token_id")]:
        out[view] = store.sql(f"SELECT * FROM {view} ORDER BY {order}").fetchall()
    return out


def chunk_files_on_disk(store_path) -> set[str]:
    """Every chunk file (and temporary) under the store, relative to it."""
    return {p.relative_to(store_path).as_posix() for p in store_path.rglob("*") if p.is_file() and p.name.lstrip(".").startswith("chunk-")}


def committed_files(store_path) -> set[str]:
    import featurestore as fs

    return {f for c in fs.open(store_path).manifest["chunks"] for files in c["files"].values() for f in files}
