"""A plate's readout per well over time, from a batch job's summary rows (cellseg/summary.py) of
images placed in wells by their names (cellseg/series.py):

    wells.csv      one row per plate, well and time point: the fields imaged then, cell count
                   (mean, sd, min, max over fields), confluence (mean, sd), median cell area (the
                   median of the fields' medians, px and µm²)
    doubling.csv   one row per well: doubling time (h) from a log-linear fit of the mean count on
                   the exponential phase, the window used (h), the points in it, R², the interval
                   between time points, or a note saying why there is none
    plots/wells/<plate>_<well>.png   that well's growth curve (count and confluence; the fit drawn)
    plots/plate_<plate>.png           the plate at a glance: one small panel per well

The exponential phase is the stretch of consecutive time points (at least MIN_WINDOW, and at least
a quarter of the well's points, so a noisy pair of frames cannot pass for it) over which ln(count)
rises fastest while staying on a line (R² >= MIN_R2): lag and plateau fall outside it by
construction. A well where no such stretch rises is reported as never growing exponentially.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from statistics import mean, median, pstdev

import numpy as np

MIN_WINDOW = 3  # points: a line through two always fits
MIN_R2 = 0.9
SLOPE_TOLERANCE = 0.95  # windows this close to the steepest count as the same phase
WELL_FIELDS = ["plate", "well", "time_point", "time_h", "fields", "count_mean", "count_sd", "count_min", "count_max",
               "confluence_mean", "confluence_sd", "median_area_px", "median_area_um2"]
DOUBLING_FIELDS = ["plate", "well", "doubling_h", "rate_per_h", "window_start_h", "window_end_h", "window_points",
                   "r2", "time_points", "interval_h", "note"]


def well_table(rows: Iterable[dict]) -> list[dict]:
    """wells.csv's rows from summary rows that carry a well, aggregated over the fields imaged at
    the same time (the same elapsed time where known, else the same time-point index); `time_point`
    numbers a well's times from 0."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        if row.get("well"):
            when = ("s", row["time_s"]) if row.get("time_s") is not None else ("frame", row["frame"])
            groups.setdefault((row.get("plate") or "", row["well"]), {}).setdefault(when, []).append(row)
    table = []
    for (plate, well), times in groups.items():
        for index, when in enumerate(sorted(times, key=lambda w: (w[0], w[1] or 0))):
            table.append(_aggregate(plate, well, index, times[when]))
    return sorted(table, key=lambda r: (r["plate"], _well_order(r["well"]), r["time_point"]))


def _well_order(well: str) -> tuple:
    """A1, A2, ..., A10 (not A1, A10, A2)."""
    return (well[:1], int(well[1:])) if well[1:].isdigit() else (well, 0)


def _aggregate(plate: str, well: str, frame: int, fields: list[dict]) -> dict:
    counts = [r["count"] for r in fields]
    confluence = [r["confluence_pct"] for r in fields]
    times = [r["time_s"] for r in fields if r.get("time_s") is not None]
    areas_px = [r["median_area_px"] for r in fields if r.get("median_area_px") is not None]
    areas_um2 = [r["median_area_um2"] for r in fields if r.get("median_area_um2") is not None]
    return {"plate": plate, "well": well, "time_point": frame,
            "time_h": round(median(times) / 3600, 4) if times else None, "fields": len(fields),
            "count_mean": round(mean(counts), 3), "count_sd": round(pstdev(counts), 3),
            "count_min": min(counts), "count_max": max(counts),
            "confluence_mean": round(mean(confluence), 3), "confluence_sd": round(pstdev(confluence), 3),
            "median_area_px": median(areas_px) if areas_px else None,
            "median_area_um2": round(median(areas_um2), 4) if areas_um2 else None}


def by_well(table: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    wells: dict[tuple[str, str], list[dict]] = {}
    for row in table:
        wells.setdefault((row["plate"], row["well"]), []).append(row)
    return wells


def fit_doubling(times_h: Sequence[float], counts: Sequence[float]) -> dict:
    """Doubling time of the exponential phase of a growth curve (see the module's docstring):
    {doubling_h, rate_per_h, window_start_h, window_end_h, window_points, r2, note}; doubling_h None,
    with the reason in `note`, where there is no exponential phase."""
    points = sorted((t, c) for t, c in zip(times_h, counts, strict=True) if c > 0)
    empty = dict.fromkeys(("doubling_h", "rate_per_h", "window_start_h", "window_end_h", "window_points", "r2"))
    if len(points) < MIN_WINDOW:
        return empty | {"note": f"{len(points)} time point(s) with cells: at least {MIN_WINDOW} are needed for a fit"}
    t = np.array([p[0] for p in points])
    y = np.log(np.array([p[1] for p in points]))
    best = _steepest_line(t, y, max(MIN_WINDOW, math.ceil(len(points) / 4)))
    if best is None:
        return empty | {"note": f"never grew exponentially: no {max(MIN_WINDOW, math.ceil(len(points) / 4))} or more "
                                f"consecutive time points over which ln(count) rises on a line (R² >= {MIN_R2})"}
    rate, r2, i, j = best
    return {"doubling_h": round(math.log(2) / rate, 3), "rate_per_h": round(rate, 5),
            "window_start_h": round(float(t[i]), 3), "window_end_h": round(float(t[j - 1]), 3),
            "window_points": j - i, "r2": round(r2, 4), "note": ""}


def _steepest_line(t: np.ndarray, y: np.ndarray, min_points: int) -> tuple[float, float, int, int] | None:
    """(slope, R², start, stop) of the window of >= min_points consecutive points with the steepest
    rising least-squares line among those with R² >= MIN_R2; the longest such window among those
    within 5% of that slope, so that the phase is taken whole rather than its luckiest (noisiest)
    part, without bending into the lag or the plateau (which would lengthen the doubling time)."""
    fits = []
    for i in range(len(t)):
        for j in range(i + min_points, len(t) + 1):
            slope, r2 = _line(t[i:j], y[i:j])
            if slope > 0 and r2 >= MIN_R2:
                fits.append((slope, r2, i, j))
    if not fits:
        return None
    steepest = max(f[0] for f in fits)
    return max((f for f in fits if f[0] >= SLOPE_TOLERANCE * steepest), key=lambda f: (f[3] - f[2], f[0]))


def _line(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and R² of y against t."""
    if np.ptp(t) == 0:
        return 0.0, 0.0
    slope, intercept = np.polyfit(t, y, 1)
    residual = float(np.sum((y - (slope * t + intercept)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return float(slope), (1 - residual / total) if total > 0 else 0.0


def doubling_rows(table: Sequence[dict]) -> list[dict]:
    """doubling.csv's rows: one per well of `table` (wells.csv's rows)."""
    rows = []
    for (plate, well), points in by_well(table).items():
        timed = [p for p in points if p["time_h"] is not None]
        steps = np.diff(sorted(p["time_h"] for p in timed))
        base = {"plate": plate, "well": well, "time_points": len(points),
                "interval_h": round(float(np.median(steps)), 4) if len(steps) else None}
        if len(timed) < len(points):
            fit = dict.fromkeys(DOUBLING_FIELDS[2:8]) | {
                "note": "time points not timed: their names give no time; give --interval"}
        else:
            fit = fit_doubling([p["time_h"] for p in timed], [p["count_mean"] for p in timed])
        rows.append(base | fit)
    return rows
