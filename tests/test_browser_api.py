"""The feature browser's HTTP API and serve start-up, over real HTTP on 127.0.0.1 against the tiny store."""
from __future__ import annotations

import json
import urllib.parse

import pytest

from featurestore.ids import cantor
from tests.test_serve import Running, pack_dir, write_graph_dir  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    from exporters.browser.routes import BrowserApp
    from exporters.serve import ViewerConfig
    from exporters.serve_features import StoreSource

    graphs = write_graph_dir(tmp_path_factory.mktemp("browser-api"), "./data/features")
    store = tiny["store"]
    running = Running(ViewerConfig(graphs, StoreSource(store), browser=BrowserApp(store, graphs, str(tiny["model"]))))
    yield running
    running.server.stop()


def get_json(site, path: str, **params):
    status, _, body = site.request(f"{path}?{urllib.parse.urlencode(params)}" if params else path)
    return status, json.loads(body)


def test_feature_list_filters_and_sorts_like_the_features_view(site, tiny):
    store = tiny["store"]
    status, page = get_json(site, "/api/features", layer=1, sort="freq", limit=7, min_freq=0.01)
    expected = store.sql("SELECT feature, activation_freq FROM features WHERE layer = 1 AND activation_freq >= 0.01 "
                         "ORDER BY activation_freq DESC, layer, feature").fetchall()
    assert status == 200 and page["total"] == len(expected)
    assert [(r["feature"], r["activation_freq"]) for r in page["rows"]] == [tuple(e) for e in expected[:7]]
    assert all(r["cantor_id"] == cantor(1, r["feature"]) for r in page["rows"])
    status, unexplained = get_json(site, "/api/features", explained="no", limit=1)
    assert unexplained["total"] == store.sql("SELECT count(*) FROM features").fetchall()[0][0]
    assert get_json(site, "/api/features", q="%")[1]["total"] == 0  # LIKE wildcards are searched as text
    status, error = get_json(site, "/api/features", sort="nope")
    assert status == 400 and "sort must be one of" in error["error"]
    features = [r["feature"] for r in page["rows"]]
    status, spark = get_json(site, "/api/sparklines", layer=1, features=",".join(map(str, features)))
    counts = dict(store.sql("SELECT feature, activation_count FROM features WHERE layer = 1").fetchall())
    assert {int(f): sum(bins) for f, bins in spark.items()} == {f: counts[f] for f in features}


def test_feature_page_groups_histogram_and_breakdown(site, tiny):
    store = tiny["store"]
    layer, feature, count, max_act = store.sql("SELECT layer, feature, activation_count, max_act FROM features "
                                               "ORDER BY activation_count DESC LIMIT 1").fetchall()[0]
    status, page = get_json(site, "/api/feature", layer=layer, feature=feature)
    assert status == 200 and not page["dead"]
    assert sum(page["histogram"]["counts"]) == count and page["histogram"]["edges"][-1] == pytest.approx(max_act)
    top = [a for (a,) in store.sql("SELECT act FROM activations WHERE layer = ? AND feature = ? ORDER BY act DESC "
                                   "LIMIT 10", [layer, feature]).fetchall()]
    groups = page["groups"]
    assert [e["act"] for e in groups[0]["examples"]] == pytest.approx(top)
    seen = {(e["seq_id"], e["pos"]) for e in groups[0]["examples"]}
    for group in groups[1:]:
        assert group["count"] == store.sql(
            "SELECT count(*) FROM activations WHERE layer = ? AND feature = ? AND least(floor(act / ? * 6), 5) = ?",
            [layer, feature, max_act, round(group["lo"] / max_act * 6)]).fetchall()[0][0]
        for example in group["examples"]:
            assert group["lo"] - 1e-5 <= example["act"] <= group["hi"] + 1e-5
            assert (example["seq_id"], example["pos"]) not in seen
            assert example["text"][example["index"]] != "" and example["acts"][example["index"]] == pytest.approx(example["act"])
    assert sum(r["count"] for r in page["breakdown"]["region"]) == count
    assert sum(r["baseline"] for r in page["breakdown"]["domain"]) == pytest.approx(1.0)
    status, _ = get_json(site, "/api/feature", layer=0, feature=store.manifest["model"]["n_features"] + 5)
    assert status == 400  # out of range: the store's API refuses it (a dead in-range feature has a page)
    live = {f for (f,) in store.sql("SELECT feature FROM features WHERE layer = 0").fetchall()}
    dead_ids = [f for f in range(store.manifest["model"]["n_features"]) if f not in live]
    if dead_ids:
        dead = get_json(site, "/api/feature", layer=0, feature=dead_ids[0])[1]
        assert dead["dead"] is True and dead["stats"] is None


