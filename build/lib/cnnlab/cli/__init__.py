"""The `cnnlab` command: subcommands (commands.py), the Hydra application (hydra_app.py), `cnnlab list`."""

from cnnlab.cli.commands import main

__all__ = ["main"]
