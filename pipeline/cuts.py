"""Cuts and pass 1 of the converter: the presets, the `--cut` grammar and the scan of the scalar columns.

`CUT_PRESETS`, `Cut`, `parse_cut` / `CUT_SYNTAX`, `resolve_cuts` (presets and --cut against the files'
columns) and `scan_file` (read one file's scalar columns, apply the cuts -> `Scan`); `rows_passing` puts the
three together for one file (what `massreg.predict` keeps of a raw Parquet file). It sits above
`pipeline.parquet`, the only converter file it imports, and below `pipeline.convert`, which runs pass 1 (here
or in the worker pool).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import layout
from pipeline.parquet import (ConvertError, Source, cached_parquet, inspect_file, read_row_groups,
                              scalar_values)

# Cut presets. `paper` is the A -> gamma gamma paper's kinematic selection used by the original write-up
# (and therefore our default); `top` is the generated range of the top-quark data set.
CUT_PRESETS = {
    "paper": ("20 <= pt <= 100", "0 <= m <= 1.6", "|eta| < 1.4"),
    "top": ("85 <= m <= 500", "400 <= pt <= 1000"),
    "none": (),
}


@dataclass(frozen=True)
class Cut:
    """A range cut `lo <(=) column <(=) hi` on a scalar column or its absolute value."""
    text: str
    column: str
    absolute: bool = False
    lo: float = -math.inf
    hi: float = math.inf
    lo_inclusive: bool = True
    hi_inclusive: bool = True
    source: str = "--cut"   # the preset it comes from, or "--cut"

    def passes(self, values: np.ndarray) -> np.ndarray:
        x = np.abs(values) if self.absolute else values
        ok = (x >= self.lo) if self.lo_inclusive else (x > self.lo)
        return ok & ((x <= self.hi) if self.hi_inclusive else (x < self.hi))


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"
_COL = r"\|\s*(?P<abs1>[A-Za-z_]\w*)\s*\||abs\(\s*(?P<abs2>[A-Za-z_]\w*)\s*\)|(?P<plain>[A-Za-z_]\w*)"
_CUT_LT = re.compile(rf"^\s*(?:(?P<lo>{_NUM})\s*(?P<lop><=|<)\s*)?(?:{_COL})"
                     rf"\s*(?:(?P<hop><=|<)\s*(?P<hi>{_NUM}))?\s*$")
_CUT_GT = re.compile(rf"^\s*(?:{_COL})\s*(?P<op>>=|>)\s*(?P<lo>{_NUM})\s*$")
CUT_SYNTAX = ("'LO <= COL <= HI', 'COL < HI', 'COL >= LO', '|COL| < HI' or 'abs(COL) < HI' "
              "(< and <= allowed on either side)")


def parse_cut(text: str, source: str = "--cut") -> Cut:
    """'20 <= pt <= 100', '|eta| < 1.4', 'm > 0' ... -> Cut; ConvertError for anything else."""
    for pattern in (_CUT_LT, _CUT_GT):
        match = pattern.match(text)
        if match is None:
            continue
        g = match.groupdict()
        column = g["abs1"] or g["abs2"] or g["plain"]
        absolute = column != g["plain"]
        if pattern is _CUT_GT:
            cut = Cut(text, column, absolute, lo=float(g["lo"]), lo_inclusive=g["op"] == ">=", source=source)
        else:
            if g["lo"] is None and g["hi"] is None:
                break
            cut = Cut(text, column, absolute,
                      lo=float(g["lo"]) if g["lo"] is not None else -math.inf,
                      hi=float(g["hi"]) if g["hi"] is not None else math.inf,
                      lo_inclusive=g["lop"] != "<", hi_inclusive=g["hop"] != "<", source=source)
        if cut.lo > cut.hi:
            raise ConvertError(f"cut {text!r} selects nothing (lower bound above upper bound)")
        return cut
    raise ConvertError(f"cannot read cut {text!r}: write it as {CUT_SYNTAX}")


# ----------------------------------------------------------------------------------------------------------
# Pass 1: scalars, cuts, split
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """Pass 1's result for one file (or the part of it in this shard)."""
    rows_read: int
    rows: np.ndarray                  # (n_kept,) int64 source rows kept
    labels: dict[str, np.ndarray]     # canonical -> (n_kept,) float64
    failed: dict[str, int]            # cut text -> rows failing
    observed: dict[str, tuple[float, float]]   # cut text -> (min, max) of what it looked at


