"""`featurestore serve` without a browser: real HTTP on 127.0.0.1 against packs, JSON dirs, stores and graph dirs."""
from __future__ import annotations

import gzip
import http.client
import json
import os
from pathlib import Path

import pytest

from exporters import viewer_assets
from exporters.pack import feature_json_bytes, pack_entry, write_pack
from exporters.pack_reader import decode_entry
from exporters.serve import ViewerConfig, ViewerServer, notices, parse_range
from exporters.serve_features import FeatureSource, JsonDirSource, PackSource, StoreSource, open_features_dir
from featurestore.errors import UserError
from featurestore.ids import cantor

N_FEATURES = 6


def feature_doc(layer: int, feature: int) -> dict:
    """A small but complete viewer document whose text names its feature."""
    word = f"word{layer}x{feature}"
    return {"examples_quantiles": [{"quantile_name": "Top activations", "examples": [
                {"tokens": ["a", f" {word}", " b"], "tokens_acts_list": [0.0, 1.5 + feature, 0.0],
                 "train_token_ind": 1, "is_repeated_datapoint": False}]}],
            "top_logits": [f"top{feature}"], "bottom_logits": [f"bottom{feature}"], "act_min": 0.0, "act_max": 9.0,
            "layer": layer, "index": feature}


LIVE = {(0, 1), (0, 4), (1, 0), (1, 5)}  # (0, 2), (1, 3) ... have no entry: dead


def write_graph_dir(root: Path, scan: str) -> Path:
    graphs = root / "graphs"
    graphs.mkdir()
    nodes = [{"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "influence": 0.1},
             {"node_id": "0_1_0", "feature": cantor(0, 1), "layer": "0", "ctx_idx": 0,
              "feature_type": "cross layer transcoder", "influence": 0.3, "activation": 2.0},
             {"node_id": "3_7_0", "feature": 7, "layer": "3", "ctx_idx": 0, "feature_type": "logit",
              "clerp": 'Output "x" (p=0.900)', "token_prob": 0.9, "influence": None}]
    metadata = {"slug": "g1", "scan": scan, "transcoder_list": [], "prompt_tokens": ["x"], "prompt": "x",
                "node_threshold": 0.8, "schema_version": 1}
    graph = {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                               "sg_pos": ""},
             "nodes": nodes, "links": [{"source": "E_5_0", "target": "0_1_0", "weight": 1.0},
                                       {"source": "0_1_0", "target": "3_7_0", "weight": 0.5}]}
    (graphs / "g1.json").write_text(json.dumps(graph))
    (graphs / "graph-metadata.json").write_text(json.dumps({"graphs": [metadata]}))
    return graphs


@pytest.fixture()
def pack_dir(tmp_path) -> Path:
    entries = [(layer, feature, pack_entry(feature_json_bytes(feature_doc(layer, feature))))
               for layer, feature in sorted(LIVE)]
    write_pack(tmp_path / "pack", [0, 1], N_FEATURES, entries)
    return tmp_path / "pack"


@pytest.fixture()
def json_dir(tmp_path) -> Path:
    out = tmp_path / "json" / "features"
    out.mkdir(parents=True)
    for layer, feature in LIVE:
        (out / f"{cantor(layer, feature)}.json").write_bytes(feature_json_bytes(feature_doc(layer, feature)))
    return tmp_path / "json"


