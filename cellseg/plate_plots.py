"""Growth curves of wells (cellseg/wells.py's tables) as PNGs: one per well, and a plate overview of
small multiples. Drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _x(points: Sequence[dict]) -> tuple[list[float], str]:
    """Hours where every time point is timed, else the time-point index."""
    if all(p["time_h"] is not None for p in points):
        return [p["time_h"] for p in points], "time (h)"
    return [p["time_point"] for p in points], "time point"


def _draw_counts(ax, points: Sequence[dict], fit: dict, small: bool = False) -> None:
    x, _ = _x(points)
    counts = np.array([p["count_mean"] for p in points])
    spread = np.array([p["count_sd"] for p in points])
    ax.plot(x, counts, marker="o", markersize=2 if small else 3, color="tab:blue", clip_on=False)
    if any(p["fields"] > 1 for p in points):  # the spread over fields, where there is one
        ax.fill_between(x, counts - spread, counts + spread, color="tab:blue", alpha=0.2, linewidth=0)
    if fit.get("doubling_h"):  # the fitted exponential over the window it was fitted on
        window = [(t, c) for t, c in zip(x, counts, strict=True) if fit["window_start_h"] <= t <= fit["window_end_h"]]
        t0, c0 = window[0]
        tt = np.linspace(fit["window_start_h"], fit["window_end_h"], 20)
        ax.plot(tt, c0 * np.exp(fit["rate_per_h"] * (tt - t0)), color="tab:red", linewidth=1.5,
                label=f"doubling {fit['doubling_h']:.1f} h")
    ax.set_ylim(0, 1.1 * max(counts.max() + spread.max(), 1))
    ax.grid(alpha=0.3)


def well_png(plate: str, well: str, points: Sequence[dict], fit: dict) -> bytes:
    """Count (mean ± sd over fields, the fit in red) and confluence of one well over time."""
    fig = _figure(8, 5.5)
    count_ax, confluence_ax = fig.subplots(2, 1, sharex=True)
    _draw_counts(count_ax, points, fit)
    count_ax.set_ylabel("cells (mean over fields)")
    if fit.get("doubling_h"):
        count_ax.legend(loc="upper left")
    x, label = _x(points)
    confluence_ax.plot(x, [p["confluence_mean"] for p in points], marker="o", markersize=3, color="tab:orange")
    confluence_ax.set_ylabel("confluence (%)")
    confluence_ax.set_ylim(0, 100)
    confluence_ax.set_xlabel(label)
    confluence_ax.grid(alpha=0.3)
    note = f"doubling {fit['doubling_h']:.1f} h" if fit.get("doubling_h") else (fit.get("note") or "")[:90]
    fig.suptitle(f"{plate} {well}: {len(points)} time points\n{note}".strip(), fontsize=10)
    return _png(fig)


def plate_png(plate: str, wells: dict[str, Sequence[dict]], fits: dict[str, dict]) -> bytes:
    """Small multiples: each well's count curve in its own panel, same y scale, the doubling time in
    the title ('-' where the well never grew exponentially)."""
    names = list(wells)
    columns = min(6, len(names))
    rows = math.ceil(len(names) / columns)
    fig = _figure(2.2 * columns + 0.5, 1.8 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for ax, well in zip(axes, names, strict=False):
        fit = fits.get(well, {})
        _draw_counts(ax, wells[well], fit, small=True)
        ax.set_title(f"{well}  " + (f"{fit['doubling_h']:.1f} h" if fit.get("doubling_h") else "–"), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    top = max(max(p["count_mean"] + p["count_sd"] for p in points) for points in wells.values())
    axes[0].set_ylim(0, 1.1 * max(top, 1))
    fig.suptitle(f"plate {plate or '(unnamed)'}: cells per well over time (mean ± sd over fields; "
                 "title: doubling time)", fontsize=9)
    return _png(fig)
