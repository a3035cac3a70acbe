"""`info` shows judge runs and stored graphs; `attribute` skips finished prompts before importing torch or loading
the model, and says what it is doing first."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import featurestore as fs
from cli.main import main
from featurestore.interp import EvidenceSettings, JudgeSettings, classify
from openai_stub import OpenAIStub

REPO = Path(__file__).resolve().parents[1]
BOS = "<｜begin▁of▁sentence｜>"
PROMPTS = {"a.txt": f"{BOS}<｜User｜>compute the sum of two numbers<｜Assistant｜><think>\nwait the answer is",
           "b.txt": f"{BOS}<｜User｜>check the energy<｜Assistant｜><think>\nso the force is"}


@pytest.fixture(scope="module")
def attributed(tiny, tmp_path_factory):
    """A copy of the tiny store with two graphs attributed into it, and the graph folder."""
    root = tmp_path_factory.mktemp("attributed")
    store = root / "store"
    shutil.copytree(tiny["store_path"], store)
    prompts = root / "prompts"
    prompts.mkdir()
    for name, text in PROMPTS.items():
        (prompts / name).write_text(text, encoding="utf-8")
    out = root / "graphs"
    code = main(["attribute", "--checkpoint", str(tiny["model"]), "--prompts", str(prompts), "--out", str(out),
                 "--run-name", "run", "--batch-size", "8", "--max-feature-nodes", "40", "--device", "cpu",
                 "--store", str(store)])
    assert code == 0
    return {"store": store, "prompts": prompts, "out": out}


def test_info_lists_judge_runs_and_graphs(attributed, capsys):
    store = fs.open(attributed["store"])
    capsys.readouterr()
    assert main(["info", str(attributed["store"])]) == 0
    out = capsys.readouterr().out
    assert "graphs     2 stored: run__a, run__b (see the graphs, graph_nodes views)" in out
    assert "judge run" not in out
    evidence = EvidenceSettings(before=6, after=3, n_top=6, n_lower=3, n_test_top=4, n_test_lower=4, top_pool=20)
    with OpenAIStub() as stub:
        judge = JudgeSettings(model="judge-model", base_url=stub.base_url, concurrency=2, timeout_s=10.0)
        for _ in range(2):  # the second invocation resumes the same run
            result = classify(store, judge, n_per_layer=1, evidence=evidence, progress=False, api_key="k")
    info = fs.open(attributed["store"]).info()
    assert [(r["run_id"], r["kind"], r["judge_model"]) for r in info["interp_runs"]] == \
        [(result.run_id, "classify", "judge-model")]
    assert info["interp_runs"][0]["invocations"] == 2 and info["interp_runs"][0]["features"] == {"ok": 3}
    assert [g["slug"] for g in info["graphs"]["graphs"]] == ["run__a", "run__b"]
    assert all(g["nodes"] > 0 for g in info["graphs"]["graphs"])
    assert main(["info", str(attributed["store"])]) == 0
    out = capsys.readouterr().out
    assert f"judge run  {result.run_id} (classify, judge-model) started " in out and "2 invocations: 3 ok" in out


def test_graph_nodes_readme_example_counts_features_only(attributed):
    store = fs.open(attributed["store"])
    rows = store.sql("select layer, feature, count(distinct slug) as graphs from graph_nodes "
                     "where kind = 'feature' group by all order by graphs desc, layer, feature").fetchall()
    assert rows and all(layer is not None and feature is not None for layer, feature, _ in rows)
    assert rows[0][2] == max(n for _, _, n in rows) <= 2


def test_attribute_with_every_graph_present_skips_before_loading(attributed, tmp_path):
    """A missing checkpoint proves the model is never loaded; a fresh interpreter proves torch is never imported."""
    script = ("import sys\nfrom cli.main import main\n"
              f"code = main(['attribute', '--checkpoint', {str(tmp_path / 'no-such-model')!r}, '--prompts', "
              f"{str(attributed['prompts'])!r}, '--out', {str(attributed['out'])!r}, '--run-name', 'run'])\n"
              "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"2 prompt files: 2 already in {attributed['out']}, 0 to attribute"
    assert "0 written, 2 skipped, 0 failed" in result.stdout
    assert "torch imported: False" in result.stdout


def test_attribute_says_what_it_loads_before_loading(attributed, tiny, tmp_path, capsys):
    (attributed["prompts"] / "c.txt").write_text(PROMPTS["a.txt"].replace("sum", "loop"), encoding="utf-8")
    try:
        code = main(["attribute", "--checkpoint", str(tmp_path / "no-such-model"), "--prompts", str(attributed["prompts"]),
                     "--out", str(attributed["out"]), "--run-name", "run", "--device", "cpu"])
    finally:
        (attributed["prompts"] / "c.txt").unlink()
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0] == f"3 prompt files: 2 already in {attributed['out']}, 1 to attribute"
    assert err[1] == f"loading {tmp_path / 'no-such-model'} ..." and err[-1].startswith("error: ")
