"""TensorBoard event files for a run (`massreg.train --tensorboard`), under RUN/tensorboard/.

    log = TensorBoardLog(run_dir, purge_step=None)    # or the step a resumed run continues from
    log.step(step, loss, lr, objective=None)          # train/loss, train/lr[, train/objective]
    log.epoch(step, row)                               # the metrics.csv row of an epoch, as epoch/<column>
    log.figure(step, "val/pred_vs_true", fig)          # a matplotlib Figure as an image
    log.close()

Everything is logged against the optimizer step, so one axis holds the per-step loss and the per-epoch
metrics; `epoch/epoch` gives the epoch of each point. Rank 0 only (the trainer makes it there). A resumed run
appends to the same folder with purge_step = the first step it takes: TensorBoard then hides what a stopped
run had logged past its last checkpoint, so a curve never shows the same steps twice.
tensorboard (the optional [tensorboard] extra) is imported only when a log is made.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.errors import UserError

FOLDER = "tensorboard"


class TensorBoardLog:
    def __init__(self, run_dir: str | Path, *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: "
                            "pip install 'massreg[tensorboard]'") from None
        self.path = Path(run_dir) / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=purge_step)

    def step(self, step: int, loss: float, lr: float, *, objective: float | None = None) -> None:
        """One optimizer step: the point loss, the learning rate and, with quantiles, the whole objective."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if objective is not None:
            self.writer.add_scalar("train/objective", objective, step)

    def epoch(self, step: int, row: dict) -> None:
        """A metrics.csv row (its non-empty numbers) as epoch/<column>, at the step the epoch ended."""
        for key, value in row.items():
            if value is not None:
                self.writer.add_scalar(f"epoch/{key}", float(value), step)
        self.writer.flush()

    def figure(self, step: int, tag: str, fig: Figure) -> None:
        """fig rendered to PNG, logged as an image (HWC uint8)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        self.image(step, tag, buf.getvalue())

    def image(self, step: int, tag: str, png: bytes) -> None:
        from matplotlib.image import imread

        pixels = imread(io.BytesIO(png), format="png")                   # (H, W, 3 or 4) float in [0, 1]
        self.writer.add_image(tag, (pixels[..., :3] * 255).astype(np.uint8), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