def test_pages_assets_and_refusals(site):
    status, headers, body = site.request("/")
    assert status == 200 and b"/browser-assets/browser.js" in body and b"featurestoreBrowser" in body
    assert site.request("/feature/transcoder/1/2")[0] == 200
    assert site.request("/index.html")[0] == 200 and b"featurestoreServe" in site.request("/index.html")[2]  # viewer
    for path in ("/browser-assets/..%2froutes.py", "/browser-assets/queries.py", "/api/..%2f..%2fetc", "/api/Features"):
        assert site.request(path)[0] in (403, 404), path
    assert site.request("/feature/transcoder/1/2/../../../etc/passwd")[0] in (403, 404)


def test_huge_range_header_is_unsatisfiable(tmp_path, pack_dir):
    from exporters.serve import ViewerConfig
    from exporters.serve_features import PackSource

    running = Running(ViewerConfig(write_graph_dir(tmp_path, "org/repo"), PackSource(pack_dir)))
    try:
        for header in ("bytes=0-" + "9" * 5000, "bytes=" + "1" * 5000 + "-", "bytes=-" + "7" * 5000):
            status, headers, _ = running.request("/features/index.json.gz", headers={"Range": header})
            assert status == 416 and headers["Content-Range"].startswith("bytes */")
    finally:
        running.server.stop()


def test_unlabelled_graph_nodes_get_store_labels(site, tiny):
    status, _, body = site.request("/graph_data/g1.json")
    node = next(n for n in json.loads(body)["nodes"] if n["node_id"] == "0_1_0")
    freq = tiny["store"].sql("SELECT activation_freq FROM features WHERE layer = 0 AND feature = 1").fetchall()
    assert node["clerp"] == (f"L0/1 (freq {100 * freq[0][0]:.3g}%)" if freq else "L0/1 (never fires in the store)")
    labelled = json.loads(site.request("/data/g1.json")[2])
    assert next(n for n in labelled["nodes"] if n["node_id"] == "3_7_0")["clerp"] == 'Output "x" (p=0.900)'


def test_trace_and_steer_over_http(site, tiny):
    status, traced = get_json(site, "/api/trace", text="the sum of two numbers", format="raw")
    direct = tiny["store"].trace("the sum of two numbers", model=str(tiny["model"]), format="raw")
    assert status == 200 and traced["token_ids"] == direct.token_ids
    assert traced["features"][0]["max_act"] == pytest.approx(float(direct.act.max()))
    top = traced["features"][0]
    status, steered = get_json(site, "/api/steer", text="the sum of two numbers", format="raw",
                               edits=f"{top['layer']}/{top['feature']}=0", max_new_tokens=2)
    assert status == 200 and steered["edits"] == [f"{top['layer']}/{top['feature']}=0"]
    assert max(p["kl"] for p in steered["positions"]) > 0
    status, error = get_json(site, "/api/steer", text="x", edits="bad")
    assert status == 400 and "bad intervention" in error["error"]


def test_cli_serve_store_without_graphs_says_what_it_does(tiny, monkeypatch):
    import threading
    import urllib.request

    from click.testing import CliRunner

    from cli.main import cli, main
    from exporters.serve import ViewerServer

    fetched = {}

    def serve_one_request(self):
        def client():
            with urllib.request.urlopen(self.url + "api/overview", timeout=30) as response:
                fetched["body"] = response.read()
        thread = threading.Thread(target=client)
        thread.start()
        self.handle_request()
        thread.join()

    monkeypatch.setattr(ViewerServer, "serve_forever", serve_one_request)
    result = CliRunner().invoke(cli, ["serve", "--store", str(tiny["store_path"]), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "featurestore serve: opening store" in result.output and "serving http://127.0.0.1:" in result.output
    assert json.loads(fetched["body"])["store"] == str(tiny["store_path"].resolve())
    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--graphs", "/nonexistent", "--model", "x", "--port", "0"]) == 2


def test_neuron_features_are_listed_and_paged(tiny, tmp_path):
    import shutil

    import featurestore as fs
    from exporters.browser.queries import BrowserData

    shutil.copytree(tiny["store_path"], tmp_path / "store")
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "store", source="neuron", neurons_per_layer=8,
                       chunk_size=8, batch_tokens=512, progress=False)
    data = BrowserData(store)
    assert data.overview()["sources"] == ["neuron", "transcoder"]
    listed = data.list_features({"source": "neuron", "sort": "count", "limit": "3"})
    assert listed["total"] == store.sql("SELECT count(*) FROM features WHERE source = 'neuron'").fetchall()[0][0]
    top = listed["rows"][0]
    page = data.feature_page("neuron", top["layer"], top["feature"])
    stored = store.sql("SELECT count(*) FROM activations WHERE source = 'neuron' AND layer = ? AND feature = ?",
                       [top["layer"], top["feature"]]).fetchall()[0][0]
    assert page["stats"]["activation_count"] == top["activation_count"] >= stored == sum(page["histogram"]["counts"])
    assert "neurons keep only their top positions" in page["note"] and page["groups"][0]["examples"]
    assert page["logit_lens"]["top"]
