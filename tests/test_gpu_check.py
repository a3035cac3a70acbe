"""benchmarks/gpu_check.py in its CPU mode: the same code as the GPU run, at a tiny shape, so it cannot rot."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_measures_every_section(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    report = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    shape = report["shape"]
    assert set(report["collection"]) == {f"l0={l0}" for l0 in gpu_check.L0_TARGETS}
    for l0 in gpu_check.L0_TARGETS:
        run = report["collection"][f"l0={l0}"]
        # the calibration hits its target on the calibration tokens, and the whole data lands near it
        assert all(abs(x - l0) / l0 < 0.05 for x in run["calibrated_l0"])
        assert 0.5 * l0 < run["activations_per_token_per_layer"] < 2 * l0
        # every token collected, every committed activation counted once in the per-feature statistics
        assert run["tokens"] == report["data_tokens"]
        assert run["activations"] == run["activations_in_feature_stats"] > 0
        assert run["activations_per_s"] == pytest.approx(run["activations"] / run["seconds"])
        assert run["ratio"] == pytest.approx(run["seconds"] / run["bare_forward_seconds"])
        assert 0 <= run["transfer_share"] < 1 and 0 <= run["writer_wait_share"] < 1
        assert run["peak_memory_gb"] > 0
    # L0 10 stores about 7x the rows of L0 1.4
    assert report["collection"]["l0=10.0"]["activations"] > 4 * report["collection"]["l0=1.4"]["activations"]

    neurons = report["neurons"]
    assert neurons["neurons_per_layer"] == min(gpu_check.NEURONS_PER_LAYER, shape["d_mlp"])
    assert neurons["tokens"] == report["data_tokens"] and neurons["activations"] > 0

    assert [a["prompt_tokens"] for a in report["attribution"]] == shape["attribution_lengths"]
    assert all(a["active_features"] > 0 and a["seconds"] > 0 for a in report["attribution"])

    precision = report["precision"]
    assert precision["rows"] == shape["precision_rows"] and precision["in_both"] > 0
    assert 0 <= precision["differ"] <= precision["in_both"]
    # bf16 moves values by a fraction of a percent of the largest activation, not by orders of magnitude
    assert 0 < precision["max_abs_difference"] < 0.1 * precision["largest_activation"]
    assert "l0=10.0" in gpu_check.format_table(report)
