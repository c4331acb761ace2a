"""Benchmark pipeline.convert against the original write-up's method and the decode-only ceiling.

Usage: python benchmarks/bench_convert.py [--rows 4096] [--rounds 5] [--workdir data/bench] [--no-profile]

On a generated `top` file (pipeline.synth, one row per row group, as the real files) of --rows rows, in one
run:
  original   the write-up's method, corrected to read every row group: `read_row_groups` of 8 row groups,
             `to_pandas()`, then per row `np.stack` of channels 0-3 and `.astype(np.float16)`, the copies kept
             in a list (it writes nothing, which only flatters it)
  ceiling    `read_row_groups` of the image column for the same chunks of 8 row groups, nothing else: decoding
             the nested doubles is the floor of this job (Parquet cannot skip the unused channels)
  convert    `pipeline.convert.convert` (channels 0-3, --cuts top: every row kept) at chunk sizes 1, 8, 64
             with its default 2 reader threads, and at chunk size 8 with 1 thread and with 2 worker processes
Every measurement runs in a fresh process (so that its peak RSS is its own) and the methods take turns for
--rounds rounds; the best round of each is reported (the machine may be shared), with the CPU seconds used
(user + sys, workers included), which load disturbs less, and the spread of the per-round ratio of convert
chunk 8 to the ceiling (the two run within a minute of each other in every round). Peak RSS is measured
again on an input twice as large: two files of --rows rows, and one file of 2 x --rows rows. Then a profile
of where the converter's time goes beyond decoding.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import convert as C  # noqa: E402
from pipeline import parquet as Q  # noqa: E402
from pipeline import synth  # noqa: E402

CHANNELS = (0, 1, 2, 3)   # the write-up's first four channels


# ----------------------------------------------------------------------------------------------------------
# The methods (each runs in its own process: `--child`)
# ----------------------------------------------------------------------------------------------------------

def _files(path: str) -> list[str]:
    p = Path(path)
    return sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]


def original(path: str, chunk: int = 8) -> int:
    """The write-up's method: pandas per chunk, a per-row np.stack, float16 copies kept."""
    images, masses = [], []
    for name in _files(path):
        pf = pq.ParquetFile(name)
        groups = pf.metadata.num_row_groups
        for start in range(0, groups, chunk):
            df = pf.read_row_groups(range(start, min(start + chunk, groups))).to_pandas()
            for x, m in zip(df["X_jet"], df["m"]):
                images.append(np.stack([np.stack(x[c]) for c in CHANNELS]).astype(np.float16))
                masses.append(m)
    return len(images)


def ceiling(path: str, chunk: int = 8) -> int:
    """Decoding only: the image column of every chunk, nothing done with it."""
    rows = 0
    for name in _files(path):
        pf = pq.ParquetFile(name)
        groups = pf.metadata.num_row_groups
        for start in range(0, groups, chunk):
            rows += pf.read_row_groups(range(start, min(start + chunk, groups)), columns=["X_jet"]).num_rows
    return rows


def ours(path: str, chunk: int = 8, workers: int = 1, threads: int = 2, out: str = "") -> int:
    summary = C.convert(C.ConvertConfig([path], out, channels=CHANNELS, cuts="top", chunk_size=chunk,
                                        threads=threads, workers=workers, force=True, progress=False))
    return summary.rows_kept


