"""`featurestore serve` in real headless Chromium: the demo's store and a graph attributed on the demo model,
with every request that is not to the loopback server blocked."""
from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from exporters import viewer_assets
from featurestore.ids import cantor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "Wait, let me check the answer again"
HUB_SCAN = "featurestore-demo/features@main"  # a Hub-style scan: must still load from the local store
NODES = ".link-graph text.node"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(len(viewer_assets.present_assets()) < len(viewer_assets.VENDORED),
                       reason="viewer scripts not fetched (python -m exporters.viewer_assets fetch; make does it)"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo checkpoint, a store collected from part of the demo traces, and graphs of one prompt."""
    import featurestore as fs
    from attribution import attribute
    from exporters import graph_json
    from featurestore.demo import TRACES_PATH, build_demo_checkpoint
    from featurestore.modeling import load_model
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve-demo")
    checkpoint = build_demo_checkpoint(root / "checkpoint")
    store = fs.collect(str(checkpoint), str(TRACES_PATH), root / "store", max_samples=16, progress=False)
    model, _ = load_model(str(checkpoint), dtype="float32", device="cpu")
    graph = attribute(model, AutoTokenizer.from_pretrained(str(checkpoint)), PROMPT, max_feature_nodes=200)
    graphs = root / "graphs"
    local = graph_json.write(graph, graphs, "demo-local", "./data/features", node_threshold=0.9)
    graph_json.write(graph, graphs, "demo-hub", HUB_SCAN, node_threshold=0.9)
    # in the Hub-scan graph, point one feature node at a feature the store cannot have: it must show as dead
    hub = json.loads((graphs / "demo-hub.json").read_text())
    dead = next(n for n in reversed(hub["nodes"]) if n["feature_type"] == "cross layer transcoder")
    dead["feature"] = cantor(0, store.manifest["model"]["n_features"] + 7)
    (graphs / "demo-hub.json").write_text(json.dumps(hub))
    return {"store": store, "graphs": graphs, "graph": json.loads(local.path.read_text()), "dead_node": dead["node_id"]}


@pytest.fixture(scope="module")
def site(demo):
    from exporters.serve import ViewerConfig, ViewerServer
    from exporters.serve_features import StoreSource

    server = ViewerServer(ViewerConfig(demo["graphs"], StoreSource(demo["store"])), port=0)
    server.start_in_thread()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with playwright_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


class Page:
    """One page with loopback-only networking and a record of errors and blocked requests."""

    def __init__(self, browser, base_url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors, self.blocked, self.console_errors, self.requests = [], [], [], []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.route("**/*", self._route)
        self.base_url = base_url

    def _route(self, route):
        url = route.request.url
        if urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
            self.requests.append(url)
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self, slug: str):
        self.page.goto(f"{self.base_url}index.html?slug={slug}")
        self.page.wait_for_selector(NODES, timeout=30_000)

    def node_count(self) -> int:
        return self.page.locator(NODES).count()

    def click_node(self, node_id: str):
        box = self.page.evaluate("""id => {
            const el = [...document.querySelectorAll('.link-graph text.node')].find(e => e.__data__.nodeId === id)
            const r = el.getBoundingClientRect()
            return {x: r.x + r.width / 2, y: r.y + r.height / 2}
        }""", node_id)
        self.page.mouse.click(box["x"], box["y"])

    def assert_clean(self):
        assert self.errors == [], self.errors
        assert self.blocked == [], self.blocked
        assert [e for e in self.console_errors if "favicon" not in e] == []


def visible_count(nodes: list[dict], threshold: float) -> int:
    """The viewer's pruning rule: embeddings and logits always, other nodes when influence <= slider."""
    return sum(1 for n in nodes if n["feature_type"] in ("embedding", "logit") or (n["influence"] or 0) <= threshold)


def live_feature_node(demo) -> dict:
    """The feature node with the most activations in the store (so its dashboard has examples)."""
    counts = dict(((layer, feature), count) for layer, feature, count in demo["store"].sql(
        "select layer, feature, activation_count from features where source = 'transcoder'").fetchall())
    nodes = [n for n in demo["graph"]["nodes"] if n["feature_type"] == "cross layer transcoder"]
    best = max(nodes, key=lambda n: counts.get(tuple(map(int, n["node_id"].split("_")[:2])), 0))
    assert counts.get(tuple(map(int, best["node_id"].split("_")[:2])), 0) > 0
    return best


def test_graph_renders_and_feature_examples_load(browser, site, demo, tmp_path):
    from exporters.feature_json import feature_document

    graph = demo["graph"]
    page = Page(browser, site.url)
    page.open("demo-local")
    threshold = graph["metadata"]["node_threshold"]
    assert page.node_count() == visible_count(graph["nodes"], threshold)
    assert page.node_count() >= len(graph["nodes"]) - 1 and page.node_count() > 12

    node = live_feature_node(demo)
    layer, feature = map(int, node["node_id"].split("_")[:2])
    page.click_node(node["node_id"])
    page.page.wait_for_selector(".feature-example-list .ctx-container", timeout=20_000)
    page.page.wait_for_selector(".feature-example-logits .token", timeout=20_000)
    assert f"L{layer}/{feature}" in page.page.inner_text(".feature-detail .feature-title")
    assert any(f"/data/features/{node['feature']}.json" in url for url in page.requests)

    document = feature_document(demo["store"], layer, feature)
    top_example = document["examples_quantiles"][0]["examples"][0]
    shown = page.page.inner_text(".feature-example-list")
    assert top_example["tokens"][top_example["train_token_ind"]].strip() in shown
    logits_shown = page.page.inner_text(".feature-example-logits")
    assert document["top_logits"][0].strip() in logits_shown and "Token Predictions" in logits_shown

    screenshot = tmp_path / "viewer-demo-local.png"
    page.page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    page.assert_clean()


def test_pruning_slider_hides_nodes(browser, site, demo):
    graph = demo["graph"]
    influences = sorted(n["influence"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    cut = round(influences[len(influences) // 2], 2)
    page = Page(browser, site.url)
    page.open("demo-local")
    before = page.node_count()
    expected = visible_count(graph["nodes"], cut)
    assert expected < before
    page.page.eval_on_selector(".slider-container input", """(el, v) => {
        el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})) }""", str(cut))
    page.page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n", arg=[NODES, expected],
                                timeout=20_000)
    assert page.node_count() == expected
    assert page.page.inner_text(".slider-container .value-display") == f"{cut:.2f}"
    page.assert_clean()


def test_hub_scan_graph_loads_local_features_and_dead_feature_fails_cleanly(browser, site, demo, tmp_path):
    page = Page(browser, site.url)
    page.open("demo-hub")
    node = live_feature_node(demo)
    page.click_node(node["node_id"])
    page.page.wait_for_selector(".feature-example-list .ctx-container", timeout=20_000)
    assert any(url.endswith(f"/features/{node['feature']}.json") for url in page.requests)

    page.click_node(demo["dead_node"])
    page.page.wait_for_function(
        "() => document.querySelector('.feature-example-list').innerText.includes('failed to load')", timeout=20_000)
    dead_id = next(n["feature"] for n in json.loads((demo["graphs"] / "demo-hub.json").read_text())["nodes"]
                   if n["node_id"] == demo["dead_node"])
    assert page.page.inner_text(".feature-example-list").strip() == f"Feature {dead_id} failed to load"
    assert "no data" in page.page.inner_text(".feature-example-logits")  # not the previous feature's predictions
    page.page.screenshot(path=str(tmp_path / "viewer-demo-hub-dead.png"))
    page.assert_clean()  # the Hub index probe and the CDN fallback never left the machine


def test_compat_script_helpers(browser):
    """Our d3-jetpack stand-in, on the npm d3, behaves as the viewer's calls expect."""
    page = browser.new_page()
    page.set_content("<div id='root' style='width: 300px; height: 200px'></div>")
    page.add_script_tag(path=str(viewer_assets.present_assets()["d3.min.js"]))
    page.add_script_tag(path=str(viewer_assets.COMPAT_SCRIPT))
    result = page.evaluate("""() => {
        const root = d3.select('#root')
        const rows = root.appendMany('div.row.big#first', [3, 1, 2]).st({width: 10, zIndex: 5, marginTop: d => d,
                                                                         lineHeight: '1.5'})
        const c = d3.conventions({sel: root.append('div.chart').st({width: 300, height: 200}),
                                  margin: {left: 30}, layers: 'scd'})
        c.drawAxis()
        const label = c.svg.append('text.axis-label').translate(-16, 1).at({textAnchor: 'middle', fontSize: 9})
        const div = d3.select('.row').translate([4, 5])
        const nested = d3.nestBy([1, 2, 3, 4, 5], d => d % 2 ? 'odd' : 'even')
        const sel = c.svg.selectAppend('path.x-line'); const again = c.svg.selectAppend('path.x-line')
        return {
          firstClass: rows.node().className, firstId: rows.node().id, count: rows.size(),
          width: rows.node().style.width, zIndex: rows.node().style.zIndex, marginTop: rows.nodes()[1].style.marginTop,
          lineHeight: rows.node().style.lineHeight,
          layers: c.layers.map(l => l.node ? l.node().tagName : 'ctx:' + (typeof l.clearRect)),
          width_: c.width, height_: c.height, axes: document.querySelectorAll('.chart g.x.axis, .chart g.y.axis').length,
          labelTransform: label.attr('transform'), anchor: label.attr('text-anchor'), fontSize: label.attr('font-size'),
          divTransform: div.node().style.transform,
          nested: nested.map(g => [g.key, g.length]), clamp: [d3.clamp(0, 5, 3), d3.clamp(0, -1, 3)],
          sameAppend: sel.node() === again.node(), parentTag: label.parent().node().tagName,
        }
    }""")
    page.close()
    assert result["firstClass"] == "row big" and result["firstId"] == "first" and result["count"] == 3
    assert (result["width"], result["zIndex"], result["marginTop"]) == ("10px", "5", "1px")
    assert result["lineHeight"] == "1.5"
    assert result["layers"] == ["g", "ctx:function", "DIV"]
    assert (result["width_"], result["height_"], result["axes"]) == (250, 160, 2)
    assert result["labelTransform"] == "translate(0,-16)"
    assert (result["anchor"], result["fontSize"]) == ("middle", "9")
    assert result["divTransform"] == "translate(4px, 5px)"
    assert result["nested"] == [["odd", 3], ["even", 2]] and result["clamp"] == [3, 0]
    assert result["sameAppend"] is True and result["parentTag"] == "g"
