"""The training loop against the model alone, and cold-cache reads in row against block order.

    python benchmarks/bench_train.py                                   # tiny, batch 64, 4 channels, CPU
    python benchmarks/bench_train.py --device cuda --preset seed --bf16 --batch-size 256
    python benchmarks/bench_train.py --only cold --rows 16000          # cold-cache read rates only

Loop: massreg.trainer.train_epoch (lr schedule, loss, backward, grad clipping, the non-finite check,
optimizer step) fed three ways, on the same model, optimizer, device, batch and precision:
  model-only  one batch, prepared on the device once (flipped, normalised, aux encoded) and fed again and
              again: the speed of the model and optimizer alone, the ceiling of the loop
  loop        the trainer's input side: H5Images + ThreadReader (--workers 0) or WorkerReader (--workers N;
              a list such as 0,2 times each) + DevicePrefetcher (reused buffers, flips and normalisation on
              the device), --shuffle's order
  old loop    the input side before issue 8: make_loader, numpy flips on the host, then (as engine.forward
              did) the whole-batch normaliser (Normalizer._batched: the former forward) on fresh tensors
Rounds of --steps steps alternate (the order rotated each round), so the load of a shared machine falls on all
alike; the loop keeps one epoch's iterator across its rounds (steady state, as in training). Printed: the
median samples/s of each and the median of the per-round ratios against model-only.

Cold: the file is evicted from the page cache (fsync, then posix_fadvise(POSIX_FADV_DONTNEED), which needs
no root; the memmaps are closed first, since mapped pages are not evicted), then --cold-batches batches are
read by the ThreadReader in row order, evicted again, read in block order; rounds alternate which goes first.
Printed: rows/s of each, the per-round ratios, and how random a batch still is: the mean distance between
two rows of a batch relative to row order, for this file's train split and for the real data's size.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import HostFlips, build_file, warm_page_cache  # noqa: E402

from massreg.dataset import H5Images  # noqa: E402
from massreg.distributed import Dist  # noqa: E402
from massreg.optim import make_optimizer  # noqa: E402
from massreg.prefetch import DevicePrefetcher, ThreadReader, WorkerReader  # noqa: E402
from massreg.recipes import build_config  # noqa: E402
from massreg.registry import build_model, model_config  # noqa: E402
from massreg.sampling import BLOCK_ROWS, WINDOW_BLOCKS, EpochBatches, epoch_order, make_loader  # noqa: E402
from massreg.trainer import RunData, RunState, train_epoch  # noqa: E402
from massreg.transforms import AuxScaler, Normalizer, TargetScaler, encode_aux  # noqa: E402

AUX = ("pt", "ieta", "iphi")
REAL_TRAIN_ROWS = 735_000        # ~70 % of the real data's 1.05 M rows


@dataclass
class BenchConfig:
    preset: str = "tiny"
    device: str = "cpu"
    bf16: bool = False
    compile: bool = False
    batch_size: int = 64
    channels: int = 4
    rows: int = 6000              # rows of the generated file (loop); --cold uses max(rows, cold_rows)
    cold_rows: int = 32000        # 4 GB at 4 channels: a round reads 1,280 rows, ~4 % of the file
    rounds: int = 5
    steps: int = 20               # steps per timed round
    warmup: int = 3
    workers: tuple = (0,)         # loops to time: 0: ThreadReader; N: WorkerReader with N processes
    shuffle: str = "row"
    flips: bool = True
    aux: bool = True
    old: bool = True              # also time the input side before issue 8
    threads: int = 0
    cold_batches: int = 20
    only: str = "all"             # all | loop | cold
    file: str | None = None
    seed: int = 0


class _StreamFeed:
    """The trainer's feed (DevicePrefetcher's interface), each epoch the next n batches of one stream."""

    def __init__(self, stream, n: int):
        self.stream, self.n = stream, n

    def epoch(self, sampler, epoch):
        def batches():               # a generator: the trainer closes it; that leaves the stream open
            yield from itertools.islice(self.stream, self.n)
        return batches()


class _NoStop:
    """StepGate's interface: no signal, no timed checkpoint."""

    def poll(self) -> tuple[bool, bool]:
        return False, False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_loop(c: BenchConfig, path: str) -> dict:
    """samples/s of train_one_epoch fed by the model-only batch, the loop and the old loop; round ratios."""
    device = torch.device(c.device)
    aux_names = AUX if c.aux else ()
    train = H5Images(path, "train", aux=aux_names)
    stats = train.stats
    norm = Normalizer.from_stats(stats, "reference", train.channels).to(device)
    aux_scaler = AuxScaler.from_stats(stats, aux_names) if aux_names else None
    target = TargetScaler.from_stats(stats)
    tc = build_config(data=(path,), model=c.preset, batch_size=c.batch_size, device=c.device, amp=c.bf16,
                      flips=c.flips, aux=c.aux, shuffle=c.shuffle)
    torch.manual_seed(c.seed)
    model = build_model(model_config(c.preset, channels=len(train.channels), num_aux=len(aux_names)))
    model = model.to(device)
    opt = make_optimizer(tc, model)
    run = torch.compile(model) if c.compile else model
    d = Dist(device=device)
    feeds = {}
    for w in c.workers:
        ds = H5Images(path, "train", aux=aux_names)
        reader = WorkerReader(ds, workers=w) if w else ThreadReader(ds, pin=device.type == "cuda")
        feeds["loop" if w == 0 else f"loop, {w} workers"] = DevicePrefetcher(
            reader, device, normalizer=norm, aux_scaler=aux_scaler, flip_seed=c.seed if c.flips else None)

    def epochs(make):                     # an endless stream of batches, epoch after epoch
        for epoch in itertools.count():
            it = make(epoch)
            try:
                yield from it
            finally:
                if hasattr(it, "close"):
                    it.close()

    sampler = lambda e: EpochBatches(len(train), c.batch_size, order=c.shuffle, seed=c.seed, epoch=e)  # noqa
    one = next(iter(feeds.values()))
    first = one.epoch(sampler(10_000), 10_000)          # an epoch the loops do not reach
    fixed = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in next(first).items()}
    first.close()                                       # one epoch of a reader at a time
    streams = {"model-only": itertools.repeat(fixed)}
    for name, feed in feeds.items():
        streams[name] = epochs(lambda e, feed=feed: feed.epoch(sampler(e), e))
    if c.old:
        host = HostFlips(path, "train", aux=aux_names, seed=c.seed) if c.flips else H5Images(
            path, "train", aux=aux_names)

        def old_batches(epoch):   # as engine.forward did it: the whole-batch normaliser, fresh tensors
            host.epoch = epoch
            for b in make_loader(host, batch_size=c.batch_size, shuffle=True, seed=c.seed, epoch=epoch):
                aux = (encode_aux(aux_scaler, b["aux"].to(device, non_blocking=True))
                       if aux_scaler is not None else None)
                yield {"x": norm.batched(b["images"].to(device, non_blocking=True), None, None, None),
                       "aux_z": aux, "m": b["m"], "index": b["index"]}
        streams["old loop"] = epochs(old_batches)
    names = list(streams)

    cpu = {name: [] for name in names}             # samples per CPU-second of this process (its threads)

    def run_steps(name: str, n: int) -> float:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        # The trainer's own epoch function, its "epoch" being the next n batches of the stream.
        data = RunData(train_set=train, fit_set=range(n * c.batch_size), val_set=train, info=[], stats=stats,
                       channels=train.channels, aux_names=aux_names, normalizer=norm, target=target,
                       aux_scaler=aux_scaler)
        state = RunState(config=tc, d=d, data=data, mcfg=None, raw_model=model, model=run, eval_model=run,
                         optimizer=opt, steps_per_epoch=n, val_loader=None,
                         feed=_StreamFeed(streams[name], n), epoch=0, step=0, best={}, history=[])
        train_epoch(state, _NoStop())
        _sync(device)
        cpu[name].append(n * c.batch_size / max(time.process_time() - c0, 1e-9))
        return time.perf_counter() - t0

    def run_input(name: str, n: int) -> float:     # the input side alone: batches ready on the device
        _sync(device)
        t0 = time.perf_counter()
        for _ in itertools.islice(streams[name], n):
            pass
        _sync(device)
        return time.perf_counter() - t0

    for name in names:
        run_steps(name, c.warmup)
    rates = {name: [] for name in names}
    inputs = {name: [] for name in names[1:]}
    for r in range(c.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(c.batch_size * c.steps / run_steps(name, c.steps))
            if name in inputs:
                inputs[name].append(c.batch_size * c.steps / run_input(name, c.steps))
    for s in streams.values():
        if hasattr(s, "close"):
            s.close()
    for feed in feeds.values():
        feed.close()
    ratios = {name: [a / b for a, b in zip(rates[name], rates["model-only"])] for name in names}
    # CPU time: a process descheduled by other users accrues none, so on a shared machine these ratios are
    # steadier; worker processes' CPU is not counted (their lines say so).
    cpu_ratios = {name: statistics.median(a / b for a, b in zip(cpu[name][1:],
                                                                cpu["model-only"][1:]))
                  for name in names if "workers" not in name}
    return {"rates": rates, "ratios": ratios, "input_rates": inputs, "cpu_ratio": cpu_ratios,
            "input_median": {n: statistics.median(v) for n, v in inputs.items()},
            "median": {n: statistics.median(v) for n, v in rates.items()},
            "median_ratio": {n: statistics.median(v) for n, v in ratios.items()}}


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (no root needed; only unmapped, clean pages go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_rate(path: str, order: str, c: BenchConfig, epoch: int) -> float:
    """rows/s of the ThreadReader reading --cold-batches batches in `order` from a cold page cache."""
    ds = H5Images(path, "train")
    gc.collect()
    evict(path)
    reader = ThreadReader(ds)
    sampler = EpochBatches(len(ds), c.batch_size, order=order, seed=c.seed, epoch=epoch)
    t0, rows = time.perf_counter(), 0
    it = reader.batches(sampler)
    for batch in itertools.islice(it, c.cold_batches):
        rows += len(batch["index"])
        reader.release(batch["slot"])
    seconds = time.perf_counter() - t0
    it.close()
    ds._maps = None                      # unmap, so that the next eviction can drop every page
    return rows / seconds


def spread(n: int, batch_size: int, order: str, seed: int = 0, batches: int = 200) -> tuple[float, float]:
    """How random a batch is: the mean |i - j| over the pairs of positions in a batch, and the number of
    distinct BLOCK_ROWS-row blocks it draws from; averaged over the first `batches` batches."""
    pos = epoch_order(n, order=order, seed=seed, epoch=0)
    dist, blocks = [], []
    for k in range(min(batches, n // batch_size)):
        b = np.sort(pos[k * batch_size:(k + 1) * batch_size]).astype(np.float64)
        i = np.arange(len(b))
        dist.append(np.sum(b * (2 * i - len(b) + 1)) / (len(b) * (len(b) - 1) / 2))  # sum_(i<j) b_j - b_i
        blocks.append(len(np.unique(b // BLOCK_ROWS)))
    return float(np.mean(dist)), float(np.mean(blocks))


def bench_cold(c: BenchConfig, path: str) -> dict:
    rates = {"row": [], "block": []}
    for r in range(c.rounds):
        for order in (("row", "block") if r % 2 == 0 else ("block", "row")):
            rates[order].append(read_rate(path, order, c, epoch=r))
    ratios = [b / a for a, b in zip(rates["row"], rates["block"])]
    n = len(H5Images(path, "train"))
    randomness = {}
    for size in (n, REAL_TRAIN_ROWS):
        (db, bb), (dr, br) = spread(size, c.batch_size, "block"), spread(size, c.batch_size, "row")
        randomness[f"{size} rows"] = {"distance_vs_row": db / dr, "blocks": bb, "blocks_row_order": br}
    return {"rates": rates, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "median": {k: statistics.median(v) for k, v in rates.items()}, "spread_vs_row": randomness}


def report(c: BenchConfig, out: dict) -> str:
    dev = torch.cuda.get_device_name() if c.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"device: {dev}; torch {torch.__version__}; preset {c.preset}, batch {c.batch_size}, "
             f"{c.channels} channels, bf16={c.bf16} compile={c.compile} flips={c.flips} aux={c.aux} "
             f"shuffle={c.shuffle}; load average {os.getloadavg()[0]:.1f}"]
    if "loop" in out:
        lp = out["loop"]
        lines.append(f"{'method':<17} {'samples/s':>10} {'x model-only':>13} {'cpu-time x':>10}  rounds "
                     f"(x model-only), {c.rounds} x {c.steps} steps")
        for name, rate in lp["median"].items():
            cpu = lp["cpu_ratio"].get(name)
            lines.append(f"{name:<17} {rate:>10.1f} {lp['median_ratio'][name]:>13.3f} "
                         f"{'-' if cpu is None else format(cpu, '.3f'):>10}  "
                         + ", ".join(f"{x:.2f}" for x in lp["ratios"][name]))
        lines.append("the input side alone (batches prepared on the device, no model), samples/s:")
        for name, rate in lp["input_median"].items():
            lines.append(f"  {name:<15} median {rate:>9.0f}  rounds "
                         + ", ".join(f"{x:.0f}" for x in lp["input_rates"][name]))
    if "cold" in out:
        cd = out["cold"]
        lines.append(f"cold page cache, {c.cold_batches} batches of {c.batch_size} per round, "
                     f"{out['cold_file_gb']:.2f} GB file: rows/s")
        for order in ("row", "block"):
            lines.append(f"  {order:<6} median {cd['median'][order]:>9.1f}  rounds "
                         + ", ".join(f"{x:.0f}" for x in cd["rates"][order]))
        lines.append(f"  block / row: median {cd['median_ratio']:.2f}, rounds "
                     + ", ".join(f"{x:.2f}" for x in cd["ratios"]))
        lines.append(f"  how random a batch is in block order (blocks of {BLOCK_ROWS} rows, windows of "
                     f"{WINDOW_BLOCKS} blocks) against row order:")
        for k, v in cd["spread_vs_row"].items():
            lines.append(f"    {k}: mean distance of two rows x{v['distance_vs_row']:.3f}; distinct blocks a "
                         f"batch draws from {v['blocks']:.1f} (row order {v['blocks_row_order']:.1f})")
    return "\n".join(lines)


def ensure_file(path: str | None, rows: int, channels: int, tmpdir: str, seed: int) -> str:
    path = path or os.path.join(tmpdir, f"bench_train_{rows}x{channels}.h5")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        build_file(path, rows, channels, density=0.05, seed=seed)
        print(f"built {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return path


@click.command()
@click.option("--preset", default=BenchConfig.preset, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA).")
@click.option("--compile", "compile_", is_flag=True)
@click.option("--batch-size", default=BenchConfig.batch_size, show_default=True)
@click.option("--channels", default=BenchConfig.channels, show_default=True)
@click.option("--rows", default=BenchConfig.rows, show_default=True, help="Rows of the file for the loop.")
@click.option("--cold-rows", default=BenchConfig.cold_rows, show_default=True,
              help="Rows of the file for the cold-cache reads.")
@click.option("--rounds", default=BenchConfig.rounds, show_default=True)
@click.option("--steps", default=BenchConfig.steps, show_default=True, help="Steps per round.")
@click.option("--warmup", default=BenchConfig.warmup, show_default=True)
@click.option("--workers", default="0", show_default=True,
              help="Loops to time, comma-separated: 0 reader threads, N worker processes.")
@click.option("--shuffle", type=click.Choice(["row", "block"]), default="row", show_default=True)
@click.option("--flips/--no-flips", default=True, show_default=True)
@click.option("--aux/--no-aux", default=True, show_default=True)
@click.option("--old/--no-old", default=True, show_default=True, help="Also time the pre-issue-8 loop.")
@click.option("--threads", default=0, help="torch.set_num_threads; 0: torch's choice.")
@click.option("--cold-batches", default=BenchConfig.cold_batches, show_default=True)
@click.option("--only", type=click.Choice(["all", "loop", "cold"]), default="all", show_default=True)
@click.option("--dir", "directory", default=None, help="Keep the generated files here (default: a temp dir).")
@click.option("--json", "json_path", default=None, help="Also write the results here.")
def main(preset, device, bf16, compile_, batch_size, channels, rows, cold_rows, rounds, steps, warmup,
         workers, shuffle, flips, aux, old, threads, cold_batches, only, directory, json_path):
    """Training loop / model-only samples/s, and cold-cache rows/s of row and block order."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda but torch sees no CUDA device")
    if bf16 and device != "cuda":
        raise click.ClickException("--bf16 needs --device cuda")
    c = BenchConfig(preset=preset, device=device, bf16=bf16, compile=compile_, batch_size=batch_size,
                    channels=channels, rows=rows, cold_rows=cold_rows, rounds=rounds, steps=steps,
                    warmup=warmup, workers=tuple(int(w) for w in workers.split(",")), shuffle=shuffle,
                    flips=flips, aux=aux, old=old,
                    threads=threads, cold_batches=cold_batches, only=only)
    if threads:
        torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_") if directory is None else None
    where = directory or tmp.name
    os.makedirs(where, exist_ok=True)
    out = {"config": asdict(c), "torch": torch.__version__}
    try:
        if only in ("all", "loop"):
            path = ensure_file(None, rows, channels, where, c.seed)
            warm_page_cache(path)
            out["loop"] = bench_loop(c, path)
        if only in ("all", "cold"):
            path = ensure_file(None, max(rows, cold_rows), channels, where, c.seed)
            out["cold_file_gb"] = os.path.getsize(path) / 1e9
            out["cold"] = bench_cold(c, path)
    finally:
        if tmp is not None:
            tmp.cleanup()
    click.echo(report(c, out))
    click.echo("command: " + " ".join(shlex.quote(a) for a in ["python"] + sys.argv))
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
