"""The options every massreg command shares, declared once (pipeline.cli has the rest of the command layer:
`command`, `force_option`, `user_errors`).

    @command()
    @device_option
    @amp_option
    @workers_option("DataLoader workers.")
    @batch_size_option(256)
    @force_option("Replace --out if it exists.")
    def main(...): ...
"""
from __future__ import annotations

import click

from massreg.distributed import DEVICES
from pipeline.cli import command, force_option, user_errors

__all__ = ["command", "force_option", "user_errors", "device_option", "amp_option", "workers_option",
           "batch_size_option"]

device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="auto: CUDA when torch sees a GPU, else the CPU.")
amp_option = click.option("--amp/--no-amp", default=False, show_default=True,
                          help="bf16 autocast on CUDA (a no-op on the CPU).")


def workers_option(help: str):
    """--workers N (>= 0): reader processes; what 0 means is the command's to say."""
    return click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help=help)


def batch_size_option(default: int | None, help: str | None = None):
    """--batch-size (>= 1); default None: the recipe's."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=default,
                        show_default=default is not None, help=help)
