"""Stop signals from batch systems, turned into the clean path Ctrl-C already takes.

Slurm sends SIGTERM at a time limit or on preemption (then SIGKILL after a grace period), HTCondor on
eviction, and a closed terminal sends SIGHUP. Python's default for both is to die at once, skipping every
`finally`, so temporary files stay behind. Ctrl-C raises KeyboardInterrupt, which our writers clean up after.

Two ways to take a signal:
- `StopFlag`: the signal only sets a flag that the work polls between two pieces of it (`check()`, or
  `polled(items, flag)` around a loop), which then raises `Terminated` (a KeyboardInterrupt; plain
  KeyboardInterrupt for Ctrl-C) there, so every `finally` that handles Ctrl-C handles SIGTERM the same way.
  A second signal raises at once: a user who insists is not kept waiting. Every command that writes uses it
  (convert, synth, evaluate, predict, export; training finishes its step and checkpoints there).
- `raise_on_signals()`: the signal raises `Terminated` wherever the interpreter is. Simpler, but such an
  exception can land in a weakref callback, which prints and drops it (StopFlag.check says more).

`exit_on_interrupt(what, outcome)` is the one-line message and the exit status for a command's `main`.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import click

#: What batch systems and terminals send to stop a job; SIGINT (Ctrl-C) already raises KeyboardInterrupt.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A stop signal other than Ctrl-C, raised where KeyboardInterrupt would be."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signal_name(exc: BaseException) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "SIGINT (Ctrl-C)"


def exit_status(exc: BaseException) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def _raise(signum, _frame):
    raise Terminated(signum)


@contextmanager
def _handlers(handler, signals) -> Iterator[None]:
    # Handlers can only be set from the main thread; elsewhere (a test runner's thread, a library caller's
    # worker) the process keeps whatever it has.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def raise_on_signals(signals=STOP_SIGNALS) -> Iterator[None]:
    """Within the block, `signals` raise `Terminated` in the main thread, as SIGINT raises
    KeyboardInterrupt."""
    with _handlers(_raise, signals):
        yield


class StopFlag:
    """Set by the first stop signal; the second raises `Terminated`. Use as a context manager.

    repeat_after: a second signal sooner than this many seconds after the first is the same request, not a
    user insisting (torchrun forwards the SIGTERM it gets from Slurm to workers that Slurm signalled too)."""

    def __init__(self, signals=(*STOP_SIGNALS, signal.SIGUSR1), *, repeat_after: float = 0.0):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.repeat_after = float(repeat_after)
        self._first = 0.0
        self._ctx = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """What a signal does; also callable directly (tests, a time budget, another rank asking)."""
        if self.signum is None:
            self._first = time.monotonic()
        self.signum = int(signum)

    def check(self) -> None:
        """If a signal was seen, raise what `raise_on_signals` would have (KeyboardInterrupt for Ctrl-C, else
        `Terminated`), here, between two pieces of work: the converter and the generator poll this. A
        signal's exception raised wherever the interpreter happens to be can land in a weakref callback,
        where it is printed and dropped: the job then runs on until Slurm's SIGKILL (seen in 4 of 24 stops
        of a conversion with 2 workers)."""
        if self.requested:
            raise KeyboardInterrupt() if self.signum == signal.SIGINT else Terminated(self.signum)

    def _on_signal(self, signum, _frame):
        if self.requested:
            if time.monotonic() - self._first < self.repeat_after:
                return
            raise Terminated(signum)
        self.request(signum)

    def __enter__(self) -> "StopFlag":
        self._ctx = _handlers(self._on_signal, self.signals)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


class polled:
    """`items`, with `stop.check()` before each: a stop signal ends the loop between two items. Keeps the
    len() of `items` where it has one (a progress bar's total)."""

    def __init__(self, items: Iterable, stop: "StopFlag | None"):
        self.items, self.stop = items, stop

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        for item in self.items:
            if self.stop is not None:
                self.stop.check()
            yield item


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A StopFlag for Ctrl-C, SIGTERM and SIGHUP, for a command's work to poll (with exit_on_interrupt)."""
    with StopFlag((signal.SIGINT, *STOP_SIGNALS)) as stop:
        yield stop


def ignore_stop_signals(*_) -> None:
    """For worker processes (also a DataLoader worker_init_fn): Slurm signals every process of the job, but
    only the parent should react (it stops the workers and cleans up); a worker that also raised would print
    a traceback of its own, and one killed by SIGTERM or SIGUSR1 (their default) fails the parent's loader."""
    for s in (signal.SIGINT, *STOP_SIGNALS, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def exit_on_interrupt(what: str, outcome: str = "no output was written") -> Iterator[None]:
    """Around a command's work: Ctrl-C, SIGTERM and SIGHUP end it with one line on stderr and 128 + signum.

    `what` names the work, e.g. "conversion of data/top.h5"; `outcome` says what is left, which the writers
    inside must make true (temporary file, then rename)."""
    with raise_on_signals():
        try:
            yield
        except KeyboardInterrupt as exc:
            click.echo(f"Error: {what} interrupted by {signal_name(exc)}; {outcome}.", err=True)
            sys.exit(exit_status(exc))
