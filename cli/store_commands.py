"""Commands over the store itself: demo, collect, sql, info, check, compact."""
from __future__ import annotations

import json

import click

import featurestore as fs
from featurestore.collect_options import CollectOptions, parse_layers
from featurestore.data import FORMATS
from featurestore.errors import UserError

_DEFAULTS = CollectOptions()
_LISTED = 10  # graph slugs named by `info`


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
@click.option("--adapters", type=click.Choice(["on", "off"]), default=None,
              help="Neurons: measure the model without its adapters (off, the default: what the original's neuron script "
                   "loads) or with them (on). Recorded in the store; a resume with the other choice is refused.")
@click.option("--neuron-samples", type=click.IntRange(1), default=_DEFAULTS.neuron_samples, show_default=True,
              help="Neurons: uniformly sampled positive activations kept per chunk and neuron, each with its true-activation "
                   "window (random samples, intervals, quantiles and histogram come from them).")
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
@click.option("--no-compact", is_flag=True, help="Keep chunk files as written when the run completes "
              "(by default each layer's chunks are merged; see `featurestore compact`).")
def collect(model, data, store, fmt, max_length, max_samples, layers, dtype, device, batch_tokens, skip_incomplete, source,
            neurons_per_layer, seed, adapters, neuron_samples, chunk_size, tokenizer, writer_threads, revision, ray_address,
            num_workers, gpus_per_worker, no_compact):
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
                        revision=revision, adapters=adapters, neuron_samples=neuron_samples, compact=not no_compact,
                        writer_threads=writer_threads)
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
    """Run a read-only SQL QUERY over the store's views (activations, tokens, sequences, logit_lens, features, ...).

    Queries may also read other local files (read_parquet, read_csv, ...). Statements that would write, attach,
    create, install or load extensions, or change settings (COPY, ATTACH, CREATE, INSTALL, SET, ...) are refused;
    write a result with --output instead. No query reaches the network. With --format csv, nested values (lists,
    structs, maps) are written as JSON text."""
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
    for run in data["interp_runs"]:
        outcome = ", ".join(f"{n:,} {status}" for status, n in sorted(run["features"].items())) or "no features yet"
        click.echo(f"judge run  {run['run_id']} ({run['kind']}, {run['judge_model']}) started {run['started']}, "
                   f"{run['invocations']} invocation{'s' if run['invocations'] != 1 else ''}: {outcome}")
    graphs = data["graphs"]["graphs"]
    if graphs:
        shown = ", ".join(g["slug"] for g in graphs[:_LISTED])
        more = f" and {len(graphs) - _LISTED} more" if len(graphs) > _LISTED else ""
        click.echo(f"graphs     {len(graphs)} stored: {shown}{more} (see the graphs, graph_nodes views)")
    else:
        click.echo("graphs     none stored (featurestore attribute --store STORE adds them)")


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Directory for the demo checkpoint, store and exports.")
@click.option("--rebuild", is_flag=True, help="Retrain the demo models even if a cached build exists.")
def demo(out, rebuild):
    """Everything offline on a miniature of the paper: train (cached), collect, query, attribute, serve line.

    The first run trains, on CPU and on the bundled traces, a small base Qwen2 (prompts and answers only), its
    reasoning fine-tune (whole traces, thinking included) and transcoder adapters between them (KL to the
    reasoning model + NMSE + L1), and caches the result; later runs reuse it unless --rebuild is given.
    """
    from featurestore.demo.pipeline import run_demo

    run_demo(out, rebuild=rebuild)


@click.command()
@click.argument("store")  # a directory or an object-store URI (s3://bucket/prefix)
@click.option("--upgrade", is_flag=True, help="First record size and sha256 of listed files that have none "
              "(stores written before verified files), hashing them as they are now.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Files hashed in parallel [CPUs, at most 8].")
def check(store, upgrade, workers):
    """Verify every file of STORE against the size and sha256 recorded when it was committed.

    Prints one line per problem, naming the file: missing, truncated, wrong hash, listed twice, outside the store,
    not listed but present, no recorded hash. Exit status 0 when there is none, 1 otherwise.
    """
    from featurestore.checks import check_store, upgrade as upgrade_store

    if upgrade:
        click.echo(f"recorded size and sha256 of {upgrade_store(store, workers=workers)} files", err=True)
    problems = check_store(store, workers=workers)
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problems in {store}", err=True)
        raise SystemExit(1)
    click.echo(f"ok: every listed file of {store} matches its recorded size and sha256")


@click.command()
@click.argument("store")  # a directory or an object-store URI (s3://bucket/prefix)
def compact(store):
    """Merge each layer's chunk files into a few files sorted by (feature, seq_id, pos), and its per-chunk
    feature_stats into one row per feature: faster per-feature reads and `features` view, same query results.

    Safe to interrupt: the old files stay in force until a layer's new ones are committed; rerun to finish.
    A completed `collect` does this itself unless run with --no-compact.
    """
    from featurestore.compaction import compact as compact_store

    summary = compact_store(store)
    tokens = f" and {summary['tokens_files']} tokens files into one" if summary.get("tokens_files") else ""
    click.echo(f"compacted {summary['layers']} layers ({summary['rows']:,} activations){tokens} in {store}")


def register(group: click.Group) -> None:
    for command in (demo, collect, sql, info, check, compact):
        group.add_command(command)
