"""A per-cell filter learned from a lab's annotations: drops the cells its annotators would not draw.

On astrocytes about two thirds of the cells the shipped model cuts match no annotated cell (pieces of
an over-split cell, cells the annotators left out, debris). Whether a cut cell is one the lab would
annotate shows in what the maps and its shape say about it (how sure the foreground is, how high its
distance peak, whether it sits inside a larger blob...), and a logistic regression over those few
numbers, fitted on a lab's own images (`train.cell_rules`), tells them apart well enough to pay:
unseen astrocytes mSA +9..16% over the base's cells in a probe, more with the merge rule before it
(docs/metrics_notes.md, issue 29).

Serving needs only numpy and scipy: the features below and the stored coefficients. The filter rides in the
model's post-processing parameters (`PostprocessParams.cell_filter`), so every path that cuts cells
from maps (service, batch, Dask, napari, evaluation) applies the same one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage as ndi

# The per-cell numbers the filter weighs, in this order (a stored filter names them: a model fitted on
# another list is refused rather than misread).
FEATURES = ("log_area", "foreground_mean", "boundary_mean", "distance_max", "distance_mean",
            "ring_foreground", "ring_boundary", "ring_cells", "elongation", "extent", "on_image_border")
RING_WIDTH = 2  # px around a cell where its surroundings are read
BLOCK_ROWS = 256  # image rows per pass over the cells' pixels: the gathered arrays stay small on any image


def _maxima_of(ids: np.ndarray, count: int, values: list[np.ndarray]) -> list[np.ndarray]:
    """Per label 1..count, the maximum of each 1-D array of `values` over the positions where `ids`
    (1-D, labels >= 1) holds it, 0 for a label with none: one stable sort serves them all."""
    # Any order within a label would do; 16-bit keys get numpy's radix sort (2.5x a 32-bit sort).
    keys = ids.astype(np.uint16) if count < 2**16 else ids
    order = np.argsort(keys, kind="stable")
    wanted = np.arange(1, count + 1, dtype=keys.dtype)
    sorted_ids = keys[order]
    starts, ends = np.searchsorted(sorted_ids, wanted), np.searchsorted(sorted_ids, wanted, side="right")
    present = ends > starts
    # reduceat over [start, end) pairs; the odd (between-cell) results are dropped. One padding value
    # keeps an end at the array's length a valid index.
    bounds = np.stack([starts[present], ends[present]], axis=1).ravel()
    maxima = []
    for value in values:
        result = np.zeros(count)
        if len(bounds):
            result[present] = np.maximum.reduceat(np.append(value[order], value.dtype.type(0)), bounds)[::2]
        maxima.append(result)
    return maxima


def label_maxima(labels: np.ndarray, count: int, *values: np.ndarray) -> list[np.ndarray]:
    """Per cell 1..count, the maximum of each of `values` (images the shape of `labels`) over its
    pixels, 0 where a label has none. The same numbers as scipy's ndimage.maximum, which sorts the
    whole image once per call; here the cells' pixels alone are sorted, once for all `values`."""
    inside = np.flatnonzero(labels)
    return _maxima_of(labels.ravel()[inside], count, [v.ravel()[inside] for v in values])


