"""Stores on an object store (s3://) against a real S3-compatible server on 127.0.0.1 (moto's server mode)."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time

import pytest

import featurestore as fs
from cli.main import main
from ray_cluster import needs_ray, ray_cluster, snapshot  # noqa: F401

pytestmark = pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server] (pip install 'moto[server]')")

SETTINGS = dict(chunk_size=8, batch_tokens=512, progress=False)  # the tiny fixture's store settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* settings that reach it (fake credentials)."""
    import pyarrow.fs as pafs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.1)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                          endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True).create_dir("stores")
        yield env
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def s3(s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return s3_env


def test_collect_resume_sql_and_info_on_s3(tiny, s3, capsys):
    uri = "s3://stores/interrupted"
    fs.collect(str(tiny["model"]), str(tiny["data"]), uri, stop_after_chunks=2, **SETTINGS)
    assert len(fs.open(uri).manifest["chunks"]) == 2
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), uri, **SETTINGS)  # resumes
    assert str(store.path) == uri and len(store.manifest["chunks"]) == 5
    assert snapshot(uri) == snapshot(tiny["store_path"])
    info = store.info()
    assert info["sources"]["transcoder"]["chunks"] == 5 and info["bytes_on_disk"] > 10_000
    assert store.feature(1, 3).top_examples(3) == tiny["store"].feature(1, 3).top_examples(3)

    assert main(["sql", uri, "select count(*) AS n from activations", "--format", "json"]) == 0
    expected = tiny["store"].sql("select count(*) from activations").fetchall()[0][0]
    assert json.loads(capsys.readouterr().out) == [{"n": expected}]
    assert main(["info", uri]) == 0
    assert "chunks=5" in capsys.readouterr().out
    assert main(["sql", "s3://stores/nothing-here", "select 1"]) == 2
    assert "not a feature store" in capsys.readouterr().err


@needs_ray
def test_ray_collection_into_s3_equals_single_process(tiny, s3, ray_cluster):  # noqa: F811
    from featurestore.distributed import ClusterOptions, collect_distributed

    uri = "s3://stores/on-ray"
    cluster = ClusterOptions(num_workers=2, runtime_env={"env_vars": s3})
    collect_distributed(str(tiny["model"]), str(tiny["data"]), uri, cluster, **SETTINGS)
    assert snapshot(uri) == snapshot(tiny["store_path"])
    root = fs.open(uri).path
    listed = {f for c in fs.open(uri).manifest["chunks"] for files in c["files"].values() for f in files}
    on_store = {p.relative_to(root).as_posix() for p in root.rglob("chunk-*")}
    assert on_store == listed
