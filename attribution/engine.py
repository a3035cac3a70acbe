"""Edge rows: the transpose of the frozen RelP-linear map applied to a whole batch of targets at once.

Columns (sources) are ``[active features | P tokens]``; the active features are ordered by
(layer, position, feature), so each layer's features are one contiguous block of columns.
A target is a readout vector at one *site* and position: with ``encoder-input`` injection site l is
layer l's adapter-encoder input (post-attention-norm output), with ``layer-input`` it is the residual
entering layer l; site ``n_layers`` is the final-norm output (logits). Its row holds
``activation * d target / d activation`` for every active feature and ``embedding . d target / d embedding``
for every token, in float32.

The backward is written out (architectures.py holds the per-module transposes) rather than run by
autograd: the cotangents of a batch of B targets are (B, n, d) tensors pushed through the frozen
coefficients with plain matrix products, only over the layers below the highest target and the
positions up to the last target (causal attention: later positions get no gradient), and the
gradients are gathered straight into the rows with tensor indexing. tests/test_attribution.py checks
every edge against autograd through the ``detach`` forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .architectures import LlamaFamily
from .linearised import Trace

INJECTIONS = ("encoder-input", "layer-input")


@dataclass
class ActiveFeatures:
    layers: torch.Tensor  # (n,) long
    positions: torch.Tensor  # (n,) long
    features: torch.Tensor  # (n,) long
    values: torch.Tensor  # (n,) float32
    offsets: list[int]  # layer l owns columns offsets[l]:offsets[l+1]

    def __len__(self) -> int:
        return int(self.layers.numel())


def find_active_features(trace: Trace, first_position: int = 0) -> ActiveFeatures:
    """Every (layer, position >= first_position, feature) with a positive activation, vectorised per layer (CPU)."""
    layers, positions, features, values, offsets = [], [], [], [], [0]
    for layer, acts in enumerate(trace.activations):
        index = acts[first_position:].nonzero()
        values.append(acts[first_position:][index[:, 0], index[:, 1]].float().cpu())
        index = index.cpu()
        layers.append(torch.full((len(index),), layer, dtype=torch.long))
        positions.append(index[:, 0] + first_position)
        features.append(index[:, 1])
        offsets.append(offsets[-1] + len(index))
    return ActiveFeatures(torch.cat(layers), torch.cat(positions), torch.cat(features), torch.cat(values), offsets)


@dataclass
class LayerLayout:
    """One layer's active features arranged (position, slot) so decoder columns can be gathered padded per position."""

    start: int  # first column of the layer
    positions: torch.Tensor  # (n_l,) sorted, on the model device
    slots: torch.Tensor  # (n_l,) index of the feature among its position's features
    padded: torch.Tensor  # (P, K) feature ids per position, padded with 0
    values: torch.Tensor  # (n_l,) activations, float32

    @classmethod
    def build(cls, active: ActiveFeatures, layer: int, n_pos: int, device) -> "LayerLayout":
        start, stop = active.offsets[layer], active.offsets[layer + 1]
        positions, features = active.positions[start:stop], active.features[start:stop]
        counts = torch.bincount(positions, minlength=n_pos)
        slots = torch.arange(stop - start) - (torch.cumsum(counts, 0) - counts)[positions]
        padded = torch.zeros(n_pos, max(1, int(counts.max())), dtype=torch.long)
        padded[positions, slots] = features
        return cls(start, positions.to(device), slots.to(device), padded.to(device),
                   active.values[start:stop].to(device))


