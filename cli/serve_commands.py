"""``featurestore serve``: the circuit-tracer viewer with local graphs and features, offline, on loopback."""
from __future__ import annotations

from pathlib import Path

import click

from featurestore.errors import UserError


def _feature_source(store, features: str | None, source: str):
    from exporters.serve_features import FeatureSource, StoreSource, open_features_dir

    if store and features:
        raise UserError("give --store or --features, not both")
    if features:
        return open_features_dir(features)
    if store:
        return StoreSource(store, source=source)
    return FeatureSource()


def _say(text: str) -> None:
    click.echo(f"featurestore serve: {text}", err=True)


def register(group: click.Group) -> None:
    @group.command("serve")
    @click.option("--graphs", default=None, type=click.Path(file_okay=False),
                  help="Directory with graph-metadata.json and {slug}.json graph files (the circuit-tracer viewer).")
    @click.option("--store", default=None,
                  help="Serve the feature browser over this store (/), and render the viewer's feature dashboards "
                       "on demand from it.")
    @click.option("--model", default=None,
                  help="With --store: the store's adapter checkpoint, for tracing texts and interventions in the "
                       "browser (loaded on the first trace).")
    @click.option("--features", default=None, type=click.Path(file_okay=False),
                  help="A pack directory (index.json.gz + layer_*.bin) or a directory of {cantor_id}.json files.")
    @click.option("--source", type=click.Choice(["transcoder", "neuron"]), default="transcoder", show_default=True,
                  help="With --store: which activations the dashboards show.")
    @click.option("--port", type=click.IntRange(0, 65535), default=8042, show_default=True, help="0 picks a free port.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on; anything but loopback exposes your graphs and features.")
    @click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
    @click.option("--verbose", is_flag=True, help="Log every request on stderr.")
    def serve_command(graphs, store, features, source, model, port, host, open_browser, verbose):
        """Serve the feature browser over --store and the attribution-graph viewer for the graphs in --graphs.

        With --store, / lists the store's features (filter by layer, frequency, category, explained; search by
        description, top-logit token or the token a feature fires on most), each feature has a page at
        /feature/<source>/<layer>/<feature>, and with --model, /trace shows which features fire on a text and
        runs interventions. Everything is computed from the store on demand and cached. With --graphs,
        /index.html is the circuit-tracer viewer (feature pages link graphs that contain the feature).
        Works offline and binds 127.0.0.1 by default. Ctrl-C stops it.
        """
        if not graphs and not store:
            raise UserError("give --store STORE (feature browser) and/or --graphs DIR (graph viewer)")
        if model and not store:
            raise UserError("--model needs --store (tracing reads the store's format and descriptions)")
        _say("importing the server")
        from exporters.serve import ViewerConfig, ViewerServer, notices

        opened, browser = None, None
        if store:
            _say(f"opening store {store}")
            import featurestore
            from exporters.browser.routes import BrowserApp

            opened = featurestore.open(store)
            browser = BrowserApp(opened, Path(graphs).expanduser().resolve() if graphs else None, model)
        config = ViewerConfig(graphs, _feature_source(opened, features, source), browser=browser)
        server = ViewerServer(config, host=host, port=port, verbose=verbose)
        for line in notices(config, host):
            click.echo(f"note: {line}", err=True)
        click.echo(f"serving {server.url}  (graphs: {config.graphs}; features: {config.features.describe()}"
                   + (f"; trace model: {model}" if model else "") + ")")
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
