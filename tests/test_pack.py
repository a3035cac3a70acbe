"""The pack writer, reader (local and HTTP Range) and verifier, on synthetic feature documents."""
from __future__ import annotations

import gzip
import http.server
import json
import os
import random
import re
import struct
import threading
from pathlib import Path

import pytest

from exporters.pack import DEAD_STUB, PackReader, feature_json_bytes, pack_entry, pack_json_dir, read_feature, write_pack
from exporters.pack_reader import scan_to_url
from exporters.integrity import verify
from featurestore.errors import UserError
from featurestore.ids import cantor

N_LAYERS, N_FEATURES = 3, 9


def make_document(layer: int, feature: int, rng: random.Random) -> dict:
    examples = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 12)
        acts = [round(rng.random() * 3, 4) if rng.random() < 0.4 else 0.0 for _ in range(n)]
        examples.append({"tokens": [rng.choice(["a", " the", "\\xe4", "é", "\n"]) for _ in range(n)],
                         "tokens_acts_list": acts, "train_token_ind": rng.randrange(n), "is_repeated_datapoint": False})
    return {"top_logits": ["x", "y"], "bottom_logits": ["z"], "act_min": 0.0, "act_max": 3.0,
            "activation_frequency": rng.random() / 10, "layer": layer, "feature": feature,
            "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}]}


@pytest.fixture(scope="module")
def documents() -> dict[tuple[int, int], dict]:
    rng = random.Random(7)
    live = {(l, f) for l in range(N_LAYERS) for f in range(N_FEATURES) if rng.random() < 0.6}
    live |= {(1, 0), (1, N_FEATURES - 1)}  # first and last feature live in some layer
    live -= {(2, N_FEATURES - 1)}  # and a dead last feature in another
    return {key: make_document(*key, rng) for key in sorted(live)}


def entries(documents, level=6):
    for (layer, feature), document in sorted(documents.items()):
        yield layer, feature, pack_entry(feature_json_bytes(document), level)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory, documents) -> Path:
    out = tmp_path_factory.mktemp("pack") / "features"
    write_pack(out, range(N_LAYERS), N_FEATURES, entries(documents))
    return out


def test_layout_offsets_and_round_trip(pack_dir, documents):
    index = json.loads(gzip.decompress((pack_dir / "index.json.gz").read_bytes()))
    assert index["version"] == "1.0" and index["format"] == "variable_chunks"
    assert sorted(k for k in index if k.isdigit()) == [str(l) for l in range(N_LAYERS)]
    for layer in range(N_LAYERS):
        offsets = index[str(layer)]["offsets"]
        data = (pack_dir / index[str(layer)]["filename"]).read_bytes()
        assert index[str(layer)]["filename"] == f"layer_{layer}.bin"
        assert len(offsets) == N_FEATURES + 1 and offsets[0] == 0 and offsets[-1] == len(data)
        for feature in range(N_FEATURES):
            start, end = offsets[feature], offsets[feature + 1]
            if (layer, feature) not in documents:
                assert start == end
                assert read_feature(pack_dir, layer, feature) is None
                continue
            (length,) = struct.unpack("<I", data[start:start + 4])
            assert length == end - start - 4
            payload = gzip.decompress(data[start + 4:end])
            assert payload == feature_json_bytes(documents[(layer, feature)])
            assert read_feature(pack_dir, layer, feature) == documents[(layer, feature)]


def test_same_bytes_on_second_write_and_level_matters(tmp_path, documents, pack_dir):
    again = tmp_path / "again"
    write_pack(again, range(N_LAYERS), N_FEATURES, entries(documents))
    assert tree_bytes(again) == tree_bytes(pack_dir)
    ninth = tmp_path / "level9"
    write_pack(ninth, range(N_LAYERS), N_FEATURES, entries(documents, level=9), level=9)
    assert PackReader(ninth).read(1, 0) == documents[(1, 0)]


def test_dead_stub_entries_are_valid(tmp_path, documents):
    out = tmp_path / "stub"
    summary = write_pack(out, range(N_LAYERS), N_FEATURES, entries(documents), dead_stub=True)
    assert summary.dead == N_LAYERS * N_FEATURES - len(documents)
    reader = PackReader(out)
    for layer in range(N_LAYERS):
        for feature in range(N_FEATURES):
            start, end = reader.span(layer, feature)[1:]
            assert end > start
            expected = documents.get((layer, feature), DEAD_STUB)
            assert reader.read(layer, feature) == expected
    assert verify(out).ok


