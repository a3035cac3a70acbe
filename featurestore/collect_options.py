"""Collection options, checked before any model is loaded (and importable without torch, for the CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import schema
from .data import FORMATS
from .errors import UserError
from .neuron_windows import SAMPLE_PER_CHUNK


@dataclass
class CollectOptions:
    format: str = "deepseek"
    max_length: int = 10000
    max_samples: int | None = None
    layers: list[int] | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_tokens: int = 16384
    skip_incomplete: bool = False
    source: str = "transcoder"
    neurons_per_layer: int = 500
    adapters: str | None = None  # neurons: "off" (default, the original's model without adapters) or "on"
    neuron_samples: int = SAMPLE_PER_CHUNK  # neurons: uniformly sampled example windows kept per chunk and neuron
    seed: int = 0
    chunk_size: int = 64
    tokenizer: str | None = None
    revision: str | None = None
    flush_rows: int = 4_000_000
    writer_threads: int = 2  # threads that sort and write activation parts (GIL-free work in pyarrow)
    pinned_transfers: bool = True  # CUDA: rows cross to pinned host memory without blocking the forward pass
    progress: bool = True
    compact: bool = True  # merge each layer's chunk files when the run completes (featurestore.compaction)
    # test hook: stop (as if killed) after this many chunks were committed in this run
    stop_after_chunks: int | None = field(default=None, repr=False)


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0,3,5-7"`` → [0, 3, 5, 6, 7]; None or "all" → None (every layer)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise UserError(f"bad --layers {spec!r}: the range {part} runs backwards; write {hi}-{lo}")
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise UserError(f"bad --layers {spec!r}: use e.g. 0,3,5-7") from None
    return sorted(layers)


def check_options(opts: CollectOptions) -> None:
    """Refuse bad options before any model is loaded."""
    if opts.source not in schema.SOURCES:
        raise UserError(f"unknown --source {opts.source!r}; use transcoder or neurons")
    if opts.format not in FORMATS:
        raise UserError(f"unknown --format {opts.format!r}; use one of {', '.join(FORMATS)}")
    for name in ("max_length", "batch_tokens", "chunk_size", "writer_threads"):
        if getattr(opts, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if opts.adapters not in (None, "on", "off"):
        raise UserError(f"unknown --adapters {opts.adapters!r}; use on or off")
    if opts.source == "transcoder" and opts.adapters == "off":
        raise UserError("--adapters off applies to --source neurons only (transcoder features are the adapters')")
    if opts.neuron_samples < 1:
        raise UserError("--neuron-samples must be positive")
    if opts.max_samples is not None and opts.max_samples <= 0:
        raise UserError("--max-samples must be positive")
