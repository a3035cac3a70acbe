"""Hub ids and hf:// data resolve through the Hugging Face cache, so they work offline once cached."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _fake_cache(cache, kind: str, repo: str, files: dict) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"{kind}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / rel)


def test_repo_id_and_hf_data_from_cache_offline(tiny, tmp_path):
    cache = tmp_path / "hub"
    _fake_cache(cache, "model", "someone/tiny-adapter", {p.name: p for p in tiny["model"].iterdir() if p.is_file()})
    _fake_cache(cache, "dataset", "someone/traces", {"data/val.jsonl": tiny["data"]})
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "cli.main", "collect", "--model", "someone/tiny-adapter",
                          "--data", "hf://someone/traces/data/val.jsonl", "--store", str(store), "--max-samples", "5"],
                         env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert "5 sequences" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "cli.main", "collect", "--model", "someone/absent",
                              "--data", str(tiny["data"]), "--store", str(tmp_path / "s2")],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: could not fetch model 'someone/absent'")
