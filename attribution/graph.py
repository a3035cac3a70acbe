"""The attribution graph: a compact ``[selected features | tokens | logits]`` adjacency plus node tables.

circuit-tracer's own layout puts ``n_layers * n_pos`` error nodes between features and tokens; RelP has
no error nodes, and all-zero rows and columns change nothing in pruning, so the compact matrix is kept
and :meth:`Graph.to_circuit_tracer` pads it only for interoperability.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .engine import ActiveFeatures, EdgeRows


@dataclass
class Graph:
    prompt: str  # the decoded prompt, BOS text included
    input_tokens: torch.Tensor  # (P,) long
    token_strings: list[str]  # tokenizer.decode of each input token
    active_features: torch.Tensor  # (n_active, 3) long rows (layer, pos, feature): the candidate features (BOS ones left out)
    activation_values: torch.Tensor  # (n_active,) float32
    selected_features: torch.Tensor  # (n_sel,) ascending indices into active_features: the feature nodes
    adjacency: torch.Tensor  # (N, N) float32, N = n_sel + P + k; row = target, column = source
    logit_tokens: torch.Tensor  # (k,) long, most probable first (a forced file target comes last)
    logit_strings: list[str]
    logit_probabilities: torch.Tensor  # (k,) float32, not renormalised
    n_layers: int
    vocab_size: int
    injection: str
    bos_excluded: bool
    target_token: int | None = None  # the prompt file's target, always among the logits when given
    model_name: str = ""
    info: dict = field(default_factory=dict)  # timings and counts, for reports

    @property
    def n_pos(self) -> int:
        return int(self.input_tokens.numel())

    @property
    def n_selected(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def top_token(self) -> int:
        """The model's most probable next token."""
        return int(self.logit_tokens[0])

    @property
    def target_logit_index(self) -> int:
        """Index among the logits of the node the viewer marks as target: the file's target if given."""
        if self.target_token is None:
            return 0
        return int((self.logit_tokens == self.target_token).nonzero()[0, 0])

    def feature_nodes(self) -> torch.Tensor:
        """(n_sel, 3) rows (layer, pos, feature) of the feature nodes, in node order."""
        return self.active_features[self.selected_features]

    def nodes(self) -> list[dict]:
        """One dict per adjacency row/column, in order: kind, layer, pos, and feature or token id."""
        out = [{"kind": "feature", "layer": l, "pos": p, "feature": f} for l, p, f in self.feature_nodes().tolist()]
        out += [{"kind": "embedding", "pos": p, "token_id": t} for p, t in enumerate(self.input_tokens.tolist())]
        out += [{"kind": "logit", "pos": self.n_pos - 1, "token_id": t, "probability": float(q)}
                for t, q in zip(self.logit_tokens.tolist(), self.logit_probabilities)]
        return out

    def to_circuit_tracer(self, cfg):
        """A ``circuit_tracer.graph.Graph`` with the zero error block padded in (costs (n_layers*P)^2 memory)."""
        from circuit_tracer.attribution.targets import LogitTarget
        from circuit_tracer.graph import Graph as CircuitTracerGraph

        n_sel, n_pos, n_err = self.n_selected, self.n_pos, self.n_layers * self.n_pos
        size = n_sel + n_err + n_pos + self.n_logits
        keep = torch.cat([torch.arange(n_sel), torch.arange(n_sel + n_err, size)])
        padded = torch.zeros(size, size, dtype=torch.float32)
        padded[keep[:, None], keep[None, :]] = self.adjacency
        targets = [LogitTarget(text, int(token)) for text, token in zip(self.logit_strings, self.logit_tokens.tolist())]
        return CircuitTracerGraph(
            input_string=self.prompt,
            input_tokens=self.input_tokens,
            active_features=self.active_features,
            adjacency_matrix=padded,
            cfg=cfg,
            selected_features=self.selected_features,
            activation_values=self.activation_values,
            logit_targets=targets,
            logit_probabilities=self.logit_probabilities,
            vocab_size=self.vocab_size,
        )


def compact_adjacency(edges: EdgeRows, active: ActiveFeatures, n_pos: int, n_logits: int,
                      zero_bos_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected features ascending, the compact adjacency) from the rows computed in visit order."""
    n_active = len(active)
    order = torch.sort(edges.visited).indices
    selected = edges.visited[order]
    n_sel = len(selected)
    columns = torch.cat([
        selected.to(edges.rows.device),
        n_active + torch.arange(n_pos + n_logits, device=edges.rows.device),
    ])
    size = n_sel + n_pos + n_logits
    adjacency = torch.zeros(size, size, dtype=torch.float32)
    feature_rows = (n_logits + order).to(edges.rows.device)
    adjacency[:n_sel] = edges.rows[feature_rows[:, None], columns[None, :]].cpu()
    adjacency[n_sel + n_pos:] = edges.rows[:n_logits, columns].cpu()
    if zero_bos_token:
        adjacency[:, n_sel] = 0.0
    return selected, adjacency
