"""Embedded demo assets: bundled traces and a miniature of the paper trained in code on them.

Nothing binary is shipped: the tokenizer is trained on ``traces.jsonl``, then a base model, its reasoning
fine-tune and transcoder adapters between them are trained on CPU (``train.py``), deterministically and
cached, so ``featurestore demo`` works offline on any machine.
"""
from __future__ import annotations

from .checkpoint import DEMO_VERSION, build_demo_checkpoint, training_metrics
from .tokenizer import build_tokenizer, traces_path
from .train import TrainConfig, train_demo

TRACES_PATH = traces_path()

__all__ = ["DEMO_VERSION", "TRACES_PATH", "TrainConfig", "build_demo_checkpoint", "build_tokenizer", "train_demo",
           "training_metrics"]
