"""feature_metadata.json against brute-force counts from dense activations, regions recomputed per token."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from brute_force import dense_run
from exporters.metadata import export_metadata, feature_metadata
from featurestore.ids import cantor
from featurestore.regions import MarkerIds, assign_regions, find_markers
from featurestore.schema import REGIONS

ROW_KEYS = ["layer", "feature", "cantor_id", "activation_count", "activation_freq", "domain_density", "domain_fraction",
            "region_density", "region_fraction", "thinking_position_density", "thinking_position_fraction"]


@pytest.fixture(scope="module")
def brute(tiny):
    dense = dense_run(tiny["model"], tiny["data"])
    markers = MarkerIds.from_tokenizer(tiny["tokenizer"])
    per_token = {}
    for seq, (ids, _) in dense.items():
        region, thinking = assign_regions(len(ids), find_markers(np.asarray(ids), markers))
        bins = np.where(np.isnan(thinking), -1, np.minimum(9, np.floor(np.nan_to_num(thinking) * 10))).astype(int)
        per_token[seq] = ([REGIONS[r] for r in region], bins, tiny["rows"][seq]["domain"])
    return dense, per_token


def test_metadata_equals_brute_force(tiny, brute, tmp_path):
    dense, per_token = brute
    path = export_metadata(tiny["store"], tmp_path)
    document = json.loads(path.read_text())
    assert list(document) == ["total_tokens", "tokens_per_domain", "tokens_per_region", "tokens_per_thinking_bin", "features"]
    total = sum(len(ids) for ids, _ in dense.values())
    domains, regions, bins = Counter(), Counter(), Counter()
    for seq, (region, thinking, domain) in per_token.items():
        domains[domain] += len(region)
        regions.update(region)
        bins.update(b for b in thinking.tolist() if b >= 0)
    assert document["total_tokens"] == total
    assert document["tokens_per_domain"] == dict(sorted(domains.items()))
    assert document["tokens_per_region"] == {r: regions[r] for r in REGIONS if regions[r]}
    assert document["tokens_per_thinking_bin"] == [bins[b] for b in range(10)]
    rows = {(r["layer"], r["feature"]): r for r in document["features"]}
    assert [(r["layer"], r["feature"]) for r in document["features"]] == sorted(rows)
    live = 0
    for layer in range(3):
        for feature in range(48):
            by_domain, by_region, by_bin, count = Counter(), Counter(), Counter(), 0
            for seq, (ids, acts) in dense.items():
                region, thinking, domain = per_token[seq]
                for pos in np.flatnonzero(acts[layer][:, feature]).tolist():
                    count += 1
                    by_domain[domain] += 1
                    by_region[region[pos]] += 1
                    if thinking[pos] >= 0:
                        by_bin[thinking[pos]] += 1
            if count == 0:
                assert (layer, feature) not in rows
                continue
            live += 1
            row = rows[(layer, feature)]
            assert list(row) == ROW_KEYS
            assert row["cantor_id"] == cantor(layer, feature) and row["activation_count"] == count
            assert row["activation_freq"] == pytest.approx(count / total, rel=1e-12)
            assert row["domain_density"] == pytest.approx({d: n / domains[d] for d, n in by_domain.items()})
            assert row["domain_fraction"] == pytest.approx({d: n / count for d, n in by_domain.items()})
            assert row["region_density"] == pytest.approx({r: n / regions[r] for r, n in by_region.items()})
            assert row["region_fraction"] == pytest.approx({r: n / count for r, n in by_region.items()})
            thinking_total = sum(by_bin.values())
            assert row["thinking_position_density"] == pytest.approx([by_bin[b] / bins[b] if bins[b] else 0 for b in range(10)])
            assert row["thinking_position_fraction"] == pytest.approx(
                [by_bin[b] / thinking_total if thinking_total else 0 for b in range(10)])
    assert live == len(rows)


def test_neuron_baseline_marks_and_partial_coverage(tiny, tmp_path):
    """Neuron activations collected for only the first 2 chunks of a store whose tokens cover all 5."""
    import shutil

    import featurestore as fs

    shutil.copytree(tiny["store_path"], tmp_path / "s")
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "s", source="neuron", neurons_per_layer=6, seed=1,
                       chunk_size=8, batch_tokens=512, progress=False, stop_after_chunks=2)
    document = feature_metadata(store, source="neuron")
    assert document["is_neuron_baseline"] is True and document["features"]
    assert all(row["is_neuron"] is True for row in document["features"])
    neurons = store.manifest["sources"]["neuron"]["neurons"]
    assert {(r["layer"], r["feature"]) for r in document["features"]} <= {(int(l), n) for l, ns in neurons.items() for n in ns}
    covered = store.sql("SELECT sum(n_tokens) FROM sequences WHERE seq_id < 16").fetchall()[0][0]
    assert document["total_tokens"] == covered < store.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
    assert sum(document["tokens_per_domain"].values()) == sum(document["tokens_per_region"].values()) == covered
    row = document["features"][0]
    assert row["activation_freq"] == row["activation_count"] / covered
    assert store.feature(row["layer"], row["feature"], source="neuron").to_json()["is_neuron"] is True
    assert "is_neuron_baseline" not in feature_metadata(store)  # the transcoder rows of the same store
