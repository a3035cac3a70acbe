"""What the exports write for readers: capped top lists, interval groups by activation range, honest counts,
metadata for the chosen layers only."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli.main import main
from exporters.feature_json import DocumentOptions, feature_document
from featurestore.views import RANDOM_ORDER_SQL


def _rows(store, layer, feature):
    """(seq_id, pos, act as float32) in the store-wide seeded order."""
    rows = store.sql(f"""SELECT seq_id, pos, act FROM activations WHERE source = 'transcoder' AND layer = {layer}
                         AND feature = {feature} ORDER BY {RANDOM_ORDER_SQL.format(seed=0)}""").fetchall()
    return [(s, p, np.float32(a)) for s, p, a in rows]


def _shown(example):
    return example["tokens_acts_list"][example["train_token_ind"]]


@pytest.mark.parametrize("n", [5, 40])
def test_default_document_caps_top_and_groups_by_activation_range(tiny, n):
    store = tiny["store"]
    ranked = store.sql("""SELECT layer, feature FROM features WHERE source = 'transcoder'
                          ORDER BY activation_count DESC, layer, feature""").fetchall()
    candidates = ranked[:6] + ranked[-6:]  # busy features, and sparse ones whose ranges leave gaps
    gaps = 0
    for layer, feature in candidates:
        document = feature_document(store, layer, feature, options=DocumentOptions(n_intervals=n))
        handle = store.feature(layer, feature)
        groups = document["examples_quantiles"]
        assert groups[0]["quantile_name"] == "Top activations"
        top = handle.top_examples(20)  # the API's default cap is the export's
        assert [(g["tokens"], g["train_token_ind"]) for g in groups[0]["examples"]] == \
            [(e.tokens, e.train_token_ind) for e in top]
        assert max(sum(e.seq_id == s for e in top) for s in {e.seq_id for e in top}) <= 2
        rows = _rows(store, layer, feature)
        peak = max(a for _, _, a in rows)
        edges = [np.float32(0)] + [peak * np.float32(k / n) for k in range(1, n)] + [peak]
        expected = []
        for bucket in range(n - 1, -1, -1):  # highest range first; empty ranges get no group
            inside = [(s, p, a) for s, p, a in rows if edges[bucket] < a <= edges[bucket + 1]
                      or (bucket == 0 and a <= edges[1])]
            if inside:
                name = f"Activation range {100 * bucket // n}-{100 * (bucket + 1) // n}% of max"
                expected.append((name, bucket, inside[:3]))
        interval_groups = groups[2:]
        assert [g["quantile_name"].split(" (")[0] for g in interval_groups] == [name for name, _, _ in expected]
        for group, (_, bucket, chosen) in zip(interval_groups, expected):
            assert [_shown(e) for e in group["examples"]] == pytest.approx([float(a) for _, _, a in chosen], rel=2e-5)
            low, high = (float(x) for x in group["quantile_name"].split("(")[1].rstrip(")").split(" to "))
            assert (low, high) == pytest.approx((float(edges[bucket]), float(edges[bucket + 1])), rel=1e-3, abs=1e-6)
        gaps += len(expected) < n
    assert gaps or n == 5  # with narrow ranges some are empty, and get no group


def test_count_intervals_and_no_cap_keep_the_original_reachable(tiny, tmp_path, capsys):
    store = tiny["store"]
    layer, feature = store.sql("""SELECT layer, feature FROM features ORDER BY activation_count DESC LIMIT 1""").fetchall()[0]
    original = feature_document(store, layer, feature, options=DocumentOptions(max_per_sequence=None, interval_kind="count"))
    names = [g["quantile_name"].split(" (")[0] for g in original["examples_quantiles"]]
    assert names == ["Top activations", "Random samples"] + [f"Interval {a}-{a + 20}%" for a in (80, 60, 40, 20, 0)]
    values = sorted((float(a) for _, _, a in _rows(store, layer, feature)), reverse=True)[:20]
    assert [_shown(e) for e in original["examples_quantiles"][0]["examples"]] == pytest.approx(values, rel=2e-5)
    out = tmp_path / "o"
    assert main(["export", "json", str(tiny["store_path"]), "--out", str(out), "--workers", "1", "--layers", str(layer),
                 "--max-per-sequence", "0", "--interval-kind", "count", "--no-metadata"]) == 0
    from featurestore.ids import cantor

    assert json.loads((out / "features" / f"{cantor(layer, feature)}.json").read_text()) == original


@pytest.fixture(scope="module")
def neuron_store(tiny, tmp_path_factory):
    import featurestore as fs

    return fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path_factory.mktemp("neurons") / "s", source="neuron",
                      neurons_per_layer=5, seed=2, layers=[0, 2], chunk_size=8, batch_tokens=512, progress=False,
                      max_samples=8)


def test_pack_message_counts_every_entry(neuron_store, tmp_path, capsys):
    live = neuron_store.sql("SELECT count(*) FROM features WHERE source = 'neuron'").fetchall()[0][0]
    for flag, dead in (("--dead-stub", f"{192 - live} dead as stub entries"), (None, f"{192 - live} dead (empty)")):
        args = ["export", "pack", str(neuron_store.path), "--out", str(tmp_path / str(flag)), "--source", "neuron",
                "--workers", "1"]
        assert main(args + ([flag] if flag else [])) == 0
        out = capsys.readouterr().out
        assert f"wrote 192 entries ({live} live, {dead}) in 3 layers of 64," in out, out


def test_json_export_of_chosen_layers_writes_their_metadata_only(neuron_store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", "json", str(neuron_store.path), "--out", str(out), "--source", "neuron", "--layers", "0",
                 "--workers", "1"]) == 0
    metadata = json.loads((out / "feature_metadata.json").read_text())
    live0 = neuron_store.sql("SELECT count(*) FROM features WHERE source = 'neuron' AND layer = 0").fetchall()[0][0]
    assert metadata["is_neuron_baseline"] is True and live0 > 0
    assert {row["layer"] for row in metadata["features"]} == {0} and len(metadata["features"]) == live0
    assert len(list((out / "features").iterdir())) == live0
    assert main(["export", "metadata", str(neuron_store.path), "--out", str(tmp_path / "m"), "--source", "neuron",
                 "--layers", "2"]) == 0
    assert {row["layer"] for row in json.loads((tmp_path / "m" / "feature_metadata.json").read_text())["features"]} == {2}
