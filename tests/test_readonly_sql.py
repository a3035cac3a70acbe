"""Read-only SQL: every attack on `Store.sql()` / `featurestore sql` is refused with a one-line error, and the
store's files (and the places the attacks aim at) are byte-for-byte unchanged afterwards."""
from __future__ import annotations

import hashlib
import shutil

import duckdb
import pytest

import featurestore as fs
from cli.main import main
from featurestore.errors import UserError


def snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(tiny, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny["store_path"], store)
    return store


def attacks(store, elsewhere) -> list[str]:
    chunk = next(p for p in sorted(store.rglob("*.parquet")) if "activations" in str(p))
    return [
        f"COPY (SELECT 'x') TO '{store / 'featurestore.json'}' (FORMAT csv)",
        f"COPY (SELECT * FROM activations LIMIT 1) TO '{chunk}' (FORMAT parquet)",
        f"COPY (SELECT 1 AS a) TO '{elsewhere / 'out.csv'}'",
        f"EXPORT DATABASE '{elsewhere / 'export'}'",
        f"ATTACH '{elsewhere / 'other.duckdb'}' AS other",
        f"ATTACH '{store / 'new.duckdb'}'",
        "CREATE TABLE t AS SELECT 1 AS a",
        "CREATE OR REPLACE VIEW activations AS SELECT 1 AS a",
        "CREATE MACRO twice(x) AS 2 * x",
        "CREATE PERSISTENT SECRET leak (TYPE s3, KEY_ID 'k', SECRET 's')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET autoload_known_extensions = true",
        "SET autoinstall_known_extensions = true",
        "RESET lock_configuration",
        "SET lock_configuration = false",
        "PRAGMA enable_profiling",
        f"SET profiling_output = '{elsewhere / 'profile.json'}'",
        "SELECT 1; CREATE TABLE t2 (a INTEGER)",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{elsewhere / 'explained.csv'}'",
        "PREPARE p AS SELECT 1",
        "DELETE FROM activations",
        "CHECKPOINT",
    ]


def test_every_attack_is_refused_and_nothing_changes(copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = snapshot(copy)
    store = fs.open(copy)
    count = store.sql("SELECT count(*) FROM activations").fetchall()[0][0]
    for attack in attacks(copy, elsewhere):
        with pytest.raises(UserError, match="read-only") as info:
            store.sql(attack)
        assert "\n" not in str(info.value)
    assert store.sql("SELECT count(*) FROM activations").fetchall()[0][0] == count  # no view was shadowed
    assert snapshot(copy) == before
    assert list(elsewhere.iterdir()) == []


def test_configuration_is_locked_and_nothing_is_autoloaded(copy):
    store = fs.open(copy)
    assert store.sql("SELECT current_setting('autoload_known_extensions')").fetchall() == [(False,)]
    with pytest.raises(UserError, match="httpfs"):  # no network: the extension that would fetch it is not loaded
        store.sql("SELECT * FROM read_parquet('https://127.0.0.1:9/x.parquet')")
    with pytest.raises(duckdb.Error, match="locked"):  # the second layer, behind the statement check
        store._reader.execute("SET autoinstall_known_extensions = true")
    store.refresh()  # re-registering the views works on the locked connection
    assert store.sql("SELECT count(*) > 0 FROM activations").fetchall() == [(True,)]


def test_reads_still_work(copy, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("feature,label\n1,one\n2,two\n")
    store = fs.open(copy)
    before = snapshot(copy)
    rows = store.sql(f"SELECT o.label, count(*) FROM activations a JOIN read_csv('{other}') o USING (feature) "
                     "WHERE a.layer = 0 GROUP BY o.label ORDER BY o.label").fetchall()
    expected = store.con.execute("SELECT feature, count(*) FROM activations WHERE layer = 0 AND feature IN (1, 2) "
                                 "GROUP BY feature ORDER BY feature").fetchall()
    assert [r[1] for r in rows] == [r[1] for r in expected]
    assert [r[0] for r in store.sql("DESCRIBE activations").fetchall()][:3] == ["source", "layer", "feature"]
    assert store.sql("FROM features SELECT count(*) WHERE layer = ?", params=[0]).fetchall()[0][0] > 0
    assert store.sql("WITH f AS (SELECT 1 AS a) SELECT a FROM f").fetchall() == [(1,)]
    assert snapshot(copy) == before


def test_cli_refuses_with_one_line_and_output_still_writes(copy, tmp_path, capsys):
    before = snapshot(copy)
    assert main(["sql", str(copy), f"COPY (SELECT 'x') TO '{copy / 'featurestore.json'}'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: COPY statements are refused") and err.count("\n") == 1
    out = tmp_path / "features.parquet"
    assert main(["sql", str(copy), "SELECT layer, count(*) AS n FROM features GROUP BY layer ORDER BY layer",
                 "--format", "parquet", "--output", str(out)]) == 0
    assert [r[0] for r in duckdb.sql(f"SELECT layer FROM '{out}'").fetchall()] == [0, 1, 2]
    assert snapshot(copy) == before


def test_csv_writes_nested_values_as_json(copy, capsys):
    query = ("SELECT list(seq_id ORDER BY seq_id) AS ids, {'a': 1, 'b': [1.5]} AS s, 'x,\"y' AS t "
             "FROM sequences WHERE seq_id < 3")
    assert main(["sql", str(copy), query, "--format", "csv"]) == 0
    assert capsys.readouterr().out == 'ids,s,t\n"[0,1,2]","{""a"":1,""b"":[1.5]}","x,""y"\n'


def test_explain_of_a_select_runs(copy):
    plan = fs.open(copy).sql("EXPLAIN SELECT count(*) FROM tokens").fetchall()
    assert plan and "physical_plan" in str(plan[0][0])