def scan_file(src: Source, lo: int, hi: int, cuts: list[Cut]) -> Scan:
    """Read the scalar columns of row groups [lo, hi) of one file and apply the cuts (`resolve_cuts`'s, whose
    columns are canonical names). ConvertError for a null, NaN or inf in any scalar column."""
    first, last = int(src.group_starts[lo]), int(src.group_starts[hi])
    rows = np.arange(first, last, dtype=np.int64)
    values = {}
    if hi > lo:
        table = read_row_groups(cached_parquet(src.path), src.path, np.arange(lo, hi),
                                list(src.scalars.values()))
        for canon, source in src.scalars.items():
            values[canon] = scalar_values(table.column(source), src.path, source, rows)
    else:
        values = {canon: np.zeros(0) for canon in src.scalars}
    keep = np.ones(len(rows), bool)
    failed, observed = {}, {}
    for cut in cuts:
        x = values[cut.column]
        ok = cut.passes(x)
        failed[cut.text] = int((~ok).sum())
        if x.size:
            seen = np.abs(x) if cut.absolute else x
            observed[cut.text] = (float(seen.min()), float(seen.max()))
        keep &= ok
    return Scan(len(rows), rows[keep], {k: v[keep] for k, v in values.items()}, failed, observed)


def resolve_cuts(preset: str, extra_cuts: Sequence[str], sources: list[Source]
                 ) -> tuple[list[Cut], list[Cut]]:
    """(cuts to apply, preset cuts skipped because the files lack their column), against the columns of
    the first of `sources` (the converter checks that every file has the same). The cuts to apply name the
    canonical column (`m` for a cut on `am`); an explicit --cut on a missing column is a ConvertError naming
    the file and the columns present."""
    if preset not in CUT_PRESETS:
        raise ConvertError(f"unknown cut preset {preset!r}: use one of {', '.join(CUT_PRESETS)}")
    cuts = [parse_cut(t, preset) for t in CUT_PRESETS[preset]]
    cuts += [parse_cut(t) for t in extra_cuts]
    aliases = {a: canon for canon, names in layout.COLUMN_ALIASES.items() for a in names}
    present = sources[0].scalars if sources else {}
    apply, skipped = [], []
    for cut in cuts:
        column = aliases.get(cut.column, cut.column)
        if column not in present:
            if cut.source != "--cut":
                skipped.append(cut)
                continue
            raise ConvertError(f"cut {cut.text!r}: column {cut.column} is not in {sources[0].path}; "
                               f"columns present: {', '.join(present)}")
        apply.append(Cut(cut.text, column, cut.absolute, cut.lo, cut.hi, cut.lo_inclusive, cut.hi_inclusive,
                         cut.source))
    return apply, skipped


def rows_passing(path: str | os.PathLike, preset: str, extra_cuts: Sequence[str]
                 ) -> tuple[np.ndarray | None, list[Cut]]:
    """The rows of one Parquet file that the converter would keep with `--cuts preset` and `--cut` texts
    `extra_cuts`: (sorted int64 row numbers, preset cuts skipped because the file lacks their column), the
    rows being None when no cut applies (every row is kept; nothing is read beyond the footer).

    The converter's own code: `inspect_file` (footer), `resolve_cuts` (preset "none" has no cut; an explicit
    cut on a missing column is a ConvertError naming the file and its columns) and `scan_file` (the scalar
    columns only, no image; a null, NaN or inf in one is a ConvertError naming the row)."""
    try:
        src = inspect_file(Path(path))
        cuts, skipped = resolve_cuts(preset, extra_cuts, [src])
        if not cuts:
            return None, skipped
        return scan_file(src, 0, src.num_groups, cuts).rows, skipped
    finally:
        cached_parquet.cache_clear()    # as `read_parquet_chunks`: a file rewritten later is read anew
