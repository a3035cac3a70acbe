"""Compaction changes no query result, survives SIGKILL at any point (a rerun finishes it), and keeps chunks
committed after it readable until the next one."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import featurestore as fs
from cli.main import main
from featurestore import compaction
from featurestore.checks import check_store

VIEWS = [("activations", "SELECT * FROM activations ORDER BY source, layer, feature, seq_id, pos"),
         ("feature_stats", """SELECT source, layer, feature, sum(n_active), sum(sum_act), max(max_act) FROM feature_stats
                              GROUP BY ALL ORDER BY ALL"""),
         ("features", "SELECT * FROM features ORDER BY source, layer, feature"),
         ("tokens", "SELECT * FROM tokens ORDER BY seq_id, pos"), ("sequences", "SELECT * FROM sequences ORDER BY seq_id"),
         ("logit_lens", "SELECT * FROM logit_lens ORDER BY source, layer, feature, side, rank"),
         ("vocab", "SELECT * FROM vocab ORDER BY token_id"), ("source_tokens", "SELECT * FROM source_tokens ORDER BY ALL"),
         ("top", "SELECT layer, feature, seq_id, pos, act FROM activations WHERE feature = 7 ORDER BY act DESC, seq_id, pos LIMIT 20")]


def snapshot(path) -> dict:
    store = fs.open(path)
    return {name: store.sql(query).fetchall() for name, query in VIEWS}


def activation_files(path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in (path / "activations").rglob("*") if p.is_file())


def token_files(path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in (path / "tokens").glob("*") if p.is_file())


@pytest.fixture(scope="module")
def chunked(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("chunked") / "store"
    fs.collect(str(tiny["model"]), str(tiny["data"]), path, chunk_size=8, batch_tokens=512, progress=False, compact=False)
    return path


@pytest.fixture(scope="module")
def reference(chunked):
    return snapshot(chunked)


def test_compaction_changes_no_view_and_sorts_by_feature_ranges(chunked, reference, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    shutil.copytree(chunked, store)
    monkeypatch.setattr(compaction, "GROUP_ROWS", 4000)  # many feature ranges in a tiny layer
    assert main(["compact", str(store)]) == 0
    assert "compacted 3 layers" in capsys.readouterr().out
    assert snapshot(store) == reference
    assert check_store(store, progress=False) == []
    for layer in range(3):
        files = [f for f in activation_files(store) if f"/layer={layer}/" in f]
        assert files == [f"activations/source=transcoder/layer={layer}/compact-g0001-000.parquet"]
        meta = pq.ParquetFile(store / files[0]).metadata
        ranges = [(meta.row_group(i).column(0).statistics.min, meta.row_group(i).column(0).statistics.max)
                  for i in range(meta.num_row_groups)]
        assert meta.num_row_groups > 3
        for (a_lo, a_hi), (b_lo, b_hi) in zip(ranges, ranges[1:]):  # groups hold whole features, or one big one
            assert a_hi < b_lo or a_lo == a_hi == b_lo == b_hi
        table = pq.read_table(store / files[0])
        keys = list(zip(*(table.column(c).to_pylist() for c in ("feature", "seq_id", "pos"))))
        assert keys == sorted(keys)
    stats = fs.open(store).sql("SELECT count(*), count(DISTINCT (layer, feature)) FROM feature_stats").fetchall()
    assert stats[0][0] == stats[0][1]  # one row per feature
    assert len(token_files(chunked)) > 1 and token_files(store) == ["tokens/compact-g0001-000.parquet"]
    tokens = pq.ParquetFile(store / "tokens/compact-g0001-000.parquet")
    keys = list(zip(*(tokens.read().column(c).to_pylist() for c in ("seq_id", "pos"))))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # one sorted run, nothing twice
    manifest = fs.open(store).manifest_obj
    assert all(manifest.has_tokens(record["chunk"]) for record in manifest.chunks)
    assert main(["compact", str(store)]) == 0  # nothing left to do: no change
    assert "compacted 0 layers" in capsys.readouterr().out


KILL_POINTS = {
    # after the first compacted group of layer 1 was written (layer 0 already committed)
    "mid-layer": "orig = C.Output.write\n"
                 "n = [0]\n"
                 "def write(self, group):\n"
                 "    orig(self, group)\n"
                 "    if '/layer=1/' in self.stem:\n"
                 "        kill()\n"
                 "C.Output.write = write\n",
    # a layer's manifest rewrite done, its old chunk files not yet deleted
    "after-commit": "orig = C._commit\n"
                    "def commit(*args):\n"
                    "    orig(*args)\n"
                    "    kill()\n"
                    "C._commit = commit\n",
    # the tokens file half written (every layer committed)
    "mid-tokens": "orig = C.Output.write\n"
                  "def write(self, group):\n"
                  "    orig(self, group)\n"
                  "    if self.stem.startswith('tokens/'):\n"
                  "        kill()\n"
                  "C.Output.write = write\n",
    # the tokens' manifest rewrite done, the chunks' tokens files not yet deleted
    "after-tokens-commit": "import featurestore.checks as K\n"
                           "orig = K.remember\n"
                           "def remember(manifest, rels):\n"
                           "    orig(manifest, rels)\n"
                           "    if any(rel.startswith('tokens/') for rel in rels):\n"
                           "        kill()\n"
                           "K.remember = remember\n",
    # the manifest's temporary written, not yet renamed over the manifest
    "mid-manifest-write": "import os\n"
                          "orig = os.replace\n"
                          "def replace(src, dst):\n"
                          "    if str(dst).endswith('featurestore.json'):\n"
                          "        kill()\n"
                          "    orig(src, dst)\n"
                          "os.replace = replace\n",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_mid_compaction_then_rerun(chunked, reference, tmp_path, point):
    store = tmp_path / "store"
    shutil.copytree(chunked, store)
    script = ("import os, signal\nimport featurestore.compaction as C\n"
              "def kill():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              "C.GROUP_ROWS = 4000\n" + KILL_POINTS[point] + f"C.compact({str(store)!r}, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(store) == reference  # old or new files in force, never a mix
    compaction.compact(store, progress=False)
    assert snapshot(store) == reference
    assert check_store(store, progress=False) == []  # leftovers of the killed run are gone
    assert all("/compact-g" in f for f in activation_files(store))
    assert token_files(store) == ["tokens/compact-g0001-000.parquet"]


def test_chunks_committed_after_compaction_stay_readable(tiny, reference, tmp_path):
    store = tmp_path / "store"
    args = dict(chunk_size=8, batch_tokens=512, progress=False)
    fs.collect(str(tiny["model"]), str(tiny["data"]), store, stop_after_chunks=2, **args)
    compaction.compact(store, progress=False)
    fs.collect(str(tiny["model"]), str(tiny["data"]), store, compact=False, **args)
    files = activation_files(store)
    assert any("/compact-g0001-" in f for f in files) and any("/chunk-" in f for f in files)
    assert snapshot(store) == reference
    compaction.compact(store, progress=False)
    assert snapshot(store) == reference
    assert all("/compact-g0002-" in f for f in activation_files(store))
    assert token_files(store) == ["tokens/compact-g0002-000.parquet"]
    assert check_store(store, progress=False) == []


def test_completed_collection_compacts(tiny, reference):
    store = tiny["store_path"]
    assert all("/compact-g0001-" in f for f in activation_files(store))
    assert snapshot(store) == reference


def test_feature_ranges_cover_every_feature_id_even_unplanned_ones():
    counts = np.zeros(50, np.int64)
    counts[[3, 4, 10, 40]] = [5, 5, 7, 1]
    ranges = compaction.feature_ranges(counts, group_rows=7)
    assert ranges == [(0, 4), (4, 10), (10, 40), (40, compaction.MAX_FEATURE)]  # contiguous: a row of feature 7 or 60 falls in one
    assert compaction.feature_ranges(np.zeros(0, np.int64), 10) == [(0, compaction.MAX_FEATURE)]


def test_export_of_an_uncompacted_layer_says_compaction_would_help(chunked, tmp_path, monkeypatch, capsys):
    from exporters import feature_json

    store = tmp_path / "store"
    shutil.copytree(chunked, store)
    monkeypatch.setattr(feature_json, "UNCOMPACTED_NOTE_FILES", 1)  # the tiny store has a few chunks per layer
    assert main(["export", "json", str(store), "--out", str(tmp_path / "a"), "--layers", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 layer(s)" in err and f"featurestore compact {store}" in err
    assert main(["compact", str(store)]) == 0
    capsys.readouterr()
    assert main(["export", "json", str(store), "--out", str(tmp_path / "b"), "--layers", "1"]) == 0
    assert "not compacted" not in capsys.readouterr().err
    first, second = (sorted((p.name, p.read_bytes()) for p in (tmp_path / d / "features").iterdir()) for d in "ab")
    assert first == second  # and compaction changed no document


def test_window_lookups_read_only_the_files_of_their_sequences(chunked, tmp_path):
    from exporters.token_index import TokenIndex
    from featurestore.views import token_files

    store = tmp_path / "store"
    shutil.copytree(chunked, store)
    handle = fs.open(store)
    records = sorted(handle.manifest["chunks"], key=lambda c: c["chunk"])
    first = records[1]["rows"][0]
    assert token_files(handle.manifest_obj, [first]) == records[1]["files"]["tokens"]
    whole = TokenIndex.load(handle)
    one = TokenIndex.load(handle, np.array([first]))
    length = int(whole.seq_len[first])
    assert one.seq_len[first] == length and length > 0
    assert (one.token_ids[one.seq_start[first]:][:length] == whole.token_ids[whole.seq_start[first]:][:length]).all()
    compaction.compact(store, progress=False)
    handle = fs.open(store)
    assert token_files(handle.manifest_obj, [first]) == ["tokens/compact-g0001-000.parquet"]
    assert token_files(handle.manifest_obj, [10 ** 9]) == []
    again = TokenIndex.load(handle, np.array([first]))
    assert (again.token_ids[again.seq_start[first]:][:length] == one.token_ids[one.seq_start[first]:][:length]).all()


def test_a_second_source_after_tokens_compaction_writes_no_tokens_again(tiny, tmp_path):
    store = tmp_path / "store"
    args = dict(chunk_size=8, batch_tokens=512, progress=False)
    fs.collect(str(tiny["model"]), str(tiny["data"]), store, **args)  # compacts, tokens included
    before = fs.open(store).sql("SELECT count(*), count(DISTINCT (seq_id, pos)) FROM tokens").fetchall()[0]
    assert token_files(store) == ["tokens/compact-g0001-000.parquet"] and before[0] == before[1]
    fs.collect(str(tiny["model"]), str(tiny["data"]), store, source="neuron", neurons_per_layer=4, compact=False, **args)
    assert token_files(store) == ["tokens/compact-g0001-000.parquet"]
    assert fs.open(store).sql("SELECT count(*), count(DISTINCT (seq_id, pos)) FROM tokens").fetchall()[0] == before
