"""The realism report of the generator (`python -m pipeline.synth ... --report`): per-channel statistics of
Parquet files in the real schema (generated or real) beside the real data's published figures, and the
calibration of `pipeline.synth_physics` that they guided.

Calibration against the real data (docs/data.md, "The published statistics"; `report`, `--report`): 500
top jets, seed 1, now and before this calibration, beside the real figures; nonzero pixels counted at the real
figures' thresholds (track pT >= 1 GeV, also for the dz / d0 pixels; ECAL >= 0.1 GeV; HCAL >= 0.01 GeV):

    | | now | before | real |
    |---|---:|---:|---:|
    | track pixels per jet (pT >= 1 GeV; all) | 27.3; 39.7 | 20.6; 21.4 | ~27; more |
    | ECAL / HCAL nonzero pixels per jet | 260 / 781 | 112 / 425 | ~271 / ~703 |
    | ECAL / HCAL mean of nonzero (GeV) | 1.35 / 0.51 | 2.98 / 1.50 | 1.4 / 0.49 |
    | pixel layers 1-3, nonzero per jet | 35 | 26 | ~31 (0.2 %) |
    | dz / d0 std, all pixels (cm) | 0.58 / 0.40 | 0.0014 / 0.0015 | 0.47 / 0.77 |
    | dz / d0 std of nonzero, pT >= 1 GeV (cm) | 4.9 / 3.2 | 0.04 / 0.04 | 3.9 / 2.4 |
    | Parquet bytes per row | 7,064 | 4,121 | 7,791 |

  Where those figures are uncertain or inconsistent, what was trusted:
  * The impact parameters. The nonzero std of dz / d0 (3.9 / 2.4 cm on 1,024 jets, tracks >= 1 GeV) and
    the all-pixel std (0.47 / 0.77 cm on 10 jets, all tracks; another sample 0.71 / 4.25) cannot both come
    from the ~27 tracks of >= 1 GeV: those would need a nonzero std of ~11 / ~20 cm. Both are kept by putting
    the large displacements on soft tracks (pileup below 1 GeV, fragments of secondary interactions, soft
    conversion legs, drawn even when they curl up before the ECAL): the thresholded std is within 1.35x of
    the 1,024-jet figures, the all-pixel std of dz within 1.3x of 0.47 and that of d0 0.5x of 0.77 (the
    lower of the two samples; 4.25 is not aimed at).
  * Pixel layers: ~0.2 % ("inferred, less certain"), with values near 1; it bounds pileup (see
    `pipeline.synth_physics`).
  * Track pT: the mean of nonzero 16 GeV is trusted, not the std of 111 GeV or the 12 TeV maximum (the
    notebook itself calls it suspicious); ours has no such outliers (std ~28 GeV).
  * HCAL: ~28 towers per jet (703 pixels / 25) and the 0.49 GeV mean per pixel; the hadron response (0.7)
    brings the HCAL and ECAL energy per jet near the real all-pixel means (0.021 and 0.024 GeV per pixel).
  * The dz / d0 channel order follows `pipeline.layout` (dz first); the figures were matched in that order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.layout import CHANNEL_NAMES, COLUMN_ALIASES, IMAGE_SIZE, finish_stats
from pipeline.synth_physics import CH, SynthError

# docs/data.md, "The published statistics" (public notebooks on top_gun_opendata; small samples, +-30 %).
# Per channel: the threshold that notebook applied before counting (dz / d0 are counted on the pixels whose
# track pT passes it; the pixel layers had none), nonzero pixels per jet, mean / std / max of the nonzero
# values (1,024 jets), then the all-pixel mean / std (10 jets). None where no figure was published.
# pix1-3: "about 0.2 % nonzero, values near 1", inferred from the all-pixel figures (less certain).
REAL_THRESHOLDS = {"track_pt": 1.0, "dz": 1.0, "d0": 1.0, "ecal": 0.1, "hcal": 0.01,
                   "pix1": None, "pix2": None, "pix3": None}
# name: (nonzero per jet, mean nonzero, std nonzero, max nonzero, all-pixel mean, all-pixel std)
REAL_STATS = {
    "track_pt": (27.0, 16.0, 111.0, 12000.0, 0.022, 1.15),
    "dz": (27.0, 0.0, 3.9, None, 0.001, 0.47),
    "d0": (22.0, 0.0, 2.4, None, -0.001, 0.77),
    "ecal": (271.0, 1.4, 6.8, 612.0, 0.024, 0.88),
    "hcal": (703.0, 0.49, 1.2, 21.0, 0.021, 0.28),
    "pix1": (0.002 * IMAGE_SIZE ** 2, 1.0, None, None, 0.0018, 0.048),
    "pix2": (0.002 * IMAGE_SIZE ** 2, 1.0, None, None, 0.0023, 0.053),
    "pix3": (0.002 * IMAGE_SIZE ** 2, 1.0, None, None, 0.0021, 0.052),
}
REAL_BYTES_PER_ROW = 1_171_158_319 / 150_327   # top_gun_opendata_0.parquet: 7,791 B per row, footer included


def _threshold_masks(x: np.ndarray) -> np.ndarray:
    """Pixels that the real figures count, (n, 8, 125, 125) bool: values at or above each channel's threshold;
    dz / d0 where they are nonzero on a track that passes the track-pT threshold."""
    keep = x != 0
    for name, thr in REAL_THRESHOLDS.items():
        c = CH[name]
        if name in ("dz", "d0"):
            keep[:, c] &= x[:, CH["track_pt"]] >= thr
        elif thr is not None:
            keep[:, c] = x[:, c] >= thr
    return keep


def report(paths, *, max_rows: int | None = None, batch_rows: int = 64) -> dict:
    """Per-channel statistics of Parquet files in the real schema (generated or real), read whole columns at a
    time (pyarrow flatten -> numpy), never row by row.

    Returns {"rows": jets decoded, "bytes_per_row": file bytes / rows in the files, "channels": {name: {
    "threshold", "nonzero_per_jet" (at the real figure's threshold), "nonzero_per_jet_raw", "mean_nonzero",
    "std_nonzero", "max_abs_nonzero" (of the thresholded nonzero values), "mean_all", "std_all" (every pixel,
    raw), "real": the real figures (REAL_STATS, None where unknown)}}}. `max_rows` stops after that many jets
    (the bytes per row still cover the whole files)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise SynthError("no Parquet files to report on")
    n_c = len(CHANNEL_NAMES)
    count_thr, count_raw = np.zeros(n_c), np.zeros(n_c)
    s_thr, ss_thr, max_thr = np.zeros(n_c), np.zeros(n_c), np.zeros(n_c)
    s_all, ss_all = np.zeros(n_c), np.zeros(n_c)
    rows, file_rows, size = 0, 0, 0
    for path in paths:
        f = pq.ParquetFile(path)
        file_rows += f.metadata.num_rows
        size += path.stat().st_size
        column = next((c for c in COLUMN_ALIASES["X_jet"] if c in f.schema_arrow.names), None)
        if column is None:
            raise SynthError(f"{path}: no image column ({' or '.join(COLUMN_ALIASES['X_jet'])})")
        for batch in f.iter_batches(batch_size=batch_rows, columns=[column], use_threads=False):
            if max_rows is not None and rows >= max_rows:
                break
            col = batch.column(0)
            x = col.flatten().flatten().flatten().to_numpy(zero_copy_only=False)
            x = x.astype(np.float64, copy=False).reshape(len(col), n_c, IMAGE_SIZE, IMAGE_SIZE)
            if max_rows is not None:
                x = x[: max_rows - rows]
            rows += x.shape[0]
            keep = _threshold_masks(x)
            kept = np.where(keep, x, 0.0)
            count_thr += keep.sum((0, 2, 3))
            count_raw += (x != 0).sum((0, 2, 3))
            s_thr += kept.sum((0, 2, 3))
            ss_thr += (kept ** 2).sum((0, 2, 3))
            max_thr = np.maximum(max_thr, np.abs(kept).max((0, 2, 3)))
            s_all += x.sum((0, 2, 3))
            ss_all += (x ** 2).sum((0, 2, 3))
    if rows == 0:
        raise SynthError("the files hold no rows to report on")
    mean_thr, std_thr = finish_stats(count_thr, s_thr, ss_thr)
    pixels = np.full(n_c, rows * IMAGE_SIZE ** 2, dtype=np.float64)
    mean_all, std_all = finish_stats(pixels, s_all, ss_all)
    keys = ("nonzero_per_jet", "mean_nonzero", "std_nonzero", "max_abs_nonzero", "mean_all", "std_all")
    channels = {}
    for c, name in enumerate(CHANNEL_NAMES):
        channels[name] = {"threshold": REAL_THRESHOLDS[name], "nonzero_per_jet": count_thr[c] / rows,
                          "nonzero_per_jet_raw": count_raw[c] / rows, "mean_nonzero": mean_thr[c],
                          "std_nonzero": std_thr[c], "max_abs_nonzero": max_thr[c], "mean_all": mean_all[c],
                          "std_all": std_all[c], "real": dict(zip(keys, REAL_STATS[name]))}
    return {"rows": rows, "files": len(paths), "bytes_per_row": size / file_rows,
            "real_bytes_per_row": REAL_BYTES_PER_ROW, "channels": channels}


def _g(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def format_report(rep: dict) -> str:
    """The report of `report` as a Markdown table, each figure beside the real one (`real`)."""
    lines = [f"{rep['rows']} jets from {rep['files']} file(s). 'real': the top_gun_opendata figures of "
             f"docs/data.md (top jets, small samples, about +-30 %). Nonzero counts and nonzero mean/std/max "
             f"after the real figure's threshold; all-pixel mean/std raw.", "",
             "| channel | threshold | nonzero / jet | real | raw nonzero / jet | mean nonzero | real | "
             "std nonzero | real | max abs | real | all-pixel mean | real | all-pixel std | real |",
             "|---|---|" + "---:|" * 13]
    for name, ch in rep["channels"].items():
        real = ch["real"]
        thr = ch["threshold"]
        if thr is None:
            thr_text = "none"
        else:
            thr_text = f"track pT >= {thr:g}" if name in ("dz", "d0") else f">= {thr:g}"
        lines.append(f"| {name} | {thr_text} | {ch['nonzero_per_jet']:.1f} | {_g(real['nonzero_per_jet'])} | "
                     f"{ch['nonzero_per_jet_raw']:.1f} | {_g(ch['mean_nonzero'])} | "
                     f"{_g(real['mean_nonzero'])} | "
                     f"{_g(ch['std_nonzero'])} | {_g(real['std_nonzero'])} | {_g(ch['max_abs_nonzero'])} | "
                     f"{_g(real['max_abs_nonzero'])} | {_g(ch['mean_all'], 2)} | {_g(real['mean_all'], 2)} | "
                     f"{_g(ch['std_all'])} | {_g(real['std_all'])} |")
    lines += ["", f"bytes per row on disk: {rep['bytes_per_row']:.0f} (real {rep['real_bytes_per_row']:.0f})"]
    return "\n".join(lines)
