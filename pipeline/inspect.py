"""Show what an HDF5 file written by `pipeline.convert` holds: an `h5ls -r`-like tree, then splits and stats.

Usage: python -m pipeline.inspect FILE.h5

For machines without `h5ls` (the demo uses it there). Each object: its path, Group or Dataset with shape and
dtype (plus layout for /images), and its attributes (long values shortened).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import h5py
import numpy as np

from pipeline import layout
from pipeline.cli import command, user_errors
from pipeline.errors import UserError


class InspectError(UserError):
    """The file cannot be read as HDF5; one line."""


def _short(value, width: int = 100) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _tree(f: h5py.File) -> list[str]:
    lines = [f"{'/':24s} Group"] + [f"    @{k} = {_short(v)}" for k, v in f.attrs.items()]

    def visit(name: str, obj) -> None:
        path = "/" + name
        if isinstance(obj, h5py.Dataset):
            shape = "SCALAR" if obj.shape == () else ", ".join(map(str, obj.shape))
            line = f"{path:24s} Dataset {{{shape}}} {obj.dtype}"
            if obj.ndim == 4:
                filters = obj.id.get_create_plist().get_nfilters()
                line += f" contiguous={obj.chunks is None} filters={filters} offset={obj.id.get_offset()}"
            lines.append(line)
        else:
            lines.append(f"{path:24s} Group")
        lines.extend(f"    @{k} = {_short(v)}" for k, v in obj.attrs.items())

    f.visititems(visit)
    return lines


def describe(path) -> str:
    """The text `python -m pipeline.inspect` prints."""
    path = Path(path)
    with layout.open_checked(path, InspectError) as f:
        lines = _tree(f)
        if "split" in f:
            lines.append("")
            lines.append("splits: " + ", ".join(f"{s}: {f['split'][s].shape[0]}" for s in layout.SPLITS
                                                if s in f["split"]))
        if "stats" in f and "images" in f:
            stats = {k: v[()] for k, v in f["stats"].items()}
            names = [str(n) for n in f["images"].attrs.get("channels", [])]
            lines.append(f"stats over {int(stats.get('n_train', 0))} train rows:")
            lines.append(f"  {'channel':10s} {'channel_mean':>14s} {'channel_std':>14s} {'channel_max':>14s} "
                         f"{'reference_scale':>16s}")
            for i, name in enumerate(names):
                row = [stats.get(k, np.full(len(names), np.nan))[i]
                       for k in ("channel_mean", "channel_std", "channel_max", "reference_scale")]
                lines.append(f"  {name:10s} {row[0]:14.6g} {row[1]:14.6g} {row[2]:14.6g} {row[3]:16.6g}")
            labels = sorted(k[: -len("_mean")] for k in stats if k.endswith("_mean") and k != "channel_mean")
            for label in labels:
                low, high = stats.get(label + "_min", np.nan), stats.get(label + "_max", np.nan)
                mean, std = stats[label + "_mean"], stats[label + "_std"]
                lines.append(f"  {label:10s} mean {mean:.6g}  std {std:.6g}  min {low:.6g}  max {high:.6g}")
        if "source_files" in f.attrs:
            files = json.loads(f.attrs["source_files"])
            lines.append("sources: " + ", ".join(f"{e['name']} ({e['rows_kept']}/{e['rows_read']} rows kept)"
                                                 for e in files))
    return "\n".join(lines)


@command()
@click.argument("path", metavar="FILE.h5")
def main(path):
    """Print the tree (path, shape, dtype, attributes), split sizes and statistics of FILE.h5."""
    with user_errors():
        click.echo(describe(path))


if __name__ == "__main__":
    main()
