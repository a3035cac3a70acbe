"""The feature browser's HTTP side inside `featurestore serve`: its page, its static files and its JSON API.

Routes (GET/HEAD): ``/``, ``/features``, ``/feature/<source>/<layer>/<feature>``, ``/trace`` (the one page; its
script routes by path), ``/browser-assets/<name>`` and ``/api/{overview,features,sparklines,feature,trace,steer}``.
Everything the page shows is inserted as text (never as HTML), so labels and token text cannot inject markup.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import traceback
from importlib import resources
from pathlib import Path

from featurestore.errors import UserError

from .queries import BrowserData, _float, _int

ASSETS = ("browser.js", "browser.css")
ASSET_PREFIX = "/browser-assets/"
_PAGE = re.compile(r"^/(?:features|trace|feature/(?:transcoder|neuron)/\d{1,6}/\d{1,9})?$")
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
MAX_TEXT = 20_000  # characters a trace or steer request may carry


class BrowserApp:
    """The browser over one store; ``model`` (a checkpoint) enables trace and interventions, loaded on first use."""

    def __init__(self, store, graphs: Path | None = None, model: str | None = None):
        self.store = store
        self.data = BrowserData(store, graphs)  # opens its own connection to the store
        self._trace_store = None  # another one for traces, used under the model lock
        self.model = model
        self.has_graphs = graphs is not None
        self._model_lock = threading.Lock()
        # build the list's catalog now, beside the open port, so the first page does not wait for it
        threading.Thread(target=self._warm, name="featurestore-browser-warm", daemon=True).start()

    def _warm(self) -> None:
        try:
            self.data.overview()
        except Exception as exc:  # the first request will report it properly
            print(f"featurestore serve: could not prepare the feature list: {exc}", file=sys.stderr)

    # ---- dispatch: returns False when the path is not the browser's ----

    def handle(self, handler, path: str, query: dict[str, str]) -> bool:
        if _PAGE.match(path):
            handler._send_bytes(self.page(), "text/html; charset=utf-8")
            return True
        if path.startswith(ASSET_PREFIX):
            name = path[len(ASSET_PREFIX):]
            if name not in ASSETS:
                handler._error(404, f"no asset {name}")
            else:
                handler._send_bytes(_asset(name), _TYPES[Path(name).suffix])
            return True
        if not path.startswith("/api/"):
            return False
        endpoint = getattr(self, "api_" + path[len("/api/"):], None)
        if endpoint is None or not re.fullmatch(r"[a-z]+", path[len("/api/"):]):
            handler._error(404, "no such API")
            return True
        try:
            body = json.dumps(endpoint(query), ensure_ascii=False, default=_json_default, allow_nan=False)
        except UserError as exc:
            handler._error(400, str(exc))
            return True
        except Exception as exc:  # a server boundary: the page shows the message, stderr gets the traceback
            traceback.print_exc(file=sys.stderr)
            handler._error(500, f"{type(exc).__name__}: {exc}")
            return True
        try:
            handler._send_bytes(body.encode("utf-8"), "application/json; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):  # the page moved on before the answer came
            handler.close_connection = True
        return True

    def page(self) -> bytes:
        config = {"model": bool(self.model), "graphs": self.has_graphs,
                  "format": self.store.manifest.get("settings", {}).get("format", "raw")}
        html = _asset("browser.html").decode("utf-8")
        # JSON inside <script>: '<' escaped so no string can close the script element
        return html.replace("__CONFIG__", json.dumps(config).replace("<", "\\u003c")).encode("utf-8")

    def labelled_graph(self, path: Path) -> bytes | None:
        """The graph with each unlabelled feature node labelled from the store: its latest description, or
        ``L{layer}/{feature}``, with the activation frequency. None when the file is not a graph."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
            return None
        wanted = {}
        for node in document["nodes"]:
            if isinstance(node, dict) and node.get("feature_type") == "cross layer transcoder" and not node.get("clerp") \
                    and isinstance(node.get("layer"), (int, str)) and str(node.get("layer")).isdigit():
                wanted[node["node_id"]] = node
        if not wanted:
            return None
        labels = self.data.labels([(int(n["layer"]), _node_feature(n)) for n in wanted.values()])
        for node in wanted.values():
            layer, feature = int(node["layer"]), _node_feature(node)
            description, freq = labels.get((layer, feature), (None, None))
            name = description or f"L{layer}/{feature}"
            node["clerp"] = name + (f" (freq {100 * freq:.3g}%)" if freq is not None else " (never fires in the store)")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    # ---- API ----

    def api_overview(self, query: dict) -> dict:
        return self.data.overview() | {"model": self.model is not None, "graphs": self.has_graphs}

    def api_features(self, query: dict) -> dict:
        return self.data.list_features(query)

    def api_sparklines(self, query: dict) -> dict:
        features = [_int(x, "features") for x in (query.get("features") or "").split(",") if x][:500]
        spark = self.data.sparklines(query.get("source") or "transcoder", _int(query.get("layer"), "layer"), features)
        return {str(k): v for k, v in spark.items()}

    def api_feature(self, query: dict) -> dict:
        source = query.get("source") or "transcoder"
        if source not in ("transcoder", "neuron"):
            raise UserError("source must be transcoder or neuron")
        return self.data.feature_page(source, _int(query.get("layer"), "layer"), _int(query.get("feature"), "feature"))

    def api_trace(self, query: dict) -> dict:
        from featurestore.tracing import trace

        text, response, fmt = self._text(query)
        with self._model_lock:
            model = self._loaded()
            result = trace(text, model, self._trace_store, response=response, format=fmt)
        return result.to_dict(per_token=_int(query.get("per_token") or 10, "per_token"),
                              features=_int(query.get("features") or 40, "features"))

    def api_steer(self, query: dict) -> dict:
        from featurestore.intervention import Decoding, parse_edit, steer_text

        text, response, fmt = self._text(query)
        edits = [parse_edit(e) for e in (query.get("edits") or "").split(",") if e.strip()]
        decoding = Decoding(max_new_tokens=min(200, _int(query.get("max_new_tokens") or 20, "max_new_tokens")),
                            sample=query.get("sample") in ("1", "true", "yes"),
                            temperature=_float(query.get("temperature") or 1.0, "temperature"), seed=_int(query.get("seed") or 0, "seed"))
        track = [query["track"]] if query.get("track") else []
        with self._model_lock:
            model = self._loaded()
            return steer_text(text, model, edits, self._trace_store, response=response, format=fmt,
                              decoding=decoding, top=5, track=track).to_dict()

    def _text(self, query: dict) -> tuple[str, str | None, str | None]:
        if not self.model:
            raise UserError("start the server with --model CHECKPOINT to trace texts")
        text = query.get("text") or ""
        if not text or len(text) > MAX_TEXT:
            raise UserError(f"text must be 1..{MAX_TEXT} characters")
        return text, query.get("response") or None, query.get("format") or None

    def _loaded(self):
        from featurestore.tracing import check_same_model, load_cached

        from featurestore.store import Store

        net, tokenizer, info = load_cached(self.model)
        if self._trace_store is None:
            check_same_model(self.store, info)
            self._trace_store = Store(self.store.path)
        return net, tokenizer


def _node_feature(node: dict) -> int:
    """The feature index of a node: its id reads ``{layer}_{feature}_{pos}``."""
    try:
        return int(str(node.get("node_id", "")).split("_")[1])
    except (IndexError, ValueError):
        from featurestore.ids import cantor_unpair

        return cantor_unpair(int(node["feature"]))[1]


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
