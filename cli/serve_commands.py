"""``featurestore serve``: the circuit-tracer viewer with local graphs and features, offline, on loopback."""
from __future__ import annotations

import click

from featurestore.errors import UserError


def _feature_source(store: str | None, features: str | None, source: str):
    from exporters.serve_features import FeatureSource, StoreSource, open_features_dir

    if store and features:
        raise UserError("give --store or --features, not both")
    if features:
        return open_features_dir(features)
    if store:
        import featurestore

        return StoreSource(featurestore.open(store), source=source)
    return FeatureSource()


def register(group: click.Group) -> None:
    @group.command("serve")
    @click.option("--graphs", required=True, type=click.Path(file_okay=False),
                  help="Directory with graph-metadata.json and {slug}.json graph files.")
    @click.option("--store", default=None, help="Render feature dashboards on demand from this store.")
    @click.option("--features", default=None, type=click.Path(file_okay=False),
                  help="A pack directory (index.json.gz + layer_*.bin) or a directory of {cantor_id}.json files.")
    @click.option("--source", type=click.Choice(["transcoder", "neuron"]), default="transcoder", show_default=True,
                  help="With --store: which activations the dashboards show.")
    @click.option("--port", type=click.IntRange(0, 65535), default=8042, show_default=True, help="0 picks a free port.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on; anything but loopback exposes your graphs and features.")
    @click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
    @click.option("--verbose", is_flag=True, help="Log every request on stderr.")
    def serve_command(graphs, store, features, source, port, host, open_browser, verbose):
        """Serve the attribution-graph viewer for the graphs in --graphs, with features from --store or --features.

        Works offline: the viewer's scripts come from the npm packages fetched at setup (`make`), and feature
        lookups of Hub or ./data scans are answered from the local source. Ctrl-C stops it.
        """
        from exporters.serve import ViewerConfig, ViewerServer, notices

        config = ViewerConfig(graphs, _feature_source(store, features, source))
        server = ViewerServer(config, host=host, port=port, verbose=verbose)
        for line in notices(config, host):
            click.echo(f"note: {line}", err=True)
        click.echo(f"serving {server.url}  (graphs: {config.graphs}; features: {config.features.describe()})")
        click.echo("press Ctrl-C to stop")
        if open_browser:
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        finally:
            server.server_close()
