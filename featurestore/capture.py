"""Taking activations out of a batched forward pass as sparse (feature, seq_id, pos, act) rows.

Everything is tensor work on the model's device; nothing loops over activations in Python.
- Transcoder features: every non-zero of relu(W_enc x + b_enc), read by the adapter's feature hook.
- MLP neurons: the input of ``down_proj`` (act(gate)·up) for a seeded sample of neurons; per sequence,
  each neuron's top 20 positions above 0.01, plus exact counts of positive activations over all tokens.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .errors import UserError
from .neuron_counts import CountAccumulator
from .neuron_windows import SAMPLE_PER_CHUNK, TOP_PER_CHUNK, WindowAccumulator

NEURON_TOP_K = 20
NEURON_MIN_ACT = 0.01


class StopForward(Exception):
    """Raised after the last requested layer so later layers (and the LM head) are not computed."""


def nonfinite_tensors(model, last_layer: int) -> list[str]:
    """Names of the checkpoint tensors a collection up to ``last_layer`` uses (embeddings, those layers, final norm
    and LM head for the logit lens) that hold NaN or Infinity: one reduction per tensor, before anything is written."""
    wanted = ("model.embed_tokens.", "model.norm.", "lm_head.") + tuple(f"model.layers.{i}." for i in range(last_layer + 1))
    return [name for name, tensor in model.named_parameters()
            if name.startswith(wanted) and not bool(torch.isfinite(tensor).all())]


def refuse_nonfinite_weights(model, last_layer: int) -> None:
    bad = nonfinite_tensors(model, last_layer)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        layer = next((int(n.split(".")[2]) for n in bad if n.startswith("model.layers.")), None)
        where = f"layer {layer}: " if layer is not None else ""
        raise UserError(f"{where}checkpoint tensor {bad[0]}{more} holds NaN or Infinity; refusing to collect "
                        "non-finite activations (nothing of it was committed)")


def refuse_nonfinite_activations(model, source: str, layer: int) -> None:
    """Names the weights when they are at fault (checked only now, on the error path)."""
    refuse_nonfinite_weights(model, layer)
    raise UserError(f"non-finite {source} activations (NaN or Infinity) at layer {layer}, although the checkpoint's "
                    "tensors are finite (an overflow of --dtype? try float32); this chunk was not committed")


class LayerAccumulator:
    """Rows and per-feature statistics of one (source, layer) within the current chunk.

    Rows arrive as packed (4, n) int32 blocks (feature, seq_id, pos, act's float32 bits), one per layer and batch,
    so a batch's rows cross to the host in one copy; on CUDA the copy goes into pinned memory without blocking,
    and ``take_rows`` waits for it only when the rows are flushed.
    """

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.parts: list[tuple[torch.Tensor, object]] = []  # (packed rows on CPU, CUDA event or None)
        self.n_rows = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.count = np.zeros(self.n_units, dtype=np.int64)
        self.sum = np.zeros(self.n_units, dtype=np.float64)
        self.max = np.zeros(self.n_units, dtype=np.float32)

    def add_packed(self, packed: torch.Tensor, ready=None) -> None:
        self.parts.append((packed, ready))
        self.n_rows += packed.shape[1]

    def take_rows(self) -> tuple[np.ndarray, ...] | None:
        if not self.parts:
            return None
        for _, ready in self.parts:
            if ready is not None:
                ready.synchronize()
        packed = torch.cat([p for p, _ in self.parts], dim=1).numpy()
        self.parts, self.n_rows = [], 0
        return packed[0], packed[1], packed[2], packed[3].view(np.float32)

    def add_stats(self, stats: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        count, total, peak = stats
        self.count += count
        self.sum += total
        np.maximum(self.max, peak, out=self.max)

    def take_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stats = (self.count, self.sum, self.max)
        self.reset_stats()
        return stats


def stats_from_rows(feature: np.ndarray, act: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact per-unit count, sum and maximum of a block of rows (computed on the writer threads)."""
    peak = np.zeros(n_units, dtype=np.float32)
    np.maximum.at(peak, feature, act)
    return np.bincount(feature, minlength=n_units), np.bincount(feature, weights=act, minlength=n_units), peak


class Capture:
    """Installs hooks on a model and routes each batch's activations into per-layer accumulators."""

    source: str

    def __init__(self, model, layers: list[int]):
        self.model = model
        self.layers = sorted(layers)
        self.last_layer = self.layers[-1]
        self.seq_ids: torch.Tensor | None = None  # (B,) int32 on the device
        self.valid: torch.Tensor | None = None  # (B, T) bool on the device
        self.acc: dict[int, LayerAccumulator] = {}
        self._handles: list = []
        self.pinned = True  # CUDA rows go to pinned host memory without blocking (False: a blocking copy per layer)
        self.transfer_s = 0.0  # host time spent handing rows to the host (includes waits for the device)

    def set_batch(self, seq_ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.seq_ids, self.valid = seq_ids, valid

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _emit(self, layer: int, b: torch.Tensor, t: torch.Tensor, f: torch.Tensor, act: torch.Tensor) -> None:
        packed = torch.stack([f.to(torch.int32), self.seq_ids[b], t.to(torch.int32), act.to(torch.float32).view(torch.int32)])
        started = time.perf_counter()
        ready = None
        if packed.is_cuda and self.pinned:
            host = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = packed.cpu()
        self.transfer_s += time.perf_counter() - started
        self.acc[layer].add_packed(host, ready)


class TranscoderCapture(Capture):
    source = "transcoder"

    def __init__(self, model, layers: list[int]):
        super().__init__(model, layers)
        adapters = [layer.mlp for layer in model.model.layers]
        n_features = adapters[0].transcoder_enc.out_features
        self.acc = {layer: LayerAccumulator(n_features) for layer in self.layers}
        wanted = set(self.layers)
        for index, adapter in enumerate(adapters):
            adapter.feature_hook = self._hook if index in wanted else None
        self._adapters = adapters

    def remove(self) -> None:
        for adapter in self._adapters:
            adapter.feature_hook = None

    def _hook(self, layer: int, features: torch.Tensor) -> None:
        # Flat 1-D indexing is several times faster than (b, t, f) advanced indexing on CPU.
        n_features, length = features.shape[-1], features.shape[1]
        flat = features.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        token = idx // n_features
        idx = idx[self.valid.reshape(-1)[token]]  # drop padding positions
        token = idx // n_features
        b = token // length
        self._emit(layer, b, token - b * length, idx - token * n_features, flat[idx])
        if layer == self.last_layer:
            raise StopForward


class NeuronCapture(Capture):
    source = "neuron"

    def __init__(self, model, layers: list[int], neurons: dict[int, list[int]], window_top: int = TOP_PER_CHUNK,
                 window_sample: int = SAMPLE_PER_CHUNK, seed: int = 0):
        super().__init__(model, layers)
        self.neurons = {layer: torch.as_tensor(neurons[layer], dtype=torch.long) for layer in self.layers}
        self.acc = {layer: LayerAccumulator(len(neurons[layer])) for layer in self.layers}
        self.counts = {layer: CountAccumulator(len(neurons[layer])) for layer in self.layers}
        self.groups = None  # (region, bin, domains) of the batch, for the exact breakdown counts
        # example windows with the true activations (featurestore.neuron_windows)
        self.windows = {layer: WindowAccumulator(np.asarray(neurons[layer]), window_top, window_sample, seed)
                        for layer in self.layers}
        for layer in self.layers:
            down = model.model.layers[layer].mlp.down_proj
            self._handles.append(down.register_forward_pre_hook(self._make_hook(layer)))

    def _make_hook(self, layer: int):
        def hook(module, args):
            self._hook(layer, args[0])

        return hook

    def _hook(self, layer: int, hidden: torch.Tensor) -> None:
        index = self.neurons[layer].to(hidden.device)
        acts = hidden.index_select(-1, index).float()  # (B, T, n)
        self.windows[layer].add_batch(acts, self.valid, self.seq_ids)
        valid = self.valid[:, :, None]
        if not bool((torch.isfinite(acts) | ~valid).all()):  # NaN is never > 0: it would vanish from rows and counts
            refuse_nonfinite_activations(self.model, self.source, layer)
        positive = (acts > 0) & valid
        acc = self.acc[layer]
        acc.count += positive.sum(dim=(0, 1)).cpu().numpy()
        if self.groups is not None:
            self.counts[layer].add_batch(positive, *self.groups)
        acc.sum += torch.where(positive, acts, 0).sum(dim=(0, 1)).double().cpu().numpy()
        acc.max = np.maximum(acc.max, torch.where(positive, acts, 0).amax(dim=(0, 1)).cpu().numpy())
        k = min(NEURON_TOP_K, acts.shape[1])
        masked = acts.masked_fill(~valid, float("-inf"))
        values, positions = masked.topk(k, dim=1)  # (B, k, n)
        keep = values > NEURON_MIN_ACT
        b, j, n = keep.nonzero(as_tuple=True)
        # Rows of a neuron carry its position in the sample; the writer maps it back to the neuron index.
        self._emit(layer, b, positions[b, j, n], n, values[b, j, n])
        if layer == self.last_layer:
            raise StopForward


def sample_neurons(intermediate_size: int, n_per_layer: int, layers: list[int], seed: int) -> dict[int, list[int]]:
    """A seeded, sorted sample of neuron indices per layer (independent of which other layers are asked)."""
    n = min(n_per_layer, intermediate_size)
    return {
        layer: sorted(np.random.default_rng([seed, layer]).choice(intermediate_size, size=n, replace=False).tolist())
        for layer in layers
    }
