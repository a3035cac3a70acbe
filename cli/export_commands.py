"""``featurestore export json|metadata|pack|verify`` and ``featurestore upload``: thin wrappers over exporters."""
from __future__ import annotations

import click

from featurestore.errors import UserError

_MAX_LISTED = 50


def _document_options(function):
    """Options shared by `export json` and `export pack` (what goes into each feature document)."""
    options = [
        click.option("--source", type=click.Choice(["transcoder", "neuron"]), default="transcoder", show_default=True,
                     help="Which activations to export."),
        click.option("--layers", default=None, help="Layers to export, e.g. 0,3,5-7 (default: all collected)."),
        click.option("--top-k", type=click.IntRange(1), default=20, show_default=True, help="Top activation examples."),
        click.option("--random", "n_random", type=click.IntRange(0), default=10, show_default=True, help="Random samples."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random samples."),
        click.option("--before", type=click.IntRange(0), default=50, show_default=True, help="Window tokens before."),
        click.option("--after", type=click.IntRange(0), default=20, show_default=True, help="Window tokens after."),
        click.option("--max-per-sequence", type=click.IntRange(0), default=2, show_default=True,
                     help="At most this many top activations from one sequence (0: no cap, as the original)."),
        click.option("--intervals", type=click.IntRange(0), default=5, show_default=True,
                     help="Interval groups below the top (0: none)."),
        click.option("--interval-kind", type=click.Choice(["range", "count"]), default="range", show_default=True,
                     help="range: equal activation ranges of (0, max], the viewer's histogram bins, so a weak mode "
                          "gets its own group; count: equally many activations per group (the original)."),
        click.option("--per-interval", type=click.IntRange(1), default=3, show_default=True, help="Examples per interval group."),
        click.option("--histogram-bins", type=click.IntRange(1), default=50, show_default=True),
        click.option("--workers", type=click.IntRange(1), default=None, help="Processes (default: all cores)."),
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS|auto]",
                     help="One Ray task per layer (alone: a new local cluster; auto or HOST:PORT: that cluster). "
                          "Needs featurestore[ray]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _options_from(kwargs: dict):
    from exporters.feature_json import DocumentOptions
    from featurestore.collect_options import parse_layers

    return DocumentOptions(top_k=kwargs.pop("top_k"), n_random=kwargs.pop("n_random"), seed=kwargs.pop("seed"),
                           before=kwargs.pop("before"), after=kwargs.pop("after"), n_intervals=kwargs.pop("intervals"),
                           per_interval=kwargs.pop("per_interval"), histogram_bins=kwargs.pop("histogram_bins"),
                           max_per_sequence=kwargs.pop("max_per_sequence") or None,
                           interval_kind=kwargs.pop("interval_kind")), \
        parse_layers(kwargs.pop("layers"))


def _open(store_path: str):
    import featurestore

    return featurestore.open(store_path)


def register(group: click.Group) -> None:
    @group.group("export")
    def export():
        """Write per-feature JSON, feature_metadata.json or the circuit-tracer pack; verify a pack;
        write the judges' results in the original file schemas."""

    @export.command("json")
    @click.argument("store")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes OUT/features/{cantor_id}.json.")
    @click.option("--no-metadata", is_flag=True, help="Skip OUT/feature_metadata.json.")
    @_document_options
    def export_json_command(store, out, no_metadata, source, workers, **kwargs):
        """Per-feature dashboard JSON for every live feature (plus feature_metadata.json)."""
        from exporters.feature_json import export_json
        from exporters.metadata import export_metadata

        ray_address = kwargs.pop("ray_address")
        options, layers = _options_from(kwargs)
        handle = _open(store)
        if ray_address is not None:
            from exporters.distributed import export_json_distributed

            summary = export_json_distributed(handle, out, source=source, options=options, layers=layers, address=ray_address)
        else:
            summary = export_json(handle, out, source=source, options=options, layers=layers, workers=workers)
        click.echo(f"wrote {summary.n_features} feature files to {summary.path}")
        if not no_metadata:
            click.echo(f"wrote {export_metadata(handle, out, source=source, layers=layers)}")

    @export.command("metadata")
    @click.argument("store")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes OUT/feature_metadata.json.")
    @click.option("--source", type=click.Choice(["transcoder", "neuron"]), default="transcoder", show_default=True)
    @click.option("--layers", default=None, help="Layers whose features are listed, e.g. 0,3,5-7 (default: all collected).")
    def export_metadata_command(store, out, source, layers):
        """feature_metadata.json: token totals and per-feature domain/region/thinking-position densities."""
        from exporters.metadata import export_metadata
        from featurestore.collect_options import parse_layers

        click.echo(f"wrote {export_metadata(_open(store), out, source=source, layers=parse_layers(layers))}")

    @export.command("pack")
    @click.argument("store", required=False)
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Pack directory (index.json.gz, layer_*.bin).")
    @click.option("--from-json", "from_json", type=click.Path(file_okay=False, exists=True), default=None,
                  help="Pack an existing directory of {cantor_id}.json files instead of a store.")
    @click.option("--n-layers", type=click.IntRange(1), default=None, help="With --from-json: layers in the index.")
    @click.option("--n-features", type=click.IntRange(1), default=None, help="With --from-json: features per layer.")
    @click.option("--dead-stub", is_flag=True, help="Write a small valid entry for features that never fired.")
    @click.option("--level", type=click.IntRange(1, 9), default=None, help="gzip level (default 6).")
    @_document_options
    def export_pack_command(store, out, from_json, n_layers, n_features, dead_stub, level, source, workers, **kwargs):
        """The circuit-tracer packed feature format, streamed from the store (or from --from-json files)."""
        from exporters.pack import DEFAULT_LEVEL, pack_json_dir

        level = level or DEFAULT_LEVEL
        ray_address = kwargs.pop("ray_address")
        if (store is None) == (from_json is None):
            raise UserError("give either STORE or --from-json DIR")
        if from_json is not None:
            if ray_address is not None:
                raise UserError("--ray exports from a STORE, not --from-json")
            summary = pack_json_dir(from_json, out, n_layers=n_layers, n_features=n_features, dead_stub=dead_stub,
                                    level=level, workers=workers)
        else:
            from exporters.feature_json import export_pack

            options, layers = _options_from(kwargs)
            if ray_address is not None:
                from exporters.distributed import export_pack_distributed

                summary = export_pack_distributed(_open(store), out, source=source, options=options, layers=layers,
                                                  dead_stub=dead_stub, level=level, address=ray_address)
            else:
                summary = export_pack(_open(store), out, source=source, options=options, layers=layers,
                                      dead_stub=dead_stub, level=level, workers=workers)
        total = len(summary.layers) * summary.n_features  # every slot of the index: live entries and dead ones
        dead = f"{summary.dead:,} dead as stub entries" if dead_stub else f"{summary.dead:,} dead (empty)"
        click.echo(f"wrote {total:,} entries ({summary.entries:,} live, {dead}) in {len(summary.layers)} layers "
                   f"of {summary.n_features:,}, {summary.bytes_written:,} bytes, to {summary.path}")

    @export.command("verify")
    @click.argument("directory", type=click.Path())
    @click.option("--n-layers", type=click.IntRange(1), default=None, help="Expect exactly this many layers in a pack.")
    @click.option("--workers", type=click.IntRange(1), default=None)
    def export_verify_command(directory, n_layers, workers):
        """Check a pack (or a JSON or graph directory): offsets, entries, JSON, layer coverage."""
        from exporters.integrity import verify

        report = verify(directory, workers=workers, n_layers=n_layers)
        for problem in report.problems[:_MAX_LISTED]:
            click.echo(str(problem))
        if len(report.problems) > _MAX_LISTED:
            click.echo(f"... and {len(report.problems) - _MAX_LISTED} more")
        if not report.ok:
            raise UserError(f"{directory}: {len(report.problems)} problems in a {report.kind} directory")
        click.echo(f"ok: {report.kind} {directory}, {report.checked} entries checked")

    @group.command("upload")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--repo", required=True, help="OWNER/NAME of the Hugging Face model repo (created if missing).")
    @click.option("--path-in-repo", default=None,
                  help="Folder in the repo (default by the kind of DIRECTORY: a pack goes to features, where the "
                       "viewer reads packs; a graph folder to graphs; per-feature JSON to feature-json).")
    @click.option("--revision", default=None, help="Branch to commit to (created if missing; default main).")
    @click.option("--private", is_flag=True, help="Create the repo private (the browser viewer cannot read private repos).")
    @click.option("--dry-run", is_flag=True, help="List what would go where; no token, no network.")
    def upload_command(directory, repo, path_in_repo, revision, private, dry_run):
        """Upload a verified pack (or JSON or graph directory) to the Hugging Face Hub.

        The kind of DIRECTORY is recognised (as `export verify` does) and sets the default --path-in-repo;
        --dry-run shows the destination of every file and the path chosen."""
        from exporters.hub_upload import upload

        plan = upload(directory, repo, path_in_repo=path_in_repo, revision=revision, private=private, dry_run=dry_run)
        if dry_run:
            for line in plan.lines():
                click.echo(line)
            return
        click.echo(f"uploaded {len(plan.files)} files to https://huggingface.co/{repo}/tree/{plan.revision}/{plan.path_in_repo}")
        if plan.scan():
            click.echo(f"scan: {plan.scan()}")
