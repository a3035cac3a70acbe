"""Build the trained demo checkpoint once: reuse a complete build of the same training key, else train atomically.

A build is keyed by :meth:`TrainConfig.key` (the config, the training code and the traces), so a change that
changes training invalidates it. Builds are kept in a cache directory (``$FEATURESTORE_DEMO_CACHE``; in a
source checkout ``<checkout>/.cache/demo``, which git ignores and ``make clean`` removes; else
``~/.cache/featurestore/demo``) and copied to the requested directory, so the demo, the tests and the
benchmarks train once. Every build goes to a hidden sibling directory and is renamed into place only when
complete, with a marker file written last, so an interrupted build never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ..errors import UserError
from .train import METRICS_FILE, TrainConfig, train_demo

DEMO_VERSION = "featurestore-demo/2"  # bump when the checkpoint layout changes
MARKER = "featurestore-demo.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", METRICS_FILE)


def build_stamp(config: TrainConfig) -> dict:
    """What a build depends on: the layout version and the training key (config + code + traces)."""
    return {"version": DEMO_VERSION, "train_key": config.key(), "seed": config.seed}


def cache_root() -> Path:
    env = os.environ.get("FEATURESTORE_DEMO_CACHE")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".cache" / "demo"
    return Path.home() / ".cache" / "featurestore" / "demo"


def is_complete(out_dir: Path, config: TrainConfig | None = None) -> bool:
    marker = Path(out_dir) / MARKER
    if not marker.is_file() or not all((Path(out_dir) / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text()) == build_stamp(config or TrainConfig())
    except ValueError:
        return False


def _install(staging: Path, out: Path) -> None:
    """Rename a complete staging directory to ``out``, swapping out an older build there."""
    if out.exists():
        retired = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")


def build_demo_checkpoint(out_dir: str | Path, seed: int = 0, *, rebuild: bool = False,
                          config: TrainConfig | None = None, progress: bool = True, use_cache: bool = True) -> Path:
    """The trained demo checkpoint in ``out_dir`` (from the cache, else trained); returns the directory.

    ``rebuild`` retrains even when a complete build exists (and refreshes the cache).
    """
    config = config or TrainConfig(seed=seed)
    out = Path(out_dir).expanduser()
    if not rebuild and is_complete(out, config):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"{out} exists and is not a demo checkpoint; pass an empty or new directory")
    cached = cache_root() / config.key()
    staging = _staging(out)
    try:
        if use_cache and not rebuild and is_complete(cached, config):
            shutil.copytree(cached, staging)
        else:
            train_demo(staging, config, progress=progress)
            (staging / MARKER).write_text(json.dumps(build_stamp(config), indent=2) + "\n")
            if use_cache and cached.resolve() != out.resolve():
                _save_to_cache(staging, cached)
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _save_to_cache(build: Path, cached: Path) -> None:
    try:
        staging = _staging(cached)
        try:
            shutil.copytree(build, staging)
            _install(staging, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:  # a read-only or full cache only costs a retrain next time
        pass


def training_metrics(checkpoint: str | Path) -> dict:
    """What training reached (held-out accuracy, KL, L0, dead features), as saved with the build."""
    return json.loads((Path(checkpoint) / METRICS_FILE).read_text())
