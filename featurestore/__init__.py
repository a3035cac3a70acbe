"""featurestore: every transcoder-adapter feature activation in a columnar store, queryable with SQL.

    import featurestore as fs
    store = fs.collect(model="path/or/repo", data="traces.jsonl", store="./store")   # or fs.open("./store")
    store.sql("select layer, count(*) from features group by layer").pl()
    store.feature(3, 17).top_examples(20)
"""
from .collect import collect
from .errors import UserError
from .ids import cantor, cantor_unpair
from .store import Store, open

__all__ = ["collect", "open", "Store", "UserError", "cantor", "cantor_unpair"]
