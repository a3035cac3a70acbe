"""featurestore: every transcoder-adapter feature activation in a columnar store, queryable with SQL.

    import featurestore as fs
    store = fs.collect(model="path/or/repo", data="traces.jsonl", store="./store")   # or fs.open("./store")
    store.sql("select layer, count(*) from features group by layer").pl()
    store.feature(3, 17).top_examples(20)

``collect`` is imported on first use, so reading a store never imports torch.
"""
from __future__ import annotations

from .errors import UserError
from .ids import cantor, cantor_unpair
from .store import Store, open

__all__ = ["collect", "open", "Store", "UserError", "cantor", "cantor_unpair"]


def __getattr__(name: str):
    if name == "collect":
        from .collection import collect

        globals()["collect"] = collect
        return collect
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