def _status_kb(pid: int | str, field: str) -> int:
    """A memory field of /proc/PID/status in kB (VmHWM: peak RSS of this process image, VmRSS: now). Unlike
    getrusage's ru_maxrss it is not inherited across fork + exec from a bigger parent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Every process below pid (the forkserver's workers are its children, not ours)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid] + _descendants(kid)
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime


def _watch(record: dict, stop: threading.Event) -> None:
    """Every 50 ms: the summed RSS of all descendant processes (peak kept), and each one's CPU seconds (the
    last value seen before it exits: at most 50 ms of it is missed)."""
    me = os.getpid()
    while not stop.wait(0.05):
        kids = _descendants(me)
        record["rss_kb"] = max(record["rss_kb"], sum(_status_kb(k, "VmRSS") for k in kids))
        record["n"] = max(record["n"], len(kids))
        for k in kids:
            record["cpu"][k] = max(record["cpu"].get(k, 0.0), _cpu_seconds(k))


def _child(method: str, path: str, chunk: int, workers: int, threads: int, out: str) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record, stop = {"rss_kb": 0, "n": 0, "cpu": {}}, threading.Event()
    watcher = threading.Thread(target=_watch, args=(record, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    rows = {"original": original, "ceiling": ceiling}[method](path, chunk) if method != "convert" \
        else ours(path, chunk, workers, threads, out)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime + sum(record["cpu"].values())
    print(json.dumps({"rows": rows, "seconds": seconds, "cpu": cpu,
                      "rss_mb": _status_kb("self", "VmHWM") / 1024,
                      "helpers_rss_mb": record["rss_kb"] / 1024, "helpers": record["n"]}))


def measure(method: str, path: Path, chunk: int = 8, workers: int = 1, threads: int = 2,
            out: Path | None = None) -> dict:
    if out is not None:
        out.unlink(missing_ok=True)   # replacing a 500 MB file takes ~0.4 s of the kernel's time: not ours
    cmd = [sys.executable, __file__, "--child", method, str(path), "--chunk", str(chunk),
           "--workers", str(workers), "--threads", str(threads), "--out", str(out or "")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# Profile: where the time beyond decoding goes, and the float16 casts compared
# ----------------------------------------------------------------------------------------------------------

def profile(path: Path, rows: int) -> list[str]:
    """CPU time per row of each stage of the converter's chunk loop (chunk size 8, channels 0-3, one thread,
    pyarrow's threads off as in the converter), then the float64 -> float16 cast of the same dense 4-channel
    block done four ways."""
    import h5py
    import torch

    torch.set_num_threads(1)
    src = Q.inspect_file(path)
    rows = min(rows, src.num_rows)
    pf = pq.ParquetFile(str(path))
    kept = np.arange(rows)
    stages: dict[str, float] = {}
    casts: dict[str, float] = {}
    mismatches = 0

    def tick(name, t, into=stages):
        into[name] = into.get(name, 0.0) + time.process_time() - t

    with h5py.File(path.parent / "profile.h5", "w") as h5:
        images = h5.create_dataset("images", (rows, len(CHANNELS), 125, 125), np.float16)
        offset = 0
        for _, chunk in Q.file_chunks(src, kept, np.ones(rows, bool), 8, CHANNELS, False):
            t = time.process_time()
            table = pf.read_row_groups(chunk.groups.tolist(), columns=["X_jet"], use_threads=False)
            tick("decode (read_row_groups)", t)
            t = time.process_time()
            flat = Q.flat_images(table.column(0), str(path), "X_jet", chunk.table_rows)
            raw = flat.reshape(-1, 8, Q.PIXELS)
            tick("checks + flat numpy view", t)
            result = Q.DecodedChunk(len(raw))
            result.n_train = len(raw)
            result.sums, result.sumsqs, result.maxes = np.zeros(4), np.zeros(4), np.zeros(4)
            for j, c in enumerate(CHANNELS):
                t = time.process_time()
                positions, values = Q.round_channel(raw[:, c])
                tick("find nonzeros + round them", t)
                t = time.process_time()
                Q.bad_values(values, positions, raw[:, c])
                tick("range check", t)
                t = time.process_time()
                Q.add_stats(result, j, values, positions, np.ones(len(raw), bool))
                tick("statistics", t)
                result.parts.append((positions, values))
            t = time.process_time()
            images[offset:offset + len(raw)] = result.dense()
            offset += len(raw)
            tick("densify + HDF5 write", t)
            # the alternatives, on the dense (n, 4, 15625) block of the same chunk
            block = raw[:, list(CHANNELS)]
            t = time.process_time()
            exact = block.astype(np.float16)
            tick("numpy float64 -> float16 (exact, scalar loop)", t, casts)
            t = time.process_time()
            block.astype(np.float32).astype(np.float16)
            tick("numpy float64 -> float32 -> float16", t, casts)
            t = time.process_time()
            fast = torch.from_numpy(np.ascontiguousarray(block)).to(torch.float16).numpy()
            tick("torch float64 -> float16 (F16C, via float32)", t, casts)
            mismatches += int((fast.view(np.uint16) != exact.view(np.uint16)).sum())
    (path.parent / "profile.h5").unlink()
    nonzero = float(np.count_nonzero(raw[:, list(CHANNELS)]) / raw[:, list(CHANNELS)].size)
    lines = [f"Profile, CPU ms per row, chunk size 8, channels 0-3, {rows} rows "
             f"({100 * nonzero:.2f} % of their pixels nonzero in the last chunk):"]
    total = sum(stages.values())
    for name, sec in stages.items():
        lines.append(f"  {name:48s} {1e3 * sec / rows:7.3f}  ({100 * sec / total:4.1f} %)")
    lines.append(f"  {'total':48s} {1e3 * total / rows:7.3f}")
    lines.append("The float16 cast of the whole dense block, for comparison (what the sparse path avoids):")
    for name, sec in casts.items():
        lines.append(f"  {name:48s} {1e3 * sec / rows:7.3f}")
    lines.append(f"  torch's double rounding differs from numpy's exact cast in {mismatches} of "
                 f"{rows * len(CHANNELS) * Q.PIXELS:,} values")
    return lines


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------

def generated(workdir: Path, rows: int) -> Path:
    """A top file of `rows` rows, one row per row group; kept in workdir for the next run."""
    config = synth.SynthConfig(process="top", rows=rows, files=1, seed=1)
    out = workdir / f"top_{rows}"
    stamp = out / "synth_config.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(vars(config)))):
        print(f"generating {rows} rows into {out} ...", flush=True)
        synth.generate(out, config, force=True, progress=True)
    return out / synth.file_name("top", 0)


# name -> (method, chunk size, worker processes, reader threads)
RUNS = {"original": ("original", 8, 1, 1), "ceiling": ("ceiling", 8, 1, 1),
        "convert chunk 1": ("convert", 1, 1, 2), "convert chunk 8": ("convert", 8, 1, 2),
        "convert chunk 64": ("convert", 64, 1, 2), "convert chunk 8, 1 thread": ("convert", 8, 1, 1),
        "convert chunk 8, 2 workers": ("convert", 8, 2, 1)}
SHORT = dict(zip(["original", "ceiling", "chunk1", "chunk8", "chunk64", "thread1", "workers2"], RUNS))


def report(rows: int, rounds: int, best: dict, cpu_best: dict, double: dict, double_long: dict,
           per_round: dict) -> list[str]:
    """The table and the ratios against the targets."""
    lines = [f"bench_convert: {rows} rows (top, one row per row group, channels 0-3), best of {rounds} "
             f"rounds, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
             "(rows/s: best round; CPU ms/row: CPU seconds of all processes (workers included), least of the "
             "rounds; cores: CPU / wall of the best round; peak RSS: the process + the processes below it "
             "(forkserver and workers) at their peak together)",
             f"| method | rows/s | x original | x ceiling | CPU ms/row | cores | peak RSS MB: 1 file of "
             f"{rows} rows | 2 files of {rows} | 1 file of {2 * rows} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    orig = best.get("original", {}).get("rows_per_s", np.nan)
    ceil = best.get("ceiling", {}).get("rows_per_s", np.nan)

    def rss(m, name):
        if m is None:
            return ""
        return f"{m['rss_mb']:.0f}" + (f" + {m['helpers_rss_mb']:.0f}" if RUNS[name][2] > 1 else "")

    for name, m in best.items():
        lines.append(f"| {name} | {m['rows_per_s']:.1f} | {m['rows_per_s'] / orig:.2f} | "
                     f"{m['rows_per_s'] / ceil:.2f} | {1e3 * cpu_best[name] / m['rows']:.2f} | "
                     f"{m['cpu'] / m['seconds']:.2f} | {rss(m, name)} | {rss(double.get(name), name)} | "
                     f"{rss(double_long.get(name), name)} |")

    def ratio(a: str, b: str, target: str = "") -> None:
        """a / b twice: best round over best round, and the median of the per-round ratios. The machine's
        speed can change by 1.5x within minutes; two methods of the same round ran at most a minute apart,
        so the paired median is the steadier figure."""
        if a not in best or b not in best:
            return
        pairs = np.array(per_round[a]) / np.array(per_round[b])
        lines.append(f"{a} / {b}: {best[a]['rows_per_s'] / best[b]['rows_per_s']:.2f}x best over best, "
                     f"{np.median(pairs):.2f}x median of the rounds ({', '.join(f'{r:.2f}' for r in pairs)})"
                     + (f"; target >= {target}" if target else ""))

    if "convert chunk 8" in best:
        lines.append("")
        ratio("convert chunk 8", "original", "1.5")
        ratio("convert chunk 8", "ceiling", "0.75")
        ratio("convert chunk 8", "convert chunk 8, 1 thread")
        ratio("convert chunk 8, 2 workers", "convert chunk 8, 1 thread", "1.5 (2 workers over 1 thread)")
        ratio("convert chunk 8, 2 workers", "convert chunk 8")
        per_row = {k: cpu_best[k] / best[k]["rows"] for k in best}
        if "original" in per_row and "ceiling" in per_row:
            ours = per_row["convert chunk 8"]
            lines.append(f"CPU per row: the original method uses {per_row['original'] / ours:.2f}x what "
                         f"convert chunk 8 does, which uses {ours / per_row['ceiling']:.2f}x the ceiling's")

    def total(m):
        return m["rss_mb"] + m["helpers_rss_mb"]

    for label, runs2 in (("2 files", double), (f"1 file of {2 * rows} rows", double_long)):
        if runs2:
            lines.append(f"peak RSS, 2x input ({label}) / 1x input: " +
                         ", ".join(f"{k} {total(runs2[k]) / total(best[k]):.2f}" for k in runs2 if k in best))
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rows", type=int, default=4096, show_default=True, help="Rows of the generated file.")
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Rounds of turns; the best of each method and the per-round ratios are reported.")
@click.option("--workdir", type=click.Path(path_type=Path), default=ROOT / "data" / "bench",
              show_default=True)
@click.option("--only", "only", multiple=True, type=click.Choice(list(SHORT)),
              help="Run only these (repeatable); default all.")
@click.option("--rss/--no-rss", "do_rss", default=True, show_default=True, help="The 2x-input RSS runs.")
@click.option("--profile/--no-profile", "do_profile", default=True, show_default=True)
@click.option("--child", hidden=True, default=None)
@click.argument("child_path", required=False)
@click.option("--chunk", type=int, default=8, hidden=True)
@click.option("--workers", type=int, default=1, hidden=True)
@click.option("--threads", type=int, default=2, hidden=True)
@click.option("--out", default="", hidden=True)
def main(rows, rounds, workdir, only, do_rss, do_profile, child, child_path, chunk, workers, threads, out):
    if child:
        _child(child, child_path, chunk, workers, threads, out)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    one = generated(workdir, rows)
    out = workdir / "bench_out.h5"
    names = [SHORT[k] for k in only] if only else list(RUNS)
    best: dict[str, dict] = {}
    cpu_best: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:     # a different order each round
            m = measure(RUNS[name][0], one, *RUNS[name][1:], out)
            m["rows_per_s"] = m["rows"] / m["seconds"]
            print(f"round {r + 1} {name:28s} {m['rows_per_s']:8.1f} rows/s  cpu {m['cpu']:6.1f} s  "
                  f"rss {m['rss_mb']:6.0f} + {m['helpers_rss_mb']:4.0f} MB", flush=True)
            if name not in best or m["rows_per_s"] > best[name]["rows_per_s"]:
                best[name] = m
            cpu_best[name] = min(cpu_best.get(name, np.inf), m["cpu"])
            per_round.setdefault(name, []).append(m["rows_per_s"])
    double, double_long = {}, {}
    if do_rss:
        # twice the input as the real data grows, in files (two of --rows rows), and as one file of twice the
        # rows (whose footer, parsed whole by pyarrow, is twice as large too: ~6 kB of RSS per row group)
        long = generated(workdir, 2 * rows)
        pair = workdir / f"top_{rows}x2"
        pair.mkdir(exist_ok=True)
        for i in range(2):
            if not (pair / synth.file_name("top", i)).exists():
                shutil.copyfile(one, pair / synth.file_name("top", i))
        doubled = [n for n in ("original", "ceiling", "convert chunk 8", "convert chunk 8, 2 workers")
                   if n in names]
        double = {name: measure(RUNS[name][0], pair, *RUNS[name][1:], out) for name in doubled}
        double_long = {name: measure(RUNS[name][0], long, *RUNS[name][1:], out) for name in doubled}
    out.unlink(missing_ok=True)
    print()
    print("\n".join(report(rows, rounds, best, cpu_best, double, double_long, per_round)))
    if do_profile:
        print()
        print("\n".join(profile(one, min(rows, 1024))))


if __name__ == "__main__":
    main()
