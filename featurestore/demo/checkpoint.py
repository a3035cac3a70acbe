"""Build the demo checkpoint once per directory: reuse a complete build of the same version, else build atomically.

The build goes to a hidden sibling directory and is renamed into place only when complete, with a marker
file written last, so an interrupted build never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ..errors import UserError
from .model import build_model
from .tokenizer import traces_path

DEMO_VERSION = "featurestore-demo/1"  # bump when the model or tokenizer construction changes
MARKER = "featurestore-demo.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_stamp(seed: int = 0) -> dict:
    """What a build depends on: the construction version, the traces the tokenizer is trained on, the seed."""
    digest = hashlib.sha256(traces_path().read_bytes()).hexdigest()
    return {"version": DEMO_VERSION, "traces_sha256": digest, "seed": seed}


def is_complete(out_dir: Path, seed: int = 0) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file() or not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text()) == build_stamp(seed)
    except ValueError:
        return False


def build_demo_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """The demo model + tokenizer in ``out_dir`` (built unless already there); returns the directory."""
    out = Path(out_dir).expanduser()
    if is_complete(out, seed):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"{out} exists and is not a demo checkpoint; pass an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        build_model(staging, seed=seed)
        (staging / MARKER).write_text(json.dumps(build_stamp(seed), indent=2) + "\n")
        if out.exists():  # an older or incomplete demo build: swap it out
            retired = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
