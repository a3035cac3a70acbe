"""Everything that turns the store into files other tools read.

    from exporters import export_json, export_metadata, export_pack, pack_json_dir, read_feature, verify, upload

Imported lazily so that worker processes and ``featurestore export verify`` load only what they use.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "DocumentOptions": "feature_json", "feature_document": "feature_json", "iter_documents": "feature_json",
    "export_json": "feature_json", "export_pack": "feature_json",
    "export_metadata": "metadata", "feature_metadata": "metadata",
    "write_pack": "pack", "pack_json_dir": "pack", "read_feature": "pack", "PackReader": "pack",
    "verify": "integrity", "upload": "hub_upload", "plan_upload": "hub_upload",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
