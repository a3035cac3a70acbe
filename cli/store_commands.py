"""Commands over the store itself: demo, collect, sql, info."""
from __future__ import annotations

import json

import click

import featurestore as fs
from featurestore.collect_options import CollectOptions, parse_layers
from featurestore.data import FORMATS
from featurestore.errors import UserError

_DEFAULTS = CollectOptions()


@click.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory or Hugging Face repo id (original adapter format).")
@click.option("--data", "-d", required=True, help="Local .jsonl or hf://owner/repo/path.jsonl of reasoning traces.")
@click.option("--store", "-s", required=True, type=click.Path(file_okay=False), help="Store directory (created, or resumed).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=_DEFAULTS.format, show_default=True,
              help="How a row becomes model text (deepseek: BOS <｜User｜>prompt<｜Assistant｜>response).")
@click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True, help="Truncate sequences to this many tokens.")
@click.option("--max-samples", type=int, default=None, help="Use only the first N rows.")
@click.option("--layers", default=None, help="Layers to collect, e.g. 0,3,5-7 (default: all).")
@click.option("--dtype", default=_DEFAULTS.dtype, show_default=True, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--batch-tokens", type=int, default=_DEFAULTS.batch_tokens, show_default=True,
              help="Tokens per forward batch (batch size × longest sequence); longer sequences run alone.")
@click.option("--skip-incomplete", is_flag=True, help="Skip rows without both <think> and </think> (the original's behaviour; "
              "biases toward short traces). By default they are kept and marked complete=false.")
@click.option("--source", type=click.Choice(["transcoder", "neurons", "neuron"]), default="transcoder", show_default=True,
              help="transcoder: every adapter feature activation; neurons: the MLP-neuron baseline.")
@click.option("--neurons-per-layer", type=int, default=_DEFAULTS.neurons_per_layer, show_default=True, help="Sampled neurons per layer.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seed of the neuron sample.")
@click.option("--chunk-size", type=int, default=_DEFAULTS.chunk_size, show_default=True, help="Rows per committed chunk (unit of resume).")
@click.option("--tokenizer", default=None, help="Tokenizer path or id (default: the checkpoint's).")
@click.option("--writer-threads", type=click.IntRange(1), default=_DEFAULTS.writer_threads, show_default=True,
              help="Threads that sort and write activation files while the model runs (raise it if a fast GPU waits).")
@click.option("--revision", default=None, help="Hub revision of the model.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS|auto]",
              help="Run on Ray actors: alone, a new local cluster; auto, the cluster `ray start` began on this node; "
                   "HOST:PORT or ray://HOST:PORT, that cluster. Needs featurestore[ray].")
@click.option("--num-workers", type=click.IntRange(1), default=None, help="With --ray: actors, each loading the model once [1].")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=None, help="With --ray: GPUs per actor [0; use 1 on GPU nodes].")
def collect(model, data, store, fmt, max_length, max_samples, layers, dtype, device, batch_tokens, skip_incomplete, source,
            neurons_per_layer, seed, chunk_size, tokenizer, writer_threads, revision, ray_address, num_workers, gpus_per_worker):
    """Run MODEL over DATA and store every non-zero feature activation.

    Interrupt at any time: rerunning the same command resumes from the last committed chunk.
    """
    run = fs.collect
    if ray_address is not None:
        from featurestore.distributed import cluster_collect

        run = cluster_collect(ray_address, num_workers, gpus_per_worker)
    elif num_workers is not None or gpus_per_worker is not None:
        raise UserError("--num-workers and --gpus-per-worker need --ray")
    result = run(model, data, store, format=fmt, max_length=max_length, max_samples=max_samples,
                        layers=parse_layers(layers), dtype=dtype, device=device, batch_tokens=batch_tokens,
                        skip_incomplete=skip_incomplete, source="neuron" if source.startswith("neuron") else source,
                        neurons_per_layer=neurons_per_layer, seed=seed, chunk_size=chunk_size, tokenizer=tokenizer,
                        revision=revision, writer_threads=writer_threads)
    info = result.info()
    for name, s in info["sources"].items():
        click.echo(f"{name}: {s['activations']:,} activations, {s['live_features']:,} live features, {s['chunks']} chunks")
    click.echo(f"{info['sequences']:,} sequences, {info['tokens']:,} tokens in {result.path}")


@click.command()
@click.argument("store")  # a directory or an object-store URI (s3://bucket/prefix)
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
@click.option("--max-rows", type=int, default=40, show_default=True, help="Rows shown by --format table.")
def sql(store, query, fmt, output, max_rows):
    """Run a SQL QUERY over the store's views (activations, tokens, sequences, logit_lens, features, ...)."""
    from featurestore.output import write_relation

    write_relation(fs.open(store).sql(query), fmt, output, max_rows)


@click.command()
@click.argument("store")  # a directory or an object-store URI (s3://bucket/prefix)
@click.option("--json", "as_json", is_flag=True, help="Print the full info as JSON.")
def info(store, as_json):
    """Model, sizes, counts and runs of a store."""
    data = fs.open(store).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    m = data["model"]
    click.echo(f"store      {data['path']}  ({data['bytes_on_disk'] / 1e6:,.1f} MB)")
    click.echo(f"model      {m['name']}  layers={m['n_layers']} features={m['n_features']} d_model={m['d_model']}")
    click.echo(f"data       {data['data']['path']}  ({data['data']['n_rows']:,} rows)")
    click.echo(f"collected  {data['sequences']:,} sequences, {data['tokens']:,} tokens")
    for name, s in data["sources"].items():
        click.echo(f"{name:<10} layers={s['layers']} activations={s['activations']:,} live={s['live_features']:,} chunks={s['chunks']}")
    for run in data["runs"]:
        state = "finished " + run["finished"] if run["finished"] else "unfinished"
        click.echo(f"run        {run['source']} started {run['started']}, {state}")


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Directory for the demo checkpoint, store and exports.")
def demo(out):
    """Everything offline on the embedded demo model: build, collect, query (and more as it grows)."""
    from featurestore.demo.pipeline import run_demo

    run_demo(out)


def register(group: click.Group) -> None:
    for command in (demo, collect, sql, info):
        group.add_command(command)
