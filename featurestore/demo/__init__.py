"""Embedded demo assets: a bundled trace dataset and a small transcoder-adapter model built in code.

Nothing binary is shipped: the tokenizer is trained on ``traces.jsonl`` and the weights are generated
from a seed, both deterministically, so ``featurestore demo`` works offline on any machine.
"""
from __future__ import annotations

from .checkpoint import DEMO_VERSION, build_demo_checkpoint
from .model import build_model
from .tokenizer import build_tokenizer, traces_path

TRACES_PATH = traces_path()

__all__ = ["DEMO_VERSION", "TRACES_PATH", "build_demo_checkpoint", "build_model", "build_tokenizer"]
