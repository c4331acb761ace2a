"""When a training run stops or checkpoints inside an epoch, and where it picks up again.

A batch system stops a job with SIGTERM (Slurm at its time limit or on preemption, a grace period before
SIGKILL; `#SBATCH --signal=B:USR1@120` asks for SIGUSR1 earlier), and a job can also die without warning.
Two things make the loss at most a few minutes of work:

- `StepGate`, polled after every optimizer step and at the end of an epoch: it reports a stop signal
  received (SIGTERM, SIGHUP, SIGUSR1; a second one 2 s or more later raises, so a user who insists is not
  kept waiting) and a checkpoint due by `--checkpoint-every-minutes`. Under DDP the ranks agree with one
  small all_reduce, so every rank stops or saves at the same step, whichever rank saw the signal.
- `EpochProgress`: what a checkpoint written inside an epoch stores of that epoch (batches done, each rank's
  running loss sum and sample count), so that `--resume` starts the epoch at the next batch and the epoch's
  train loss comes out as in an uninterrupted run. The batch order and the flips are functions of
  (seed, epoch, step), and the checkpoint holds the RNG state of that step, so the resumed run takes the same
  steps with the same weights.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from pipeline.signals import StopFlag


@dataclass
class EpochProgress:
    """The epoch in progress at a mid-epoch checkpoint: batches done, and per rank the train loss summed
    over its samples and their count (summed over ranks at the end of the epoch)."""
    batches: int = 0
    loss_sums: tuple[float, ...] = (0.0,)
    counts: tuple[int, ...] = (0,)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "EpochProgress | None":
        if not d:
            return None
        return cls(int(d["batches"]), tuple(float(x) for x in d["loss_sums"]),
                   tuple(int(x) for x in d["counts"]))


class StepGate:
    """After each optimizer step: (stop now, checkpoint now), the same on every rank.

        with StepGate(every_minutes=30, world=2) as gate:
            for step ...:
                stop, save = gate.poll()
    """

    def __init__(self, every_minutes: float | None = None, *, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, clock=None):
        self.every_s = None if not every_minutes else 60.0 * every_minutes
        self.rank, self.world = rank, world
        self.clock = clock or time.monotonic
        self.device = device or torch.device("cpu")
        # Under torchrun a worker gets Slurm's SIGTERM and, moments later, the one torchrun forwards: the same
        # request. A signal 2 s or more after the first raises at once.
        self.flag = StopFlag(repeat_after=2.0)
        self._last_save = self.clock()

    def __enter__(self) -> "StepGate":
        self.flag.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.flag.__exit__(*exc)

    @property
    def signum(self) -> int | None:
        """The signal that stopped the run (None: none did)."""
        return self.flag.signum

    def saved(self) -> None:
        """A checkpoint was just written (at an epoch end, or because one was due): the timer restarts."""
        self._last_save = self.clock()

    def poll(self) -> tuple[bool, bool]:
        """(stop, checkpoint due); collective under DDP: every rank polls at the same steps."""
        stop = self.flag.requested
        due = self.rank == 0 and self.every_s is not None and self.clock() - self._last_save >= self.every_s
        if self.world > 1:
            # MAX over ranks: one rank's signal (or rank 0's timer; the others' clocks are not consulted, so
            # they cannot disagree) is everyone's. One 2-element all_reduce per step.
            votes = torch.tensor([float(stop), float(due)], device=self.device)
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            stop, due = bool(votes[0].item()), bool(votes[1].item())
            if stop and self.flag.signum is None:
                self.flag.request()          # another rank's signal: this rank reports SIGTERM
        return stop, due