def square_extreme(labels: np.ndarray, size: int, extreme: np.ufunc) -> np.ndarray:
    """scipy.ndimage.maximum_filter / minimum_filter of a label image (labels >= 0) with a size x size
    square (`extreme`: np.maximum / np.minimum), the same numbers (pixels outside the image are
    ignored, which scipy's reflecting border amounts to), by in-place shifted passes over 16-bit
    labels where they fit: 3-5x faster than scipy (0.9 vs 2.9 ms, 5 x 5 on a 704 x 520 image)."""
    radius = size // 2
    fits = labels.size and labels.min() >= 0 and labels.max() < 2**16
    result = labels.astype(np.uint16) if fits else labels.copy()
    for axis in (0, 1):
        source = result.copy()
        for shift in range(1, radius + 1):
            ahead, behind = [slice(None)] * 2, [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            extreme(result[tuple(behind)], source[tuple(ahead)], out=result[tuple(behind)])
            extreme(result[tuple(ahead)], source[tuple(behind)], out=result[tuple(ahead)])
    return result.astype(labels.dtype, copy=False)


# Per-cell sums cell_features gathers in one pass: pixel count, the three maps, coordinate moments.
CELL_SUMS = ("pixels", "foreground", "boundary", "distance", "y", "x", "yy", "xx", "xy")
RING_SUMS = ("pixels", "foreground", "boundary", "cells")


def cell_sums(labels: np.ndarray, count: int, probs: np.ndarray | None = None,
              ring_owner: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CELL_SUMS x (count + 1), RING_SUMS x (count + 1), distance maximum (count,)) over the pixels of
    cells 1..count, and of each cell's ring (`ring_owner`: the label a ring pixel belongs to, 0 off
    rings), a block of rows at a time. Only labelled pixels are gathered (cells cover 8-55% of a
    validation image) and every gathered array is a block's size, so the cost follows the cells'
    area and the memory stays small on the largest images served. Without `probs` the map sums (and
    the ring) are zero."""
    sums, ring_sums, peak = np.zeros((len(CELL_SUMS), count + 1)), np.zeros((len(RING_SUMS), count + 1)), np.zeros(count)
    width = labels.shape[1]
    for top in range(0, labels.shape[0], BLOCK_ROWS):
        rows = slice(top, top + BLOCK_ROWS)
        block = labels[rows].ravel()
        inside = np.flatnonzero(block)
        ids = block[inside]
        ys, xs = np.divmod(inside, width)
        ys, xs = (ys + top).astype(np.float64), xs.astype(np.float64)
        weights: list[np.ndarray | None] = [None, None, None, None, ys, xs, ys * ys, xs * xs, ys * xs]
        if probs is not None:
            maps = [probs[k, rows].ravel()[inside] for k in range(3)]
            weights[1:4] = maps
            peak = np.maximum(peak, _maxima_of(ids, count, [maps[2]])[0])
        for i, w in enumerate(weights):
            if w is not None or i == 0:
                sums[i] += np.bincount(ids, weights=w, minlength=count + 1)
        if probs is not None and ring_owner is not None:
            owners = ring_owner[rows].ravel()
            ring = np.flatnonzero(owners)
            owner = owners[ring]
            ring_weights = (None, probs[0, rows].ravel()[ring], probs[1, rows].ravel()[ring],
                            (block[ring] > 0).astype(np.float64))
            for i, w in enumerate(ring_weights):
                ring_sums[i] += np.bincount(owner, weights=w, minlength=count + 1)
    return sums, ring_sums, peak


def moments_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(var y, var x, cov xy) of each cell 1..count from cell_sums' first array."""
    n, sy, sx, syy, sxx, sxy = (sums[CELL_SUMS.index(k), 1:] for k in ("pixels", "y", "x", "yy", "xx", "xy"))
    n = np.maximum(n, 1)
    my, mx = sy / n, sx / n
    return syy / n - my**2, sxx / n - mx**2, sxy / n - my * mx


