"""Train a mass regressor (a DeepViT or a ResNet) on one converted HDF5 data set (several files = shards).

    python -m massreg.train data/top.h5 --model tiny --epochs 8 --run-dir runs/demo
    python -m massreg.train data/top.h5 --recipe seed                  # the original write-up, for comparison
    python -m massreg.train --resume runs/demo                         # continue from runs/demo/last.pt
    torchrun --nproc_per_node=4 -m massreg.train data/top_*.h5 ...     # DistributedDataParallel

Model selection uses the `val` split only; the `test` split is never opened here. The run directory gets
config.json, metrics.csv (one row per epoch), last.pt, best_val_loss.pt, best_mre.pt (each written atomically,
each enough to rebuild the model and resume) and plots/ (loss curves; predictions of best_val_loss.pt on val).

This module is the command; the recipes are massreg.recipes, the loop massreg.trainer.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import click
from click.core import ParameterSource

from massreg.cli import amp_option, batch_size_option, command, device_option, force_option, user_errors, \
    workers_option
from massreg.recipes import (CHOICES, DEFAULT_LR, PATCH_PRESETS, RECIPES, ConfigError, build_config,
                             config_from_run)
from massreg.registry import PRESETS, describe
from massreg.trainer import train
from pipeline.signals import exit_on_interrupt


@command(epilog="Model presets (--model):\n\n\b\n" + "\n".join(
                   f"{name:<13}{describe(preset)}" for name, preset in PRESETS.items()))
@click.argument("data", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), help="Output folder [runs/<timestamp>].")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default="default", show_default=True,
              help="Defaults for the options below; explicit options override them.")
@click.option("--model", help="Model preset (listed below) [seed].")
@click.option("--epochs", type=int, help="[recipe]")
@batch_size_option(None, "[recipe]")
@click.option("--lr", type=float,
              help="Peak learning rate [recipe; the default recipe's by model: "
                   + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + "].")
@click.option("--weight-decay", type=float, help="[recipe]")
@click.option("--optimizer", type=click.Choice(CHOICES["optimizer"]), help="[recipe]")
@click.option("--schedule", type=click.Choice(CHOICES["schedule"]), help="[recipe]")
@click.option("--loss", type=click.Choice(CHOICES["loss"]), help="On the standardised mass [recipe].")
@click.option("--huber-delta", type=float,
              help="Huber transition, in standard deviations of the mass [recipe].")
@click.option("--grad-clip", type=float, help="Max global gradient norm; 0 = off [recipe].")
@click.option("--norm", type=click.Choice(CHOICES["norm"]),
              help="Images: z-score from /stats or fixed scales.")
@click.option("--aux/--no-aux", default=None, help="Feed pt, ieta, iphi to the model [recipe].")
@click.option("--flips/--no-flips", default=None, help="Random flips in eta and phi while training [recipe].")
@click.option("--quantiles/--no-quantiles", default=None,
              help="Also learn the 16 % and 84 % quantiles of the mass: a per-jet resolution, on a head that "
                   "leaves the point estimate as it is [recipe: default on, seed off].")
@click.option("--quantile-weight", type=float,
              help="Weight of the pinball loss of the quantiles beside the point loss [1].")
@click.option("--head-epochs", type=int,
              help="With --quantiles: when training ends, fit the quantile head again for this many epochs "
                   "on the finished model's train features (in the 4 flips; up to 100,000 jet-flips), then "
                   "calibrate; 0: keep the head as trained [recipe: default 4].")
@click.option("--reweight", type=click.Choice(CHOICES["reweight"]),
              help="flat: weight each train jet by the inverse population of its (mass, pT) cell, so that a "
                   "spectrum that is not flat trains as if it were [none].")
@click.option("--shuffle", type=click.Choice(CHOICES["shuffle"]), default="row", show_default=True,
              help="Train order: uniform over rows, or contiguous blocks shuffled in windows (data larger "
                   "than the page cache: docs/training.md).")
@click.option("--patch-norm/--no-patch-norm", default=None,
              help=f"LayerNorm over raw patch pixels ({', '.join(PATCH_PRESETS)} only) [preset's].")
@device_option
@amp_option
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@workers_option("Reader processes (persistent DataLoader workers); 0: reader threads in this process.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="Start a new run with the settings of RUN/config.json (a previous run's); options given "
                   "here override them, DATA replaces its data files.")
@click.option("--tensorboard", is_flag=True,
              help="Also write TensorBoard event files to RUN/tensorboard: per-step loss and learning rate, "
                   "per-epoch metrics, val plots (needs pip install 'massreg[tensorboard]').")
@click.option("--resume", type=click.Path(file_okay=False, exists=True),
              help="Continue RUN_DIR from last.pt (from the step it was written at, inside an epoch or not).")
@click.option("--checkpoint-every-minutes", type=float,
              help="Also write last.pt inside an epoch this often, for jobs killed without warning; a stop "
                   "signal (SIGTERM, SIGHUP, SIGUSR1) always writes it at the step it arrives in [0: off].")
@force_option("Overwrite a run directory that already holds a run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-train-samples", type=int, help="Use only the first N train rows (quick runs).")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Validate every N epochs (and last).")
@click.pass_context
def main(ctx, data, recipe, config_path, **_):
    """Train a mass regressor (--model) on DATA.h5 (several files = shards of one data set).

    SIGTERM, SIGHUP or SIGUSR1 (a batch system's time limit or preemption) end the run after the step in
    progress, with last.pt written at that step (exit status 128 + the signal's number); --resume RUN_DIR
    continues there and ends as an uninterrupted run would. Ctrl-C stops at once: last.pt keeps the last
    checkpoint written.
    """
    # Only what the user typed overrides the recipe (and, under --resume, is checked against the run);
    # the click defaults of the other options equal TrainConfig's.
    typed = {("compile" if n == "compile_" else n): v for n, v in ctx.params.items()
             if n not in ("data", "recipe", "config_path") and ctx.get_parameter_source(n) in
             (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    with user_errors():
        if config_path is None:
            config = build_config(recipe, data=data, **typed)
        elif ctx.get_parameter_source("recipe") == ParameterSource.COMMANDLINE:
            raise ConfigError("--recipe with --config: the config sets every option; override single options")
        else:
            config = config_from_run(config_path, data=data, **typed)
        if config.resume and ctx.get_parameter_source("recipe") == ParameterSource.COMMANDLINE:
            config = replace(config, overrides=(*config.overrides, "recipe"))  # checked against the run's
        run = config.resume or config.run_dir or "a new run"
        outcome = "its last.pt (if any) holds the last checkpoint written"
        with exit_on_interrupt(f"training of {run}", outcome):
            result = train(config)
    if result["stopped"] is not None:
        sys.exit(128 + result["stopped"])


if __name__ == "__main__":
    main()
