"""`featurestore serve`: the circuit-tracer viewer, its graphs and local features from one loopback HTTP server.

Routes (GET and HEAD):
  /, /index.html, /*.html         viewer pages from the installed circuit-tracer, scripts pointed at local copies
  /featurestore-assets/<name>     the npm-fetched d3/dagre/pako, our d3-jetpack compat and local-features scripts
  /data/graph-metadata.json, /data/<rel>, /graph_data/<rel>     files of the graph directory (as circuit-tracer's
                                  server maps them); /data/<dir>/<id>.json comes from the feature source when one
                                  is given, and is a valid dead document when neither has it
  /features/<id>.json             a feature document from the source (dead document when it has none)
  /features/index.json.gz, /features/layer_<L>.bin    a pack source's raw files, with Range (206 + Content-Range)
  /<other>                        static viewer assets
With --store, the feature browser (exporters.browser) answers /, /features, /feature/..., /trace, /api/... first.
POST /save_graph/<slug> stores the page's qParams in <slug>.json, as circuit-tracer's own server does.
Nothing outside those directories is served; compressed files go out as raw bytes (no Content-Encoding).
"""
from __future__ import annotations

import ipaddress
import json
import mimetypes
import re
import socket
import sys
import threading
import traceback
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from featurestore.errors import UserError
from featurestore.storage import write_bytes_atomic

from . import viewer_assets
from .graph_json import METADATA_FILE, check_slug
from .serve_features import FeatureSource, dead_document

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8042
MAX_POST_BYTES = 1 << 20
_DATA_FEATURE = re.compile(r"^(?:[^/]+/)*(\d{1,18})\.json$")
_FEATURE_JSON = re.compile(r"^(\d{1,18})\.json$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".json": "application/json; charset=utf-8", ".gz": "application/octet-stream",
          ".bin": "application/octet-stream", ".svg": "image/svg+xml"}


@dataclass
class ViewerConfig:
    graphs: Path | None
    features: FeatureSource
    assets: Path = field(default_factory=viewer_assets.default_assets_dir)
    frontend: Path = field(default_factory=viewer_assets.frontend_dir)
    browser: object | None = None  # exporters.browser.routes.BrowserApp, when serving a store

    def __post_init__(self):
        if self.graphs is None:
            if self.browser is None:
                raise UserError("give --graphs DIR, or --store STORE for the feature browser")
        else:
            self.graphs = Path(self.graphs).expanduser().resolve()
            if not self.graphs.is_dir():
                raise UserError(f"--graphs {self.graphs}: not a directory")
            if not (self.graphs / METADATA_FILE).is_file():
                raise UserError(f"--graphs {self.graphs}: no {METADATA_FILE} (write graphs with `featurestore attribute`)")
        self.frontend = self.frontend.resolve()
        self.local_scripts = viewer_assets.present_assets(self.assets)
        self.has_local_source = self.features.kind != "none"
        script = ("<script>window.featurestoreServe = " + json.dumps({"localFeatures": self.has_local_source}) +
                  "</script>\n<script src='" + viewer_assets.ROUTE_PREFIX +
                  viewer_assets.LOCAL_FEATURES_SCRIPT.name + "'></script>\n")
        self.pages: dict[str, bytes] = {}
        self.online: list[str] = []
        self.unknown: list[str] = []
        for page in sorted(self.frontend.glob("*.html")):
            rewritten = viewer_assets.rewrite_page(page.read_text(encoding="utf-8"), self.local_scripts, script)
            self.pages[page.name] = rewritten.html.encode("utf-8")
            self.online += [url for url in rewritten.online if url not in self.online]
            self.unknown += [url for url in rewritten.unknown if url not in self.unknown]


