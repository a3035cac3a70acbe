"""Where `featurestore serve` gets per-feature documents: a pack, a directory of per-feature JSON, or a store.

Every source answers ``document_bytes(cantor_id)`` with a JSON document the viewer can render; a feature it does
not have (dead, never exported, out of range) gets a valid ``{"isDead": true, ...}`` document, which the viewer
shows as "Feature N failed to load" instead of failing on a 404 or an empty pack entry.
"""
from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from featurestore.errors import UserError
from featurestore.ids import cantor_unpair

from .pack import DEAD_STUB, INDEX_NAME, feature_json_bytes
from .pack_reader import PackReader

_FEATURE_FILE = re.compile(r"^\d+\.json$")
_PACK_FILE = re.compile(r"^(index\.json\.gz|layer_\d+\.bin)$")


DEAD_LOGITS = ["(no data: dead or missing feature)"]


def dead_document(cantor_id: int, reason: str) -> bytes:
    """The pack's dead stub plus identity and reason. ``top_logits`` is not empty on purpose: the viewer keeps the
    previous feature's token predictions on screen when a document has none."""
    layer, feature = cantor_unpair(cantor_id)
    return feature_json_bytes({**DEAD_STUB, "top_logits": DEAD_LOGITS, "layer": layer, "index": feature,
                               "cantor_id": cantor_id, "reason": reason})


class FeatureSource:
    """Base: a named source of per-feature JSON documents."""
    kind = "none"

    def __init__(self, path: Path | None = None):
        self.path = path

    def document_bytes(self, cantor_id: int) -> bytes:
        return dead_document(cantor_id, "no feature source given to featurestore serve")

    def pack_file(self, name: str) -> Path | None:
        """A raw pack file (index.json.gz, layer_L.bin) to serve with Range support, if this source is a pack."""
        return None

    def describe(self) -> str:
        return "none (each graph's scan decides)" if self.path is None else f"{self.kind} {self.path}"


class PackSource(FeatureSource):
    """A circuit-tracer pack directory: each document is one entry read through the index offsets."""
    kind = "pack"

    def __init__(self, path: Path):
        super().__init__(path)
        self.reader = PackReader(path)
        self.reader.index  # fail now, not on the first click, if the index is unreadable

    def document_bytes(self, cantor_id: int) -> bytes:
        layer, feature = cantor_unpair(cantor_id)
        try:
            document = self.reader.read(layer, feature)
        except UserError as exc:
            return dead_document(cantor_id, str(exc))
        if document is None:
            return dead_document(cantor_id, "the pack has no entry for this feature")
        return feature_json_bytes(document)

    def pack_file(self, name: str) -> Path | None:
        if not _PACK_FILE.match(name):
            return None
        path = self.path / name
        return path if path.is_file() else None


class JsonDirSource(FeatureSource):
    """A directory of ``{cantor_id}.json`` files (what `featurestore export json` writes), served as they are."""
    kind = "json"

    def document_bytes(self, cantor_id: int) -> bytes:
        try:
            return (self.path / f"{cantor_id}.json").read_bytes()
        except FileNotFoundError:
            return dead_document(cantor_id, "no JSON file for this feature")


class StoreSource(FeatureSource):
    """Documents rendered on demand from a store with the same code as `export json`, kept in an LRU cache."""
    kind = "store"

    def __init__(self, store, source: str = "transcoder", options=None, cache_size: int = 2048):
        super().__init__(Path(store.path))
        from .feature_json import DocumentOptions

        self.store = store
        self.source = source
        self.options = options if options is not None else DocumentOptions()
        model = store.manifest.get("model", {})
        self.n_layers = int(model.get("n_layers", 0))
        self.n_features = int(model.get("d_mlp" if source == "neuron" else "n_features", 0))
        self.cache_size = cache_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # one DuckDB connection: render one feature at a time

    def document_bytes(self, cantor_id: int) -> bytes:
        with self._lock:
            cached = self._cache.get(cantor_id)
            if cached is not None:
                self._cache.move_to_end(cantor_id)
                return cached
            data = self._render(cantor_id)
            self._cache[cantor_id] = data
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return data

    def _render(self, cantor_id: int) -> bytes:
        from .feature_json import feature_document

        layer, feature = cantor_unpair(cantor_id)
        if not (0 <= layer < self.n_layers and 0 <= feature < self.n_features):
            return dead_document(cantor_id, f"outside the store's {self.n_layers} layers x {self.n_features} features")
        try:
            document = feature_document(self.store, layer, feature, self.source, self.options)
        except UserError as exc:
            print(f"featurestore serve: layer {layer} feature {feature}: {exc}", file=sys.stderr)
            return dead_document(cantor_id, str(exc))
        if document is None or document.get("isDead"):
            return dead_document(cantor_id, "the feature never fired in the store")
        return feature_json_bytes(document)

    def describe(self) -> str:
        return f"store {self.path} ({self.source}, rendered on demand)"


def open_features_dir(path: str | Path) -> FeatureSource:
    """``--features``: a pack (``index.json.gz``) or a directory of ``{id}.json``, directly or in ``features/``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"--features {root}: not a directory")
    candidates = [root, root / "features"]
    for candidate in candidates:
        if (candidate / INDEX_NAME).is_file():
            return PackSource(candidate)
    for candidate in candidates:
        if candidate.is_dir() and any(_FEATURE_FILE.match(p.name) for p in candidate.iterdir()):
            return JsonDirSource(candidate)
    raise UserError(f"--features {root}: neither a pack (no {INDEX_NAME}) nor a directory of <cantor_id>.json files")
