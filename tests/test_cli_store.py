"""The store commands as users run them: one-line errors on bad input, nothing lost, formats of `sql`."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from cli.main import main
from conftest import write_jsonl


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _store_files(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def store_copy(tiny, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny["store_path"], dst)
    return dst


def test_bad_inputs_give_one_line_errors_and_keep_the_store(tiny, tmp_path, capsys, store_copy):
    before = _store_files(store_copy)
    model, data = tiny["model"], tiny["data"]

    code, _, err = run(capsys, "collect", "--model", tmp_path / "nope", "--data", data, "--store", store_copy)
    assert_one_line_error(code, err, "does not exist")

    no_adapter = tmp_path / "no_adapter"
    shutil.copytree(model, no_adapter)
    cfg = json.loads((no_adapter / "config.json").read_text())
    cfg.pop("transcoder_n_features")
    (no_adapter / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "collect", "--model", no_adapter, "--data", data, "--store", store_copy)
    assert_one_line_error(code, err, "no transcoder adapter")

    missing = tmp_path / "missing"
    shutil.copytree(model, missing)
    weights = load_file(missing / "model.safetensors")
    del weights["model.layers.1.mlp.transcoder_enc.bias"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "collect", "--model", missing, "--data", data, "--store", store_copy)
    assert_one_line_error(code, err, "model.layers.1.mlp.transcoder_enc.bias missing")

    shaped = tmp_path / "shaped"
    shutil.copytree(model, shaped)
    weights = load_file(shaped / "model.safetensors")
    weights["model.layers.0.mlp.transcoder_dec.weight"] = weights["model.layers.0.mlp.transcoder_dec.weight"][:, :10].contiguous()
    save_file(weights, shaped / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "collect", "--model", shaped, "--data", data, "--store", store_copy)
    assert_one_line_error(code, err, "transcoder_dec.weight has shape")

    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = lines[4][:-5]
    bad.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "collect", "--model", model, "--data", bad, "--store", store_copy)
    assert_one_line_error(code, err, "line 5", "malformed JSON")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "collect", "--model", model, "--data", empty, "--store", store_copy)
    assert_one_line_error(code, err, "empty")

    other_data = write_jsonl(tmp_path / "other.jsonl", tiny["rows"][:5])
    code, _, err = run(capsys, "collect", "--model", model, "--data", other_data, "--store", store_copy)
    assert_one_line_error(code, err, "different contents")

    assert _store_files(store_copy) == before


def test_collect_cli_resumes_to_the_same_store(tiny, tmp_path, capsys):
    args = ["collect", "--model", tiny["model"], "--data", tiny["data"], "--store", tmp_path / "s", "--chunk-size", "8",
            "--batch-tokens", "512", "--layers", "0-1"]
    code, out, _ = run(capsys, *args, "--max-samples", "100")
    assert code == 0 and "40 sequences" in out
    code, out, err = run(capsys, *args, "--max-samples", "100")
    assert code == 0 and "nothing to do" in err
    code, out, _ = run(capsys, "sql", tmp_path / "s", "select distinct layer from activations order by 1", "--format", "json")
    assert code == 0 and json.loads(out) == [{"layer": 0}, {"layer": 1}]


def test_sql_formats_and_info(tiny, tmp_path, capsys):
    store = tiny["store_path"]
    query = "select layer, count(*) as n from activations group by layer order by layer"
    expected = tiny["store"].sql(query).fetchall()
    code, out, _ = run(capsys, "sql", store, query, "--format", "csv")
    assert code == 0 and out.splitlines() == ["layer,n"] + [f"{a},{b}" for a, b in expected]
    code, out, _ = run(capsys, "sql", store, query)
    assert code == 0 and str(expected[0][1]) in out
    target = tmp_path / "out.parquet"
    code, _, _ = run(capsys, "sql", store, query, "--format", "parquet", "--output", target)
    import pyarrow.parquet as pq

    assert code == 0 and pq.read_table(target).to_pylist() == [{"layer": a, "n": b} for a, b in expected]
    code, _, err = run(capsys, "sql", store, "select * from no_such_view")
    assert_one_line_error(code, err, "SQL error")
    code, _, err = run(capsys, "sql", tmp_path, "select 1")
    assert_one_line_error(code, err, "not a feature store")
    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "layers=3 features=48" in out and "transcoder" in out
    code, out, _ = run(capsys, "info", store, "--json")
    assert json.loads(out)["sources"]["transcoder"]["activations"] == sum(n for _, n in expected)