def second_moments(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(var y, var x, cov xy) of each cell 1..count's pixel coordinates."""
    return moments_from_sums(cell_sums(labels, count)[0])


def cell_features(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) float64 for cells 1..N of a sequential label image, from the (3, H, W) maps
    (foreground, boundary, distance) it was cut from: one pass over the cells' and their rings' pixels
    (10-30 ms for a 704 x 520 image, the more cells cover it the more)."""
    count = int(labels.max())
    if count == 0:
        return np.zeros((0, len(FEATURES)))
    # the ring: pixels within RING_WIDTH of a cell that are not the cell (its neighbours or background)
    grown = square_extreme(labels, 2 * RING_WIDTH + 1, np.maximum)
    ring_owner = np.where(grown != labels, grown, 0)  # grown >= labels, so grown > 0 there
    sums, ring_sums, distance_max = cell_sums(labels, count, probs, ring_owner)
    area = sums[0, 1:]
    size, ring_size = np.maximum(area, 1), np.maximum(ring_sums[0, 1:], 1)
    foreground, boundary, distance = (sums[CELL_SUMS.index(k), 1:] / size for k in ("foreground", "boundary", "distance"))
    ring_foreground, ring_boundary, ring_cells = (ring_sums[RING_SUMS.index(k), 1:] / ring_size
                                                  for k in ("foreground", "boundary", "cells"))
    vy, vx, cov = moments_from_sums(sums)
    spread = np.sqrt(np.maximum((vy - vx) ** 2 + 4 * cov**2, 0))
    major, minor = (vy + vx + spread) / 2, np.maximum((vy + vx - spread) / 2, 0)
    boxes = ndi.find_objects(labels, max_label=count)
    box_area = np.array([(b[0].stop - b[0].start) * (b[1].stop - b[1].start) if b else 1 for b in boxes], np.float64)
    h, w = labels.shape
    on_border = np.array([float(b is not None and (b[0].start == 0 or b[1].start == 0 or b[0].stop == h or b[1].stop == w))
                          for b in boxes])
    return np.stack([
        np.log(size), foreground, boundary, distance_max, distance,
        ring_foreground, ring_boundary, ring_cells,
        1 - np.sqrt(minor / np.maximum(major, 1e-9)), area / box_area, on_border,
    ], axis=1)


@dataclass(frozen=True)
class LogisticRule:
    """A logistic regression on standardised features with a cutoff: what a lab's annotations teach
    about cut cells (CellFilter) and touching pairs of them (cellseg.cell_merge.CellMerge). Subclasses
    name their FEATURES; a stored rule fitted on another list is refused rather than misread."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    cutoff: float
    features: tuple[str, ...] = ()

    FEATURES: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in ("mean", "scale", "coef", "features"):  # from JSON: lists, made hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        kind = type(self).__name__
        if tuple(self.features) != self.FEATURES:
            raise ValueError(f"{kind} was fitted on features {list(self.features)}; this version computes "
                             f"{list(self.FEATURES)}: fit it again")
        if not (len(self.mean) == len(self.scale) == len(self.coef) == len(self.FEATURES)):
            raise ValueError(f"{kind} needs {len(self.FEATURES)} means, scales and coefficients")
        if not 0.0 <= self.cutoff < 1.0:
            raise ValueError(f"{kind} cutoff must be in [0, 1), got {self.cutoff}")
        if not all(np.isfinite(v) for v in (*self.mean, *self.scale, *self.coef, self.intercept)) or min(self.scale) <= 0:
            raise ValueError(f"{kind} has non-finite coefficients or non-positive scales")

    @classmethod
    def from_value(cls, value):
        return cls(**value) if isinstance(value, dict) else value

    def predict(self, features: np.ndarray) -> np.ndarray:
        """P(yes) per row of `features` (N, len(FEATURES))."""
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CellFilter(LogisticRule):
    """A cell is kept where P(annotated) >= cutoff."""

    features: tuple[str, ...] = FEATURES
    FEATURES: ClassVar[tuple[str, ...]] = FEATURES

    def probabilities(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return self.predict(cell_features(labels, probs))

    def apply(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """`labels` without the cells under the cutoff, renumbered 1..M in their order."""
        return self.apply_with_scores(labels, probs)[0]

    def apply_with_scores(self, labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`apply`'s labels, P(annotated) of each kept cell 1..M): the scores without computing the
        features a second time (they are most of the filter's cost)."""
        probabilities = self.probabilities(labels, probs)
        keep = probabilities >= self.cutoff
        if keep.all():
            return labels, probabilities
        lut = np.zeros(int(labels.max()) + 1, dtype=labels.dtype)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
        return lut[labels], probabilities[keep]
