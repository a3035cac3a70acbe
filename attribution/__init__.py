"""RelP attribution graphs for models with transcoder adapters.

``attribute(model, tokenizer, prompt) -> Graph`` computes the graph; ``attribution.prune.prune`` prunes
its compact adjacency; ``exporters.graph_json.write`` writes it for the circuit-tracer viewer.

The names are imported on first use, so `featurestore attribute` can skip finished prompts without importing torch.
"""
from __future__ import annotations

import importlib
import sys
import types

__all__ = ["attribute", "Graph", "prune", "PruneResult"]
_HOMES = {"attribute": ".api", "Graph": ".graph", "prune": ".prune", "PruneResult": ".prune"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attribution' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``attribution.prune`` the function (as when it was imported eagerly) once the submodule of the same
    name is loaded: the import system would otherwise bind the submodule there."""

    def __setattr__(self, name, value):
        if name == "prune" and isinstance(value, types.ModuleType):
            value = value.prune
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
