"""The circuit-tracer viewer's page scripts, made local: registry packages fetched at setup, page rewritten to use them.

The viewer's ``index.html`` loads d3, a d3-jetpack fork, npy and a live-reload client from transformer-circuits.pub
and dagre and pako from unpkg.com. ``fetch_assets`` takes d3 7.x, dagre 0.8.5 and pako 2.1.0 from the npm registry
(``npm pack``, nothing installed, nothing committed) into an ignored cache directory; ``rewrite_page`` points the
page at those copies and at our own ``viewer_compat.js`` (the d3-jetpack functions the viewer calls), drops npy and
the live-reload client (graphs need neither), and falls back to an online original for any copy that is missing.

    python -m exporters.viewer_assets fetch [DEST]      # what `make` runs
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from featurestore.errors import UserError
from featurestore.storage import write_bytes_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
COMPAT_SCRIPT = PACKAGE_DIR / "viewer_compat.js"
LOCAL_FEATURES_SCRIPT = PACKAGE_DIR / "viewer_local_features.js"
ASSETS_ENV = "FEATURESTORE_VIEWER_ASSETS"
MANIFEST = "manifest.json"
ROUTE_PREFIX = "/featurestore-assets/"


@dataclass(frozen=True)
class Vendored:
    """One third-party script: where npm has it, and the online original the viewer used."""
    name: str            # file name in the cache and under ROUTE_PREFIX
    npm_spec: str
    member: str          # path inside the npm tarball
    online_url: str
    matches: str         # substring of the viewer's <script src> this copy replaces


VENDORED = (
    Vendored("d3.min.js", "d3@7.9.0", "package/dist/d3.min.js",
             "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js", "/lib/d3.js"),
    Vendored("dagre.min.js", "dagre@0.8.5", "package/dist/dagre.min.js",
             "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js", "dagre@"),
    Vendored("pako.min.js", "pako@2.1.0", "package/dist/pako.min.js",
             "https://unpkg.com/pako@2.1.0/dist/pako.min.js", "pako@"),
)
_REPLACED_BY_COMPAT = "jetpack"
_DROPPED = ("hotserver-client", "npy_v0")  # live reload and .npy parsing: not used by graphs
_SCRIPT_TAG = re.compile(r"""<script\s+src=(['"])(?P<src>[^'"]+)\1\s*>\s*</script>\s*\n?""", re.IGNORECASE)


def default_assets_dir() -> Path:
    """``$FEATURESTORE_VIEWER_ASSETS``, else ``.cache/viewer-assets`` at the repository root (ignored by git)."""
    configured = os.environ.get(ASSETS_ENV)
    if configured:
        return Path(configured).expanduser()
    return PACKAGE_DIR.parent / ".cache" / "viewer-assets"


def frontend_dir() -> Path:
    """The installed circuit-tracer package's viewer assets (index.html, util.js, ...)."""
    try:
        import circuit_tracer
    except ImportError:
        raise UserError("circuit-tracer is not installed; `pip install circuit-tracer==0.5.0` provides the viewer") from None
    assets = Path(circuit_tracer.__file__).resolve().parent / "frontend" / "assets"
    if not (assets / "index.html").is_file():
        raise UserError(f"{assets}/index.html is missing: the circuit-tracer install has no viewer assets")
    return assets


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(dest: Path) -> dict:
    try:
        return json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def present_assets(dest: str | os.PathLike | None = None) -> dict[str, Path]:
    """Vendored scripts in ``dest`` whose bytes match the manifest written by ``fetch_assets``."""
    dest = Path(dest) if dest is not None else default_assets_dir()
    manifest = read_manifest(dest).get("files", {})
    found = {}
    for item in VENDORED:
        path = dest / item.name
        recorded = manifest.get(item.name, {})
        if recorded.get("npm") == item.npm_spec and path.is_file() and _sha256(path.read_bytes()) == recorded.get("sha256"):
            found[item.name] = path
    return found


def fetch_assets(dest: str | os.PathLike | None = None, npm: str = "npm") -> dict[str, Path]:
    """Download the pinned npm tarballs with ``npm pack`` and keep only the dist scripts; idempotent."""
    dest = Path(dest) if dest is not None else default_assets_dir()
    have = present_assets(dest)
    missing = [item for item in VENDORED if item.name not in have]
    if not missing:
        return have
    if shutil.which(npm) is None:
        raise UserError(f"{npm} not found: install Node.js/npm (Debian: apt-get install -y npm) to fetch the viewer scripts")
    dest.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(dest)
    files = manifest.setdefault("files", {})
    with tempfile.TemporaryDirectory(prefix="viewer-assets-") as tmp:
        command = [npm, "pack", "--json", "--silent", "--pack-destination", tmp, *(item.npm_spec for item in missing)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise UserError(f"`{' '.join(command)}` failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
        packed = {entry["id"]: entry for entry in json.loads(result.stdout)}
        for item in missing:
            entry = packed.get(item.npm_spec)
            if entry is None:
                raise UserError(f"npm pack did not return {item.npm_spec}")
            with tarfile.open(Path(tmp) / entry["filename"], "r:gz") as tarball:
                member = tarball.extractfile(item.member)
                if member is None:
                    raise UserError(f"{item.npm_spec} has no {item.member}")
                data = member.read()
            write_bytes_atomic(dest / item.name, data)
            files[item.name] = {"npm": item.npm_spec, "member": item.member, "integrity": entry.get("integrity"),
                                "sha256": _sha256(data)}
    write_bytes_atomic(dest / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return present_assets(dest)


@dataclass
class RewrittenPage:
    html: str
    online: list[str]      # online originals still used because the local copy is missing
    unknown: list[str]     # external scripts this module does not know (left as they are)


def rewrite_page(html: str, local: dict[str, Path], extra_head: str = "") -> RewrittenPage:
    """Point the viewer page's external <script> tags at local routes (or online originals where no copy exists).

    ``extra_head`` (e.g. our local-features script) goes right after the vendor scripts, before the viewer's own.
    """
    online, unknown = [], []

    def replace(match: re.Match) -> str:
        src = match.group("src")
        if not src.startswith(("http://", "https://", "//")):
            return match.group(0)
        if any(name in src for name in _DROPPED):
            return ""
        if _REPLACED_BY_COMPAT in src:
            return _tag(ROUTE_PREFIX + COMPAT_SCRIPT.name)
        item = next((item for item in VENDORED if item.matches in src), None)
        if item is None:
            unknown.append(src)
            return match.group(0)
        if item.name in local:
            return _tag(ROUTE_PREFIX + item.name)
        online.append(item.online_url)
        return _tag(item.online_url)

    rewritten = _SCRIPT_TAG.sub(replace, html)
    if extra_head:
        # after the last vendor script = before the first relative (viewer) script
        first_local = re.search(r"""<script\s+src=['"]\./""", rewritten)
        at = first_local.start() if first_local else 0
        rewritten = rewritten[:at] + extra_head + rewritten[at:]
    return RewrittenPage(rewritten, online, unknown)


def _tag(src: str) -> str:
    return f"<script src='{src}'></script>\n"


def own_script(name: str) -> Path | None:
    """Our own scripts served under ROUTE_PREFIX (always available)."""
    for path in (COMPAT_SCRIPT, LOCAL_FEATURES_SCRIPT):
        if path.name == name:
            return path
    return None


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "fetch" or len(argv) > 2:
        print("usage: python -m exporters.viewer_assets fetch [DEST]", file=sys.stderr)
        return 2
    dest = Path(argv[1]) if len(argv) == 2 else default_assets_dir()
    try:
        found = fetch_assets(dest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"viewer scripts in {dest}: {', '.join(sorted(found))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