def safe_join(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it stays inside ``root`` after resolving '..' and symlinks, else None."""
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("..", ".") for part in parts) or relative.startswith("/"):
        return None
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) else None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_inclusive)``, None to send the whole file, or "unsatisfiable"."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match:
        return None  # multiple or malformed ranges: ignoring Range is allowed
    first, last = match.groups()
    if len(first) > 18 or len(last) > 18:
        return "unsatisfiable"  # no file is that large (and int() of thousands of digits is refused or slow)
    if first == "" and last == "":
        return None
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return start, end


class ViewerHandler(BaseHTTPRequestHandler):
    server_version = "featurestore-serve"
    protocol_version = "HTTP/1.1"
    config: ViewerConfig  # set on the subclass made per server

    # ---- dispatch ----

    def do_GET(self):
        self._dispatch(send_body=True)

    def do_HEAD(self):
        self._dispatch(send_body=False)

    def _dispatch(self, send_body: bool):
        self.send_body = send_body
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path)
        config = self.config
        if config.browser is not None:
            try:
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(split.query, max_num_fields=64).items()}
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "too many query parameters")
            if config.browser.handle(self, path, query):
                return
        if config.graphs is None and (path.startswith(("/data/", "/graph_data/")) or path in ("/", "/index.html")):
            return self._error(HTTPStatus.NOT_FOUND, "no --graphs given: only the feature browser is served")
        if path in ("/", ""):
            path = "/index.html"
        name = path[1:]
        if name in config.pages:
            return self._send_bytes(config.pages[name], _TYPES[".html"])
        if path.startswith(viewer_assets.ROUTE_PREFIX):
            return self._asset(path[len(viewer_assets.ROUTE_PREFIX):])
        if path.startswith("/data/"):
            return self._data(path[len("/data/"):])
        if path.startswith("/graph_data/"):
            relative = path[len("/graph_data/"):]
            target = safe_join(config.graphs, relative)
            if target is None or not target.is_file():
                return self._file(config.graphs, relative)
            return self._graph_or_file(target, relative)
        if path.startswith("/features/"):
            return self._features(path[len("/features/"):])
        return self._file(config.frontend, name)

    def _asset(self, name: str):
        path = viewer_assets.own_script(name) or self.config.local_scripts.get(name)
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no asset {name}")
        return self._send_file(path)

    def _data(self, relative: str):
        """Graph-directory files; ``<dir>/<id>.json`` (a ``./data/<dir>`` scan) is a feature document."""
        target = safe_join(self.config.graphs, relative)
        if target is None:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the graph directory")
        feature = _DATA_FEATURE.match(relative)
        if feature and (("/" in relative and self.config.has_local_source) or not target.is_file()):
            return self._feature_document(int(feature.group(1)))
        if not target.is_file():
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        return self._graph_or_file(target, relative)

    def _graph_or_file(self, target: Path, relative: str):
        """A graph file gets the store's labels on unlabelled feature nodes (when a browser serves a store)."""
        if self.config.browser is not None and "/" not in relative and relative.endswith(".json") \
                and relative != METADATA_FILE:
            data = self.config.browser.labelled_graph(target)
            if data is not None:
                return self._send_bytes(data, _TYPES[".json"])
        return self._send_file(target)

    def _features(self, name: str):
        feature = _FEATURE_JSON.match(name)
        if feature:
            return self._feature_document(int(feature.group(1)))
        pack_file = self.config.features.pack_file(name)
        if pack_file is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no feature file {name}")
        return self._send_file(pack_file)

    def _feature_document(self, cantor_id: int):
        try:
            data = self.config.features.document_bytes(cantor_id)
        except Exception as exc:  # a server boundary: log it, and let the viewer show "failed to load"
            traceback.print_exc(file=sys.stderr)
            data = dead_document(cantor_id, f"server error: {type(exc).__name__}: {exc}")
        return self._send_bytes(data, _TYPES[".json"])

    def _file(self, root: Path, relative: str):
        target = safe_join(root, relative)
        if target is None:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the served directory")
        if not target.is_file():
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        return self._send_file(target)

    # ---- POST /save_graph/<slug> ----

    def do_POST(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.send_body = True
        self.close_connection = True  # a refused body is never read, so the connection cannot be reused
        if not path.startswith("/save_graph/") or self.config.graphs is None:
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        origin = self.headers.get("Origin")
        if not self._host_allowed() or (origin and not self._is_own_host(urllib.parse.urlsplit(origin).hostname)):
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin save refused")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "save_graph takes application/json")
        try:
            slug = check_slug(path[len("/save_graph/"):])
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_POST_BYTES:
                raise UserError(f"body must be 1..{MAX_POST_BYTES} bytes")
            q_params = json.loads(self.rfile.read(length)).get("qParams")
            if not isinstance(q_params, dict):
                raise UserError("body has no qParams object")
        except (UserError, ValueError, AttributeError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        target = safe_join(self.config.graphs, f"{slug}.json")
        if target is None or not target.is_file():
            return self._error(HTTPStatus.NOT_FOUND, f"no graph {slug}")
        with _SAVE_LOCK:
            graph = json.loads(target.read_text(encoding="utf-8"))
            graph["qParams"] = q_params
            write_bytes_atomic(target, json.dumps(graph, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        return self._send_bytes(b'{"ok":true}', _TYPES[".json"])

    # ---- who may ask ----

    def _is_own_host(self, hostname: str | None) -> bool:
        return hostname is not None and (is_loopback(hostname) or hostname == self.server.server_address[0])

    def _host_allowed(self) -> bool:
        """On loopback, only loopback Host names: a page whose domain re-resolves to 127.0.0.1 (DNS rebinding)
        cannot read the graphs. Bound elsewhere on purpose, any Host is accepted."""
        if not is_loopback(self.server.server_address[0]):
            return True
        host = self.headers.get("Host")
        return host is None or self._is_own_host(urllib.parse.urlsplit(f"//{host}").hostname)

    # ---- responses ----

    def _send_bytes(self, data: bytes, content_type: str, status: int = HTTPStatus.OK, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.send_body:
            self.wfile.write(data)

    def _send_file(self, path: Path):
        content_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = path.stat().st_size
        wanted = parse_range(self.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            return self._send_bytes(b"", content_type, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                                    {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        with open(path, "rb") as handle:
            if wanted is None:
                return self._send_bytes(handle.read(), content_type, headers={"Accept-Ranges": "bytes"})
            start, end = wanted
            handle.seek(start)
            data = handle.read(end - start + 1)
        return self._send_bytes(data, content_type, HTTPStatus.PARTIAL_CONTENT,
                                {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"})

    def _error(self, status: int, message: str):
        body = json.dumps({"error": message}).encode()
        self._send_bytes(body, _TYPES[".json"], status)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def log_error(self, format, *args):  # noqa: A002
        sys.stderr.write(f"featurestore serve: {format % args}\n")


_SAVE_LOCK = threading.Lock()


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: ViewerConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, verbose: bool = False):
        handler = type("BoundViewerHandler", (ViewerHandler,), {"config": config})
        self.config = config
        self.verbose = verbose
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), handler)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="featurestore-serve", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def notices(config: ViewerConfig, host: str) -> list[str]:
    """What the user should know before opening the page (printed on stderr by the CLI)."""
    lines = []
    if config.online:
        lines.append("viewer scripts not fetched (run `make` or `python -m exporters.viewer_assets fetch`); "
                     "the page loads them online: " + ", ".join(config.online))
    if config.unknown:
        lines.append("the viewer page also loads scripts this server does not know: " + ", ".join(config.unknown))
    if not is_loopback(host):
        lines.append(f"listening on {host}: anyone who can reach this address can read the graphs and features")
    if not config.has_local_source:
        lines.append("no --store/--features: features load from each graph's scan (Hub scans need internet)")
    return lines
