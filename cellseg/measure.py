"""Per-cell measurements of a label image, every cell at once.

The same numbers as scikit-image's `regionprops` (area, centroid, bbox, perimeter, eccentricity,
axis lengths, orientation, solidity, mean intensity), computed for all cells together instead of one
Python object per cell: one pass over the image finds every cell's horizontal runs (`CellRuns`),
whose closed-form sums give areas, boxes and moments exactly; the perimeter's neighbourhood codes
come from the border pixels' neighbours, and convex hulls (OpenCV or SciPy) from the runs' end
pixels, their pixels counted for all cells at once.
`tests/test_measure.py` checks every column against `regionprops`, on real images too.
regionprops spent 5.6 s of a 16-image batch job measuring cells, more than the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# skimage.measure.perimeter's weights for the codes 1 (border pixel) + 2 x 4-neighbours +
# 10 x diagonal neighbours that are border pixels of the same cell (Benkrid & Crookes).
PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2


def perimeters(labels: np.ndarray, count: int) -> np.ndarray:
    """skimage's 4-connectivity perimeter of every cell 1..count (index 0 unused): per border pixel
    (a 4-neighbour outside its cell), the code 1 + 2 x its 4-neighbours and 10 x its diagonal
    neighbours that are border pixels of the same cell, weighted by PERIMETER_WEIGHTS."""
    padded = np.pad(labels, 1)
    width = padded.shape[1]
    flat = padded.ravel()
    # contiguous comparisons with the 4 neighbours first, gathers only around the border pixels
    differs = np.zeros(padded.shape, dtype=bool)
    differs[1:-1, 1:-1] = ((padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
                           | (padded[1:-1, 1:-1] != padded[1:-1, :-2]) | (padded[1:-1, 1:-1] != padded[1:-1, 2:]))
    border = np.flatnonzero(differs.ravel() & (flat > 0))
    four = np.array([-width, width, -1, 1])
    diagonal = np.array([-width - 1, -width + 1, width - 1, width + 1])
    own = flat[border]
    border_map = np.zeros(flat.shape, dtype=bool)
    border_map[border] = True
    code = np.ones(len(border), dtype=np.int64)
    for weight, offsets in ((2, four), (10, diagonal)):
        neighbours = border[:, None] + offsets
        code += weight * ((flat[neighbours] == own[:, None]) & border_map[neighbours]).sum(axis=1)
    return np.bincount(own, PERIMETER_WEIGHTS[code], count + 1)


@dataclass(frozen=True)
class CellRuns:
    """Every horizontal run of a cell's pixels (label, row, first column, column after the last),
    sorted by label, then row: the whole image in a few thousand numbers, from which areas, boxes,
    moments and hull points of every cell follow exactly. Cell k's runs are
    [bounds[k - 1], bounds[k]) for k in 1..count (none for a label that is absent)."""

    label: np.ndarray
    row: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    bounds: np.ndarray

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def present(self) -> np.ndarray:
        """Boolean per label 0..count: the label has pixels (0, the background, never)."""
        return np.r_[False, self.bounds[1:] > self.bounds[:-1]]

    def per_cell_sum(self, values: np.ndarray) -> np.ndarray:
        """Exact int64 sum of a per-run value for every label 0..count (0 where absent)."""
        totals = np.r_[0, np.cumsum(values, dtype=np.int64)]
        return np.r_[0, totals[self.bounds[1:]] - totals[self.bounds[:-1]]]

    def areas(self) -> np.ndarray:
        return self.per_cell_sum(self.stop - self.start)

    def boxes(self) -> tuple[np.ndarray, ...]:
        """(y0, x0, y1, x1) per label 0..count, end-exclusive as skimage's bbox (0 where absent)."""
        boxes = [np.zeros(self.count + 1, dtype=np.int64) for _ in range(4)]
        present = np.flatnonzero(self.present())
        if len(present):
            first, last = self.bounds[present - 1], self.bounds[present] - 1
            boxes[0][present], boxes[2][present] = self.row[first], self.row[last] + 1  # rows are in order
            boxes[1][present] = np.minimum.reduceat(self.start, first)
            boxes[3][present] = np.maximum.reduceat(self.stop, first)
        return tuple(boxes)

    def _column_sums(self) -> np.ndarray:
        """Per run, the sum of its columns a..b-1 (closed form)."""
        return (self.start + self.stop - 1) * (self.stop - self.start) // 2

    def moments(self) -> tuple[np.ndarray, ...]:
        """Per label 0..count, the sums over its pixels of row, row², row x column, column and
        column², as exact int64: closed forms of each run's column sums (c and c² over a..b-1)."""
        length = self.stop - self.start
        col_sum = self._column_sums()
        col_squares = _square_sum(self.stop - 1) - _square_sum(self.start - 1)
        row = self.row
        return (self.per_cell_sum(row * length), self.per_cell_sum(row * row * length),
                self.per_cell_sum(row * col_sum), self.per_cell_sum(col_sum), self.per_cell_sum(col_squares))

    def centroids(self, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) means per label 0..count of cells with these `areas` (NaN where absent)."""
        row_sums = self.per_cell_sum(self.row * (self.stop - self.start))
        with np.errstate(invalid="ignore", divide="ignore"):
            return row_sums / areas, self.per_cell_sum(self._column_sums()) / areas


def _square_sum(n: np.ndarray) -> np.ndarray:
    """0² + 1² + ... + n² (0 for n = -1)."""
    return n * (n + 1) * (2 * n + 1) // 6


def cell_runs(labels: np.ndarray, count: int | None = None) -> CellRuns:
    """The runs of every cell 1..count (default: the largest label) of a label image."""
    labels = np.asarray(labels)
    if count is None:
        count = int(labels.max(initial=0))
    width = labels.shape[1]
    padded = np.pad(labels, ((0, 0), (1, 1)))
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])  # a change between image columns x-1 and x
    # every change starts a run of the value after it (a cell's where that value is not 0), which
    # ends at the next change: always in the same row, since each row's padding ends it with a 0
    value = padded[rows, cols + 1]
    is_start = (cols < width) & (value > 0)
    nxt = np.r_[cols[1:], 0]
    label, row, start, stop = value[is_start], rows[is_start], cols[is_start], nxt[is_start]
    order = np.argsort(label, kind="stable")  # by cell, each cell's runs kept in row order
    label = label[order].astype(np.int64)
    bounds = np.searchsorted(label, np.arange(1, count + 2))
    return CellRuns(label, row[order].astype(np.int64), start[order].astype(np.int64),
                    stop[order].astype(np.int64), bounds.astype(np.int64))


def convex_hull_function() -> Callable[[np.ndarray], np.ndarray]:
    """(k, 2) int32 points -> the hull's vertices in order. OpenCV's where it is installed (the
    training and batch install: ~15 us a cell), else SciPy's qhull (the serving image: ~80 us a
    cell). Both give the same vertices, exact on these integer points; tests run both."""
    try:
        import cv2
    except ImportError:
        from scipy.spatial import ConvexHull

        return lambda points: points[ConvexHull(points.astype(np.float64)).vertices]
    return lambda points: cv2.convexHull(points).reshape(-1, 2)


def _hull_edges(runs: CellRuns) -> tuple[np.ndarray, ...]:
    """Every cell's convex hull as edges (cell, x, y, ex, ey) in doubled coordinates, counter-clockwise
    in (x, y): the hull of its pixels' edge midpoints (x = 2 col +- 1, y = 2 row +- 1), as skimage's
    `convex_hull_image` builds it, from the first and last pixel of each run (every other pixel lies
    between two of them in its row). Integers, so the counting below is exact."""
    count = runs.count
    # each run's first and last pixel, then the 4 edge midpoints of each: 8 points per run, still
    # grouped by cell, so cell k's points start at 8 x its first run
    row = np.repeat(runs.row, 2)
    col = np.stack([runs.start, runs.stop - 1], axis=1).ravel()
    diamond = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int32)
    points = (np.stack([2 * col, 2 * row], axis=1).astype(np.int32)[:, None, :] + diamond[None]).reshape(-1, 2)
    bounds = (8 * runs.bounds).tolist()
    hull = convex_hull_function()
    present, vertices = [], []
    for index in range(1, count + 1):  # only the hull itself is computed per cell
        start, stop = bounds[index - 1], bounds[index]
        if start != stop:
            present.append(index)
            vertices.append(hull(points[start:stop]))
    cell = np.repeat(present, [len(v) for v in vertices])
    v = np.concatenate(vertices).astype(np.int64)
    # the next vertex of the same hull (wrapping around)
    first = np.r_[0, np.flatnonzero(np.diff(cell)) + 1]
    nxt = np.arange(1, len(cell) + 1)
    nxt[np.r_[first[1:], len(cell)] - 1] = first
    return cell, v[:, 0], v[:, 1], v[nxt, 0] - v[:, 0], v[nxt, 1] - v[:, 1]


def convex_areas(labels: np.ndarray, count: int, runs: CellRuns | None = None) -> np.ndarray:
    """Pixels of every cell's convex hull, as `regionprops(...).area_convex` counts them: pixel
    centres inside or on the hull. For every cell, every pixel row it spans and every hull edge, the
    edge bounds the row's x-interval from one side; the interval's even x are the pixel centres."""
    cell, x, y, ex, ey = _hull_edges(runs if runs is not None else cell_runs(labels, count))
    keep = (ex != 0) | (ey != 0)
    cell, x, y, ex, ey = cell[keep], x[keep], y[keep], ex[keep], ey[keep]
    areas = np.zeros(count + 1, dtype=np.int64)
    cells, edge_start, edges_per_cell = np.unique(cell, return_index=True, return_counts=True)
    y_min = np.minimum.reduceat(y, edge_start)
    y_max = np.maximum.reduceat(y, edge_start)
    first_row = y_min + (y_min % 2)  # even doubled y = a pixel row
    rows_per_cell = (y_max - first_row) // 2 + 1
    # One (row, edge) pair per edge of a cell for each of its rows, grouped by row.
    row_owner = np.repeat(np.arange(len(cells)), rows_per_cell)
    row_y = first_row[row_owner] + 2 * (np.arange(len(row_owner)) - np.repeat(np.cumsum(rows_per_cell) - rows_per_cell,
                                                                               rows_per_cell))
    pairs_per_row = edges_per_cell[row_owner]
    pair_row = np.repeat(np.arange(len(row_owner)), pairs_per_row)
    pair_edge = edge_start[row_owner][pair_row] + (
        np.arange(len(pair_row)) - np.repeat(np.cumsum(pairs_per_row) - pairs_per_row, pairs_per_row))
    # Inside <=> on the interior side of every edge: sign * cross(edge, P - vertex) >= 0, the sign
    # being the hull's winding (its signed area), i.e. a * X <= rhs for the row's Y.
    winding = np.sign(np.bincount(np.searchsorted(cells, cell), x * ey - y * ex, len(cells))).astype(np.int64)
    sign = winding[row_owner][pair_row]
    a = sign * ey[pair_edge]
    rhs = sign * (ex[pair_edge] * (row_y[pair_row] - y[pair_edge]) + ey[pair_edge] * x[pair_edge])
    big = np.int64(1) << 40
    upper = np.where(a > 0, np.floor_divide(rhs, np.where(a > 0, a, 1)), big)  # X <= floor(rhs / a)
    lower = np.where(a < 0, -np.floor_divide(rhs, np.where(a < 0, -a, 1)), -big)  # X >= ceil(rhs / a), a < 0
    upper = np.where((a == 0) & (rhs < 0), -big, upper)  # an edge along the row's direction it lies outside of
    starts = np.r_[0, np.cumsum(pairs_per_row)[:-1]]
    lo = np.maximum.reduceat(lower, starts)
    hi = np.minimum.reduceat(upper, starts)
    first, last = lo + (lo % 2), hi - (hi % 2)
    per_row = np.maximum(0, (last - first) // 2 + 1)
    areas[cells] = np.bincount(row_owner, per_row, len(cells)).astype(np.int64)
    return areas


def _n_times_minus_product(n: np.ndarray, s: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """n * s - u * v, exactly: int64 where it cannot overflow, Python integers for the rest."""
    safe = np.abs(n.astype(np.float64) * s) + np.abs(u.astype(np.float64) * v) < 2.0**62
    if safe.all():
        return n * s - u * v
    out = (n * s - u * v).astype(object)
    for i in np.flatnonzero(~safe):  # cells of millions of pixels only
        out[i] = int(n[i]) * int(s[i]) - int(u[i]) * int(v[i])
    return out


def measure_cells(labels: np.ndarray, image: np.ndarray | None = None, runs: CellRuns | None = None) -> list[dict]:
    """Measurements of every cell 1..N that is present (pixel units), for the CSV and the web page;
    `runs`: the labels' `cell_runs`, where found already."""
    labels = np.ascontiguousarray(labels)
    runs = runs if runs is not None else cell_runs(labels)
    count = runs.count
    if count == 0:
        return []
    area = runs.areas()
    present = runs.present()
    y0, x0, y1, x1 = runs.boxes()
    sr, srr, src, sc, scc = runs.moments()
    # n x central moments, exact integers: translation-invariant, so taken in each cell's box
    # coordinates (small numbers) and tie-exact (a round cell's two axes compare equal).
    r_local, c_local = sr - area * y0, sc - area * x0
    d_rr = _n_times_minus_product(area, srr - 2 * y0 * sr + area * y0 * y0, r_local, r_local)
    d_cc = _n_times_minus_product(area, scc - 2 * x0 * sc + area * x0 * x0, c_local, c_local)
    d_rc = _n_times_minus_product(area, src - y0 * sc - x0 * sr + area * y0 * x0, r_local, c_local)
    n = area.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # skimage's inertia tensor [[a, b], [b, c]] = [[mu02, -mu11], [-mu11, mu20]] / mu00
        # (b = -(mu11 / mu00) as skimage has it, so that mu11 = 0 gives -0.0 and the same atan2 branch)
        a, b, c_ = d_cc.astype(np.float64) / (n * n), -(d_rc.astype(np.float64) / (n * n)), d_rr.astype(np.float64) / (n * n)
        half_sum, root = (a + c_) / 2, np.sqrt(((a - c_) / 2) ** 2 + b * b)
        l1, l2 = np.clip(half_sum + root, 0, None), np.clip(half_sum - root, 0, None)
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / np.where(l1 == 0, 1, l1), 0, None)))
        orientation = np.where(d_cc == d_rr, np.where(b < 0, math.pi / 4, -math.pi / 4), 0.5 * np.arctan2(-2 * b, c_ - a))
        centroid_y, centroid_x = sr / n, sc / n
    perimeter = perimeters(labels, count)
    solidity = area / np.maximum(convex_areas(labels, count, runs), 1)
    mean_intensity = np.bincount(labels.ravel(), np.asarray(image, np.float64).ravel(), count + 1) / np.maximum(area, 1) \
        if image is not None else None
    ids = np.flatnonzero(present)
    # (name, values of the present cells, decimals or None for integers): converted to Python numbers
    # a column at a time; rounded with Python's round, as regionprops' values were
    columns = [("cell_id", ids, None), ("area", area[ids], None),
               ("centroid_x", centroid_x[ids], 2), ("centroid_y", centroid_y[ids], 2),
               ("bbox_x", x0[ids], None), ("bbox_y", y0[ids], None),
               ("bbox_width", (x1 - x0)[ids], None), ("bbox_height", (y1 - y0)[ids], None),
               ("perimeter", perimeter[ids], 2), ("eccentricity", eccentricity[ids], 4),
               ("major_axis_length", 4 * np.sqrt(l1[ids]), 2), ("minor_axis_length", 4 * np.sqrt(l2[ids]), 2),
               ("solidity", solidity[ids], 4), ("orientation", orientation[ids], 4)]
    if mean_intensity is not None:
        columns.append(("mean_intensity", mean_intensity[ids], 3))
    names = [name for name, _, _ in columns]
    values = [values.tolist() if decimals is None else [round(v, decimals) for v in values.astype(np.float64).tolist()]
              for _, values, decimals in columns]
    return [dict(zip(names, row)) for row in zip(*values)]
