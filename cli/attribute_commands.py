"""``featurestore attribute``: RelP attribution graphs for the circuit-tracer viewer."""
from __future__ import annotations

import click

from featurestore.errors import UserError


@click.command("attribute")
@click.option("--checkpoint", required=True, help="Model with transcoder adapters: local directory or Hub repo id.")
@click.option("--prompts", required=True, type=click.Path(),
              help="A .txt prompt file or a directory of them; each file's last token is the target.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Directory for {slug}.json and graph-metadata.json.")
@click.option("--run-name", required=True, help="Slug prefix: graphs are named {run_name}__{file_stem}.")
@click.option("--scan", default=None,
              help="Where the viewer loads features: a Hub repo id with an uploaded pack, or ./data/<dir>. "
                   "Default with --store: per-feature JSON exported to OUT/features-<run>; otherwise the run name.")
@click.option("--store", default=None, type=click.Path(), help="Also write graphs into this store (and use its descriptions).")
@click.option("--max-n-logits", default=10, show_default=True, help="At most this many logit targets.")
@click.option("--desired-logit-prob", default=0.95, show_default=True, help="Logits until this cumulative probability.")
@click.option("--batch-size", default=16, show_default=True, help="Targets per batched backward pass.")
@click.option("--max-feature-nodes", default=10000, show_default=True, help="Feature rows computed (most influential first).")
@click.option("--node-threshold", default=0.8, show_default=True, help="Share of node influence kept by pruning.")
@click.option("--edge-threshold", default=0.98, show_default=True, help="Share of edge influence kept by pruning.")
@click.option("--injection", type=click.Choice(["encoder-input", "layer-input"]), default="encoder-input",
              show_default=True, help="Read features at their encoder's input, or (as the original) at the layer input.")
@click.option("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
def attribute_command(checkpoint, prompts, out_dir, run_name, scan, store, max_n_logits, desired_logit_prob,
                      batch_size, max_feature_nodes, node_threshold, edge_threshold, injection, device, dtype):
    """Compute one attribution graph per prompt file and write it for the circuit-tracer viewer.

    Graphs that already exist in OUT are skipped; a prompt that fails is reported and the others
    still run. The exit status is non-zero when any prompt failed.
    """
    from attribution.runner import attribute_prompts

    outcomes = attribute_prompts(
        checkpoint, prompts, out_dir, run_name, scan=scan, store=store, max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob, batch_size=batch_size, max_feature_nodes=max_feature_nodes,
        node_threshold=node_threshold, edge_threshold=edge_threshold, injection=injection, device=device,
        dtype=dtype, log=lambda line: click.echo(line, err=True),
    )
    counts = {status: sum(o.status == status for o in outcomes) for status in ("written", "skipped", "failed")}
    click.echo(f"{counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed -> {out_dir}")
    for outcome in outcomes:
        if outcome.status == "written":
            click.echo(f"  {outcome.slug}: {outcome.details['summary']}")
        elif outcome.status == "failed":
            click.echo(f"  {outcome.slug}: FAILED: {outcome.error}")
    mismatched = [o.slug for o in outcomes if o.details.get("top_differs")]
    if mismatched:
        click.echo(f"model's top prediction differs from the file's target in {len(mismatched)}: {', '.join(mismatched)}")
    if counts["written"]:
        click.echo(f"view: featurestore serve --graphs {out_dir}" + (f" --store {store}" if store else ""))
    if counts["failed"]:
        raise UserError(f"{counts['failed']} of {len(outcomes)} prompts failed")


def register(group: click.Group) -> None:
    group.add_command(attribute_command)
