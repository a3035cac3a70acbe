"""RelP attribution graphs for models with transcoder adapters.

``attribute(model, tokenizer, prompt) -> Graph`` computes the graph; ``attribution.prune.prune`` prunes
its compact adjacency; ``exporters.graph_json.write`` writes it for the circuit-tracer viewer.
"""
from .api import attribute
from .graph import Graph
from .prune import PruneResult, prune

__all__ = ["attribute", "Graph", "prune", "PruneResult"]