class RowComputer:
    """Computes the edge rows of a batch of targets with one pass of the transposed linear map."""

    def __init__(self, arch: LlamaFamily, trace: Trace, active: ActiveFeatures, injection: str,
                 chunk_elements: int = 1 << 25):
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, not {injection!r}")
        if trace.coefficients is None:
            raise ValueError("RowComputer needs a trace recorded with record=True")
        self.arch, self.active, self.injection = arch, active, injection
        self.coefficients = trace.coefficients
        self.embeddings = trace.embeddings[0].detach()
        self.n_pos = self.embeddings.shape[0]
        self.n_columns = len(active) + self.n_pos
        self.chunk_elements = chunk_elements
        self.layouts = [LayerLayout.build(active, layer, self.n_pos, self.embeddings.device)
                        for layer in range(arch.n_layers)]

    def __call__(self, sites: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows (B, n_active + P) float32 for targets reading ``vectors[b]`` at ``sites[b]``, ``positions[b]``."""
        arch, coef, n_layers = self.arch, self.coefficients, self.arch.n_layers
        sites, positions = sites.cpu(), positions.cpu()
        batch, n = len(sites), int(positions.max()) + 1
        vectors = vectors.to(self.embeddings)
        final = (sites == n_layers).nonzero()[:, 0]
        if len(final):  # a logit reads the final-norm output: its cotangent at the last residual
            vectors = vectors.clone()
            vectors[final] = vectors[final] * coef.norm_final[positions[final].to(vectors.device)]
        # residual sites h_s (cotangent added at the input of layer s) and encoder-input sites x_l (inside layer l)
        at_residual = torch.ones_like(sites, dtype=torch.bool) if self.injection == "layer-input" else sites == n_layers
        top = int(torch.where(at_residual, sites - 1, sites).max())
        grad = torch.zeros(batch, n, arch.d_model, dtype=vectors.dtype, device=vectors.device)
        live = False
        rows = torch.zeros(batch, self.n_columns, dtype=torch.float32, device=vectors.device)
        for layer in range(top, -1, -1):
            live |= self._inject(grad, at_residual & (sites == layer + 1), positions, vectors)
            if live:  # grad is the cotangent at this layer's output = at its MLP (and decoder) output
                self._feature_columns(layer, grad, rows, n)
                inner = arch.mlp_transpose(layer, coef.gate[layer][:n], coef.up[layer][:n], grad)
            else:
                inner = torch.zeros_like(grad)
            live |= self._inject(inner, ~at_residual & (sites == layer), positions, vectors)
            if not live:
                continue
            grad = grad + inner * coef.norm_mlp[layer][:n]
            pattern = coef.patterns[layer][:, :n, :n]
            grad = grad + arch.attention_transpose(layer, pattern, grad) * coef.norm_in[layer][:n]
        self._inject(grad, at_residual & (sites == 0), positions, vectors)
        token_columns = slice(len(self.active), len(self.active) + n)
        rows[:, token_columns] = (grad.float() * self.embeddings[:n].float()).sum(-1).to(rows.device)
        return rows

    @staticmethod
    def _inject(grad: torch.Tensor, chosen: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> bool:
        slots = chosen.nonzero()[:, 0]
        if not len(slots):
            return False
        device = grad.device
        grad[slots.to(device), positions[slots].to(device)] += vectors[slots.to(vectors.device)]
        return True

    def _feature_columns(self, layer: int, grad: torch.Tensor, rows: torch.Tensor, n: int) -> None:
        """rows[:, s] = a_s * (grad[:, p_s] . W_dec[:, f_s]) for the layer's active features before position n.

        Per position, one small matrix product of the B gradients with that position's (padded) decoder
        columns, batched over a chunk of positions: no per-feature copies of the gradient.
        """
        layout = self.layouts[layer]
        count = int(torch.searchsorted(layout.positions, n))  # features are sorted by position
        if count == 0:
            return
        decoder = self.arch.decoder(layer).weight  # (d_model, n_features)
        width = layout.padded.shape[1]
        step = max(1, self.chunk_elements // (grad.shape[-1] * max(width, grad.shape[0])))
        by_position = grad.transpose(0, 1)  # (n, B, d)
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            first, last = (int(torch.searchsorted(layout.positions, p)) for p in (lo, hi))
            if first == last:
                continue
            columns = decoder[:, layout.padded[lo:hi]].permute(1, 0, 2).float()  # (chunk, d, K)
            dots = torch.bmm(by_position[lo:hi].float(), columns)  # (chunk, B, K)
            picked = dots[layout.positions[first:last] - lo, :, layout.slots[first:last]]  # (features, B)
            target = slice(layout.start + first, layout.start + last)
            rows[:, target] = (picked.T * layout.values[first:last]).to(rows.device)


def partial_influences(rows: torch.Tensor, row_nodes: torch.Tensor, logit_probabilities: torch.Tensor,
                       max_iter: int = 128) -> torch.Tensor:
    """Influence of every column on the logits through the rows filled so far (row-normalised |A| powers)."""
    normalised = rows.abs()
    normalised /= normalised.sum(dim=1, keepdim=True).clamp(min=1e-8)
    weights = torch.zeros(rows.shape[1], device=rows.device)
    weights[-len(logit_probabilities):] = logit_probabilities.to(rows.device)
    total = torch.zeros_like(weights)
    for _ in range(max_iter):
        weights = weights[row_nodes] @ normalised
        if not weights.any():
            return total
        total += weights
    raise RuntimeError(f"partial influence did not converge in {max_iter} iterations (is the graph acyclic?)")


def encoder_rows(arch: LlamaFamily, layers: torch.Tensor, features: torch.Tensor, device) -> torch.Tensor:
    """W_enc[l][f] for each (l, f), float32, gathered row by row (never a copy of whole encoders)."""
    vectors = torch.empty(len(layers), arch.d_model, dtype=torch.float32, device=device)
    for layer in layers.unique().tolist():
        slots = (layers == layer).nonzero()[:, 0]
        weight = arch.encoder(layer).weight
        vectors[slots.to(device)] = weight[features[slots].to(weight.device)].float().to(device)
    return vectors


@dataclass
class EdgeRows:
    rows: torch.Tensor  # (k + M, n_active + P + k) float32; logit rows first, then features in visit order
    row_nodes: torch.Tensor  # (k + M,) column index of each row's node
    visited: torch.Tensor  # (M,) active-feature indices in visit order


def compute_edge_rows(
    computer: RowComputer,
    logit_vectors: torch.Tensor,
    logit_probabilities: torch.Tensor,
    *,
    max_feature_nodes: int,
    batch_size: int,
    update_interval: int = 4,
    progress: bool = False,
) -> EdgeRows:
    """Logit rows, then feature rows: all active features in index order when they fit the budget,
    otherwise the most influential unvisited ones first, re-ranked every ``update_interval`` batches."""
    from tqdm.auto import tqdm

    active, arch = computer.active, computer.arch
    k, n_pos, n_active = len(logit_vectors), computer.n_pos, len(active)
    budget = min(max_feature_nodes, n_active)
    device = logit_vectors.device
    rows = torch.zeros(k + budget, n_active + n_pos + k, dtype=torch.float32, device=device)
    row_nodes = torch.empty(k + budget, dtype=torch.long, device=device)
    row_nodes[:k] = n_active + n_pos + torch.arange(k, device=device)
    for lo in range(0, k, batch_size):
        hi = min(lo + batch_size, k)
        sites = torch.full((hi - lo,), arch.n_layers, dtype=torch.long)
        positions = torch.full((hi - lo,), n_pos - 1, dtype=torch.long)
        rows[lo:hi, :-k] = computer(sites, positions, logit_vectors[lo:hi])

    visited = torch.empty(budget, dtype=torch.long)
    seen = torch.zeros(n_active, dtype=torch.bool)
    done = 0
    bar = tqdm(total=budget, desc="feature rows", unit="feat", disable=not progress, leave=False)
    while done < budget:
        if budget == n_active:
            chosen = torch.arange(n_active)
        else:
            scores = partial_influences(rows[:k + done], row_nodes[:k + done], logit_probabilities)[:n_active].cpu()
            scores[seen] = float("-inf")
            order = torch.sort(scores, descending=True, stable=True).indices
            chosen = order[:min(update_interval * batch_size, budget - done)]
            # batches of nearby (layer, position) targets stop their backward early (fewer layers and positions)
            chosen = chosen[torch.sort(active.layers[chosen] * n_pos + active.positions[chosen], stable=True).indices]
        for lo in range(0, len(chosen), batch_size):
            batch = chosen[lo:lo + batch_size]
            vectors = encoder_rows(arch, active.layers[batch], active.features[batch], device)
            start = k + done
            rows[start:start + len(batch), :-k] = computer(active.layers[batch], active.positions[batch], vectors)
            row_nodes[start:start + len(batch)] = batch.to(device)
            visited[done:done + len(batch)] = batch
            seen[batch] = True
            done += len(batch)
            bar.update(len(batch))
    bar.close()
    return EdgeRows(rows, row_nodes, visited)
