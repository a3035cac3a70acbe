"""Entry point: assembles the command group from the per-topic command modules."""
from __future__ import annotations

import sys

import click

from featurestore.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """featurestore: collect transcoder-adapter features (and MLP neurons) into a columnar store,
    query it with SQL, export dashboards and circuit-tracer packs, label features with LLM judges,
    and compute RelP attribution graphs.

    Start with `featurestore demo`, which runs everything offline on a small embedded model.
    """


def _register() -> None:
    import importlib

    for name in ("store_commands", "export_commands", "judge_commands", "attribute_commands", "serve_commands",
                 "trace_commands"):
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cli.{name}":
                continue
            raise
        module.register(cli)
    from cli.judge_commands import register_export

    register_export(cli.commands["export"])


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        code = cli.main(args=argv, standalone_mode=False)  # a command's ctx.exit(n) comes back as n
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:  # a command's own status (`check` exits 1 when it found problems)
        return int(exc.code or 0)
    except KeyboardInterrupt:
        click.echo("interrupted: committed chunks are kept; rerun the same command to resume", err=True)
        return 130
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
