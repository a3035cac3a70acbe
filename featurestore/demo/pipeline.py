"""`featurestore demo`: the whole workflow offline on the embedded model and traces."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

DEMO_QUERIES = [
    ("Live features and mean active features per token, by layer",
     """SELECT f.layer, count(*) AS live_features,
               round(sum(f.activation_count) / any_value(t.n_tokens), 2) AS active_per_token
        FROM features f JOIN source_tokens t USING (source) GROUP BY f.layer ORDER BY f.layer"""),
    ("Tokens per region",
     "SELECT region, count(*) AS tokens FROM tokens GROUP BY region ORDER BY tokens DESC"),
    ("Features most specific to the thinking region (share of their activations)",
     """SELECT a.layer, a.feature, count(*) AS n, round(avg((t.region = 'thinking')::INT), 3) AS thinking_share
        FROM activations a JOIN tokens t USING (seq_id, pos)
        GROUP BY a.layer, a.feature HAVING count(*) >= 50 ORDER BY thinking_share DESC, n DESC LIMIT 5"""),
    ("Strongest activations and their tokens",
     """SELECT a.layer, a.feature, round(a.act, 3) AS act, t.token, t.region, s.domain
        FROM activations a JOIN tokens t USING (seq_id, pos) JOIN sequences s USING (seq_id)
        ORDER BY a.act DESC LIMIT 5"""),
    ("Features whose top logits (decoder direction through the unembedding) are reasoning words",
     """SELECT layer, feature, list(token ORDER BY rank) FILTER (WHERE rank < 5) AS top_logits
        FROM logit_lens WHERE side = 'top'
        GROUP BY layer, feature
        HAVING bool_or(rank < 3 AND trim(token) IN ('Wait', 'Hmm', 'Actually', 'Hold'))
        ORDER BY layer, feature LIMIT 8"""),
]


PROMPTS_DIR = Path(__file__).with_name("prompts")


def _echo(text: str = "") -> None:
    click.echo(text)


def run_demo(out: str | Path, rebuild: bool = False) -> None:
    import featurestore as fs
    from featurestore.demo import TRACES_PATH, build_demo_checkpoint, training_metrics
    from featurestore.demo.train import summary
    from featurestore.output import write_relation

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("demo checkpoint: base Qwen2 -> reasoning fine-tune -> transcoder adapters, trained on CPU once and "
          "cached (--rebuild retrains)...", file=sys.stderr)
    checkpoint = build_demo_checkpoint(out / "checkpoint", rebuild=rebuild)
    _echo("\n-- What training reached (held-out traces)")
    for line in summary(training_metrics(checkpoint)):
        _echo("  " + line)
    store_dir = out / "store"
    store = fs.collect(str(checkpoint), str(TRACES_PATH), store_dir)
    _echo(f"\nstore: {store_dir}   (model {checkpoint}, data {TRACES_PATH.name})")
    for title, query in DEMO_QUERIES:
        _echo(f"\n-- {title}")
        write_relation(store.sql(query), "table", None)
    graphs = _attribute(checkpoint, store_dir, out)
    _echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s. Try:")
    _echo(f'  featurestore sql {store_dir} "select * from features order by activation_count desc limit 10"')
    _echo(f"  featurestore info {store_dir}")
    _echo("Open the attribution graphs with their features in the viewer (offline):")
    _echo(f"  featurestore serve --graphs {graphs} --store {store_dir} --open")


def _attribute(checkpoint: Path, store_dir: Path, out: Path) -> Path:
    """RelP graphs for the bundled prompts, with their features exported next to them for the viewer."""
    from attribution.runner import attribute_prompts

    graphs = out / "graphs"
    prompts = PROMPTS_DIR
    _echo(f"\n-- Attribution graphs for {prompts.name}/*.txt (RelP, pruned as circuit-tracer does)")
    outcomes = attribute_prompts(str(checkpoint), prompts, graphs, "demo", store=store_dir, log=_echo, progress=False)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise RuntimeError(f"demo attribution failed for {len(failed)} prompt(s)")
    return graphs
