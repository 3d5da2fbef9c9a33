"""A batch job's readout per image and per frame: summary.csv, and a growth plot for each time-lapse
stack (cell count and confluence against frame or time), both made from the per-image records.

summary.csv has one row per image, and per frame of a stack, in input order:
    image            the input's output name (a stack's stem for each of its frames)
    frame            0-based frame index; empty for an image that is not a stack
    time_s           seconds since frame 0, where the stack's metadata gives the frame interval; else empty
    count            cells found
    confluence_pct   % of the image covered by cells
    median_area_px   median cell area in pixels; empty where no cell was found
    median_area_um2  the same in µm², where the record carries the image's pixel size; else empty
    plate, well, field  where the file's name places it in a plate (cellseg/series.py); else empty
    time_h           time_s in hours (elapsed since the series' start), for reading at a glance
Every column is always there, empty where unknown, so a script reads every job's table alike. A
frame's files and its rows in cells.csv are named <image>_t<frame>, zero-padded (`a_t0003`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

import numpy as np

# New columns go last, so a script that reads the older columns by position reads them still.
SUMMARY_FIELDS = ["image", "frame", "time_s", "count", "confluence_pct", "median_area_px", "median_area_um2",
                  "plate", "well", "field", "time_h"]


def summary_row(record: dict) -> dict:
    """One image's or frame's row of summary.csv (None where a value is unknown); `image` is a
    frame's stack, `frame` None for an image that is not a stack."""
    areas = [cell["area"] for cell in record.get("cells", [])]
    median_px = float(np.median(areas)) if areas else None
    return {"image": record.get("stack", record["name"]), "frame": record.get("frame"), "time_s": record.get("time_s"),
            "count": record["count"], "confluence_pct": record["confluence"], "median_area_px": median_px,
            "median_area_um2": _to_um2(median_px, record.get("pixel_size")), "plate": record.get("plate"),
            "well": record.get("well"), "field": record.get("field"),
            "time_h": None if record.get("time_s") is None else round(record["time_s"] / 3600, 4)}


def _to_um2(area_px: float | None, pixel_size: dict | None) -> float | None:
    """An area in µm², from `pixel_size` ({"x_um", "y_um", "source"}) where the record has one."""
    if area_px is None or not pixel_size:
        return None
    try:
        return round(area_px * float(pixel_size["x_um"]) * float(pixel_size["y_um"]), 4)
    except (KeyError, TypeError, ValueError):  # a pixel size that does not say: no µm² rather than a wrong one
        return None


def csv_table(rows: Iterable[dict], fields: Sequence[str], ignore_extra: bool = False) -> bytes:
    """A job's CSV table (summary.csv, wells.csv, doubling.csv, tracks.csv): `fields` as the header,
    None and missing values as empty cells; a key outside `fields` is an error unless `ignore_extra`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), lineterminator="\n",
                            extrasaction="ignore" if ignore_extra else "raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return text.getvalue().encode()


def summary_csv(rows: Iterable[dict]) -> bytes:
    """summary.csv of `summary_row`s."""
    return csv_table(rows, SUMMARY_FIELDS)


def stack_rows(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """The summary rows of each stack's frames, by stack name, in frame order."""
    stacks: dict[str, list[dict]] = {}
    for row in rows:
        if row["frame"] is not None:
            stacks.setdefault(row["image"], []).append(row)
    return {stack: sorted(frames, key=lambda row: row["frame"]) for stack, frames in stacks.items()}


def growth_plot_png(stack: str, rows: list[dict]) -> bytes:
    """Cell count (top) and confluence (bottom) of a stack's frames, against time where every frame's
    time is known (hours; minutes for a stack under two hours), else against the frame index. Drawn
    with matplotlib's Agg canvas: no display and no pyplot state, so it is safe in any thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    timed = all(row["time_s"] is not None for row in rows)
    unit, seconds = ("h", 3600) if not timed or max(row["time_s"] for row in rows) >= 7200 else ("min", 60)
    x = [row["time_s"] / seconds if timed else row["frame"] for row in rows]
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    count_ax, confluence_ax = fig.subplots(2, 1, sharex=True)
    for ax, key, label, color in ((count_ax, "count", "cells", "tab:blue"),
                                  (confluence_ax, "confluence_pct", "confluence (%)", "tab:orange")):
        values = [row[key] for row in rows]
        ax.plot(x, values, marker="o", markersize=3, color=color, clip_on=False)  # points at 0 in full
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.1 * max(values) or 1)  # from zero, so that growth is seen in proportion
        ax.grid(alpha=0.3)
    count_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    confluence_ax.set_xlabel(f"time ({unit})" if timed else "frame")
    if not timed:
        confluence_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{stack}: {len(rows)} frames" + ("" if timed else " (no frame interval in the file)"))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