class Running:
    def __init__(self, config: ViewerConfig, **kwargs):
        self.server = ViewerServer(config, port=0, **kwargs)
        self.server.start_in_thread()
        self.host, self.port = self.server.server_address[:2]

    def request(self, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
        """Sends ``path`` byte for byte (no client-side normalisation of '..')."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for key, value in {**(headers or {}), **({"Content-Length": str(len(body))} if body else {})}.items():
                connection.putheader(key, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture()
def serve(tmp_path):
    running = []

    def start(graphs: Path, source: FeatureSource | None = None, assets: Path | None = None) -> Running:
        config = ViewerConfig(graphs, source or FeatureSource(), assets=assets or viewer_assets.default_assets_dir())
        running.append(Running(config))
        return running[-1]

    yield start
    for item in running:
        item.server.stop()


def test_binds_loopback_by_default(tmp_path):
    config = ViewerConfig(write_graph_dir(tmp_path, "./data/features"), FeatureSource())
    server = ViewerServer(config, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server.socket.getsockname()[0] == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.server_close()
    from cli.main import cli

    params = {p.name: p.default for p in cli.commands["serve"].params}
    assert params["host"] == "127.0.0.1" and params["port"] == 8042
    assert any("anyone who can reach" in line for line in notices(config, "0.0.0.0"))
    assert not any("anyone who can reach" in line for line in notices(config, "127.0.0.1"))


def test_range_reads_of_pack_files(tmp_path, pack_dir, serve):
    site = serve(write_graph_dir(tmp_path, "someone/features-repo"), PackSource(pack_dir))
    layer_bytes = (pack_dir / "layer_1.bin").read_bytes()
    size = len(layer_bytes)

    status, headers, body = site.request("/features/index.json.gz", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and "Content-Encoding" not in headers and body == (pack_dir / "index.json.gz").read_bytes()
    offsets = json.loads(gzip.decompress(body))["1"]["offsets"]

    # the viewer's read: bytes=offsets[f]-offsets[f+1] (one spare byte), then decode the entry
    start, end = offsets[5], offsets[6]
    status, headers, body = site.request("/features/layer_1.bin", headers={"Range": f"bytes={start}-{end}",
                                                                            "Accept-Encoding": "gzip"})
    assert status == 206 and "Content-Encoding" not in headers
    assert headers["Content-Range"] == f"bytes {start}-{min(end, size - 1)}/{size}"
    assert body == layer_bytes[start:end + 1]
    assert decode_entry(body) == feature_doc(1, 5)

    status, headers, body = site.request("/features/layer_1.bin", headers={"Range": "bytes=-10"})
    assert (status, headers["Content-Range"], body) == (206, f"bytes {size - 10}-{size - 1}/{size}", layer_bytes[-10:])
    status, headers, body = site.request("/features/layer_1.bin", headers={"Range": f"bytes={offsets[1]}-"})
    assert status == 206 and body == layer_bytes[offsets[1]:]
    status, headers, _ = site.request("/features/layer_1.bin", headers={"Range": f"bytes={size}-{size + 5}"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    status, headers, body = site.request("/features/layer_1.bin")
    assert status == 200 and headers["Accept-Ranges"] == "bytes" and body == layer_bytes
    status, headers, body = site.request("/features/layer_1.bin", method="HEAD")
    assert status == 200 and headers["Content-Length"] == str(size) and body == b""
    assert site.request("/features/layer_9.bin")[0] == 404


def test_pack_source_reads_entries_through_index_offsets(tmp_path, pack_dir, serve):
    site = serve(write_graph_dir(tmp_path, "someone/features-repo"), open_features_dir(pack_dir))
    for layer, feature in LIVE:
        status, headers, body = site.request(f"/features/{cantor(layer, feature)}.json")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == feature_doc(layer, feature)


@pytest.mark.parametrize("kind", ["pack", "json"])
def test_dead_or_missing_feature_is_a_valid_dead_document(tmp_path, pack_dir, json_dir, serve, kind):
    source = open_features_dir(pack_dir if kind == "pack" else json_dir)
    assert isinstance(source, PackSource if kind == "pack" else JsonDirSource)
    site = serve(write_graph_dir(tmp_path, "./data/features"), source)
    # no entry, no entry (through a ./data scan), a layer the pack does not have
    for route, layer, feature in (("/features/", 0, 2), ("/data/features/", 1, 3), ("/features/", 7, 0)):
        status, headers, body = site.request(f"{route}{cantor(layer, feature)}.json")
        document = json.loads(body)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert document["isDead"] is True and document["examples_quantiles"] == []
        assert (document["layer"], document["index"], document["cantor_id"]) == (layer, feature, cantor(layer, feature))
    # a live feature through the ./data/<dir> route of a local scan
    status, _, body = site.request(f"/data/features/{cantor(1, 5)}.json")
    assert status == 200 and json.loads(body) == feature_doc(1, 5)


def test_without_source_data_scan_files_are_served_and_missing_ones_are_dead(tmp_path, serve):
    graphs = write_graph_dir(tmp_path, "./data/features")
    (graphs / "features").mkdir()
    (graphs / "features" / f"{cantor(0, 1)}.json").write_bytes(feature_json_bytes(feature_doc(0, 1)))
    site = serve(graphs)
    status, _, body = site.request(f"/data/features/{cantor(0, 1)}.json")
    assert status == 200 and json.loads(body) == feature_doc(0, 1)
    status, _, body = site.request(f"/data/features/{cantor(0, 4)}.json")
    assert status == 200 and json.loads(body)["isDead"] is True
    status, _, body = site.request("/data/graph-metadata.json")
    assert status == 200 and json.loads(body)["graphs"][0]["slug"] == "g1"
    status, _, body = site.request("/graph_data/g1.json?cache=1")
    assert status == 200 and json.loads(body)["metadata"]["scan"] == "./data/features"
    assert site.request("/graph_data/nope.json")[0] == 404


def test_path_traversal_is_refused(tmp_path, pack_dir, serve):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    graphs = write_graph_dir(tmp_path, "./data/features")
    os.symlink(secret, graphs / "link.json")
    site = serve(graphs, PackSource(pack_dir))
    attempts = ["/graph_data/../secret.txt", "/data/../secret.txt", "/data/%2e%2e/secret.txt",
                "/graph_data/..%2fsecret.txt", "/graph_data/%2E%2E%2Fsecret.txt", "/..%2f..%2f..%2fetc%2fpasswd",
                "/data/link.json", "/graph_data/link.json", "/features/..%2findex.json.gz",
                "/featurestore-assets/..%2fserve.py", "/featurestore-assets/serve_features.py",
                "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/attribution_graph/../../local_server.py",
                "/data/..%5csecret.txt", "/data/sub/%2e%2e/%2e%2e/secret.txt"]
    for path in attempts:
        status, _, body = site.request(path)
        assert status in (403, 404), path
        assert b"TOP-SECRET" not in body and b"root:" not in body and b"import" not in body, path
    assert site.request("/util.js")[0] == 200  # ordinary assets still load


def test_page_uses_local_scripts_and_compat(tmp_path, serve):
    assets = viewer_assets.present_assets()
    if len(assets) < len(viewer_assets.VENDORED):
        pytest.skip("viewer scripts not fetched: run `python -m exporters.viewer_assets fetch` (make does)")
    site = serve(write_graph_dir(tmp_path, "./data/features"), JsonDirSource(tmp_path))
    status, headers, body = site.request("/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "https://" not in page.split("<script>\nwindow.init")[0].replace("http://www.w3.org", "")
    for name in ("d3.min.js", "dagre.min.js", "pako.min.js", "viewer_compat.js", "viewer_local_features.js"):
        assert f"/featurestore-assets/{name}" in page
        status, _, script = site.request(f"/featurestore-assets/{name}")
        assert status == 200 and len(script) > 500
    assert "hotserver" not in page and "npy_v0" not in page and "jetpack" not in page
    assert '"localFeatures": true' in page
    # d3 first, then our compat (it decorates that d3), then the viewer's own scripts
    assert page.index("d3.min.js") < page.index("viewer_compat.js") < page.index("./util.js")


def test_missing_assets_fall_back_online_and_say_so(tmp_path, serve):
    empty = tmp_path / "no-assets"
    empty.mkdir()
    (empty / "d3.min.js").write_text("tampered")  # present but not matching a manifest: not used
    site = serve(write_graph_dir(tmp_path, "./data/features"), assets=empty)
    page = site.request("/")[2].decode()
    for item in viewer_assets.VENDORED:
        assert item.online_url in page
    assert "/featurestore-assets/viewer_compat.js" in page and '"localFeatures": false' in page
    assert site.request("/featurestore-assets/d3.min.js")[0] == 404
    lines = notices(site.server.config, "127.0.0.1")
    assert any("viewer scripts not fetched" in line and "unpkg.com/pako" in line for line in lines)


def test_save_graph_replaces_only_qparams(tmp_path, serve):
    graphs = write_graph_dir(tmp_path, "./data/features")
    site = serve(graphs)
    before = json.loads((graphs / "g1.json").read_text())
    body = json.dumps({"qParams": {"pinnedIds": "0_1_0", "clickedId": "0_1_0"}}).encode()
    status, _, _ = site.request("/save_graph/g1", method="POST", body=body, headers={"Content-Type": "application/json"})
    after = json.loads((graphs / "g1.json").read_text())
    assert status == 200 and after["qParams"] == {"pinnedIds": "0_1_0", "clickedId": "0_1_0"}
    assert after["nodes"] == before["nodes"] and after["links"] == before["links"]
    as_json = {"Content-Type": "application/json"}
    assert site.request("/save_graph/..%2fg1", method="POST", body=body, headers=as_json)[0] == 400
    assert site.request("/save_graph/missing", method="POST", body=body, headers=as_json)[0] == 404
    # a form post from another site (no JSON content type, foreign Origin) cannot touch the graph
    assert site.request("/save_graph/g1", method="POST", body=body, headers={"Content-Type": "text/plain"})[0] == 415
    assert site.request("/save_graph/g1", method="POST", body=body,
                        headers={**as_json, "Origin": "https://evil.example"})[0] == 403
    assert json.loads((graphs / "g1.json").read_text())["qParams"]["clickedId"] == "0_1_0"


def test_foreign_host_header_is_refused_on_loopback(tmp_path, serve):
    site = serve(write_graph_dir(tmp_path, "./data/features"))
    assert site.request("/data/graph-metadata.json", headers={"Host": "rebound.example:8042"})[0] == 403
    assert site.request("/data/graph-metadata.json", headers={"Host": f"localhost:{site.port}"})[0] == 200
    assert site.request("/data/graph-metadata.json", headers={"Host": f"127.0.0.1:{site.port}"})[0] == 200


def test_cli_serve_prints_url_and_serves(tmp_path, pack_dir, monkeypatch):
    import threading
    import urllib.request

    from click.testing import CliRunner

    from cli.main import cli, main
    from exporters.serve import ViewerServer

    fetched = {}

    def serve_one_request(self):
        def client():
            with urllib.request.urlopen(self.url + f"features/{cantor(1, 5)}.json", timeout=30) as response:
                fetched["body"] = response.read()
        thread = threading.Thread(target=client)
        thread.start()
        self.handle_request()
        thread.join()

    monkeypatch.setattr(ViewerServer, "serve_forever", serve_one_request)
    graphs = write_graph_dir(tmp_path, "org/repo")
    result = CliRunner().invoke(cli, ["serve", "--graphs", str(graphs), "--features", str(pack_dir), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "serving http://127.0.0.1:" in result.output and f"pack {pack_dir}" in result.output
    assert json.loads(fetched["body"]) == feature_doc(1, 5)
    assert main(["serve", "--graphs", str(graphs), "--features", str(pack_dir), "--store", str(tmp_path)]) == 2


def test_store_source_renders_like_export_json_and_caches(tiny, tmp_path, serve):
    from exporters.feature_json import DocumentOptions, feature_document

    store = tiny["store"]
    layer, feature, _ = store.sql("select layer, feature, activation_count from features where source = 'transcoder' "
                                  "order by activation_count desc limit 1").fetchall()[0]
    source = StoreSource(store, options=DocumentOptions(top_k=5, n_random=2))
    site = serve(write_graph_dir(tmp_path, "org/repo"), source)
    status, _, body = site.request(f"/features/{cantor(layer, feature)}.json")
    expected = feature_document(store, layer, feature, "transcoder", DocumentOptions(top_k=5, n_random=2))
    assert status == 200 and json.loads(body) == json.loads(feature_json_bytes(expected))
    assert json.loads(body)["examples_quantiles"][0]["examples"]
    assert cantor(layer, feature) in source._cache
    assert site.request(f"/features/{cantor(layer, feature)}.json")[2] == body  # from the cache
    n_features = store.manifest["model"]["n_features"]
    outside = json.loads(site.request(f"/features/{cantor(0, n_features + 3)}.json")[2])
    assert outside["isDead"] is True and "outside" in outside["reason"]


def test_parse_range_edges():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-0", 100) == (0, 0)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-0", 100) == "unsatisfiable"
    assert parse_range("bytes=5-4", 100) == "unsatisfiable"
    assert parse_range("bytes=0-1,5-6", 100) is None  # multiple ranges: whole file
    assert parse_range("items=0-5", 100) is None


def test_features_dir_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a pack"):
        open_features_dir(tmp_path / "empty")
    with pytest.raises(UserError, match="not a directory"):
        open_features_dir(tmp_path / "missing")
    with pytest.raises(UserError, match="graph-metadata.json"):
        ViewerConfig(tmp_path / "empty", FeatureSource())


def test_a_failing_source_still_answers_a_dead_document(tmp_path, serve, capsys):
    class Broken(FeatureSource):
        kind = "broken"

        def document_bytes(self, cantor_id):
            raise RuntimeError("disk on fire")

    site = serve(write_graph_dir(tmp_path, "org/repo"), Broken(tmp_path))
    status, _, body = site.request(f"/features/{cantor(2, 3)}.json")
    document = json.loads(body)
    assert status == 200 and document["isDead"] is True and "disk on fire" in document["reason"]
    assert "RuntimeError: disk on fire" in capsys.readouterr().err