def test_out_of_order_entries_leave_nothing_behind(tmp_path, documents):
    out = tmp_path / "bad"
    backwards = list(entries(documents))[::-1]
    with pytest.raises(ValueError, match="out of order"):
        write_pack(out, range(N_LAYERS), N_FEATURES, iter(backwards))
    assert not out.exists() and os.listdir(tmp_path) == []


def test_refuses_to_replace_an_unrelated_directory(tmp_path, documents):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        write_pack(out, range(N_LAYERS), N_FEATURES, entries(documents))
    assert (out / "notes.txt").read_text() == "keep me"


def test_unwritable_destination_is_one_line_error(tmp_path, documents):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError) as info:
        write_pack(blocker / "pack", range(N_LAYERS), N_FEATURES, entries(documents))
    assert "\n" not in str(info.value) and "cannot" in str(info.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_from_json_dir_equals_direct_pack(tmp_path, documents, pack_dir, workers):
    json_dir = tmp_path / "features_json"
    json_dir.mkdir()
    for (layer, feature), document in documents.items():  # indented input: the packer re-serialises canonically
        (json_dir / f"{cantor(layer, feature)}.json").write_text(json.dumps(document, indent=2, ensure_ascii=False))
    (json_dir / "README.txt").write_text("ignored")
    out = tmp_path / "from_json"
    pack_json_dir(json_dir, out, n_layers=N_LAYERS, n_features=N_FEATURES, workers=workers, progress=False)
    assert tree_bytes(out) == tree_bytes(pack_dir)


def test_pack_from_json_infers_sizes_and_rejects_bad_json(tmp_path, documents):
    json_dir = tmp_path / "j"
    json_dir.mkdir()
    (json_dir / f"{cantor(1, 4)}.json").write_bytes(feature_json_bytes(documents.get((1, 4)) or make_document(1, 4, random.Random(1))))
    summary = pack_json_dir(json_dir, tmp_path / "p", progress=False)
    assert summary.layers == [0, 1] and summary.n_features == 5
    (json_dir / f"{cantor(0, 0)}.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        pack_json_dir(json_dir, tmp_path / "p2", progress=False)
    assert not (tmp_path / "p2").exists()
    with pytest.raises(UserError, match="no \\{cantor_id\\}.json"):
        pack_json_dir(tmp_path / "p", tmp_path / "p3", progress=False)


# ---- HTTP ----

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support, as HF's resolve endpoint serves them."""

    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        if match and not getattr(self.server, "ignore_range", False):
            start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
            body = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def http_root(pack_dir):
    def handler(*args, **kwargs):
        return RangeHandler(*args, directory=str(pack_dir.parent), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    RangeHandler.requests.clear()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/{pack_dir.name}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_range_read(http_root, documents, pack_dir):
    server, url = http_root
    reader = PackReader(url)
    for (layer, feature), document in documents.items():
        assert reader.read(layer, feature) == document
    ranged = [(path, rng) for path, rng in RangeHandler.requests if rng]
    assert len(ranged) == len(documents)  # one ranged GET per feature, the index fetched once
    assert sum(1 for path, _ in RangeHandler.requests if path.endswith("index.json.gz")) == 1
    layer, feature = next(iter(documents))
    _, start, end = PackReader(pack_dir).span(layer, feature)
    assert (f"/{pack_dir.name}/layer_{layer}.bin", f"bytes={start}-{end - 1}") in ranged
    assert read_feature(url, 2, N_FEATURES - 1) is None  # dead: no request needed beyond the index


def test_http_server_without_range_support_is_reported(http_root, documents):
    server, url = http_root
    server.ignore_range = True
    layer, feature = next(iter(documents))
    with pytest.raises(UserError, match="ignored the Range request"):
        read_feature(url, layer, feature)
    with pytest.raises(UserError, match="HTTP 404"):
        read_feature(url + "-missing", layer, feature)


def test_scan_string_grammar():
    assert scan_to_url("org/repo") == "https://huggingface.co/org/repo/resolve/main/features/"
    assert scan_to_url("org/repo@abc123") == "https://huggingface.co/org/repo/resolve/abc123/features/"
    assert scan_to_url("org/repo//tc/l0@v1") == "https://huggingface.co/org/repo/resolve/v1/tc/l0/features/"
