"""The `kvrt` command line: generate, chat, eval, serve and model management."""

from kvrt.cli.commands import cli, main

__all__ = ["cli", "main"]
