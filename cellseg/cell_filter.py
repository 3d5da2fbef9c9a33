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
MOMENT_ROWS = 256  # image rows per pass of second_moments: its coordinate arrays stay small on any image


def second_moments(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(var y, var x, cov xy) of each cell 1..count's pixel coordinates, summed a block of rows at a
    time: full-image coordinate arrays would cost 16 bytes a pixel on the largest images served."""
    sums = np.zeros((6, count + 1))
    width = labels.shape[1]
    columns = np.arange(width, dtype=np.float64)
    for top in range(0, labels.shape[0], MOMENT_ROWS):
        block = labels[top:top + MOMENT_ROWS].ravel()
        ys = np.repeat(np.arange(top, top + len(block) // width, dtype=np.float64), width)
        xs = np.tile(columns, len(block) // width)
        for i, weights in enumerate((None, ys, xs, ys * ys, xs * xs, ys * xs)):
            sums[i] += np.bincount(block, weights=weights, minlength=count + 1)
    n, sy, sx, syy, sxx, sxy = sums[:, 1:]
    n = np.maximum(n, 1)
    my, mx = sy / n, sx / n
    return syy / n - my**2, sxx / n - mx**2, sxy / n - my * mx


def label_maxima(labels: np.ndarray, count: int, *values: np.ndarray) -> list[np.ndarray]:
    """Per cell 1..count, the maximum of each of `values` (images the shape of `labels`) over its
    pixels, 0 where a label has none: one stable sort of the labels serves them all. The same numbers
    as scipy's ndimage.maximum, which sorts once per call (21 vs 5 ms for one map of a 704 x 520 image)."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")  # radix/timsort: a few ms on a label image
    sorted_labels = flat[order]
    wanted = np.arange(1, count + 1)
    starts, ends = np.searchsorted(sorted_labels, wanted), np.searchsorted(sorted_labels, wanted, side="right")
    present = ends > starts
    # reduceat over [start, end) pairs; the odd (between-cell) results are dropped. One padding value
    # keeps an end at the array's length a valid index.
    bounds = np.stack([starts[present], ends[present]], axis=1).ravel()
    maxima = []
    for value in values:
        result = np.zeros(count)
        if len(bounds):
            ordered = np.append(value.ravel()[order], value.dtype.type(0))
            result[present] = np.maximum.reduceat(ordered, bounds)[::2]
        maxima.append(result)
    return maxima


def cell_features(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) float64 for cells 1..N of a sequential label image, from the (3, H, W) maps
    (foreground, boundary, distance) it was cut from. Vectorised per label: about 30 ms for a 704 x 520 image."""
    count = int(labels.max())
    if count == 0:
        return np.zeros((0, len(FEATURES)))
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.float64)

    # the ring: pixels within RING_WIDTH of a cell that are not the cell (its neighbours or background)
    grown = ndi.maximum_filter(labels, size=2 * RING_WIDTH + 1)
    ring = np.where((grown > 0) & (grown != labels), grown, 0).ravel()
    ring_size = np.maximum(np.bincount(ring, minlength=count + 1)[1:], 1)

    def mean(values: np.ndarray, where: np.ndarray = flat, sizes: np.ndarray = np.maximum(area, 1)) -> np.ndarray:
        return np.bincount(where, weights=values.ravel(), minlength=count + 1)[1:] / sizes

    vy, vx, cov = second_moments(labels, count)
    spread = np.sqrt(np.maximum((vy - vx) ** 2 + 4 * cov**2, 0))
    major, minor = (vy + vx + spread) / 2, np.maximum((vy + vx - spread) / 2, 0)
    boxes = ndi.find_objects(labels, max_label=count)
    box_area = np.array([(b[0].stop - b[0].start) * (b[1].stop - b[1].start) if b else 1 for b in boxes], np.float64)
    h, w = labels.shape
    on_border = np.array([float(b is not None and (b[0].start == 0 or b[1].start == 0 or b[0].stop == h or b[1].stop == w))
                          for b in boxes])
    return np.stack([
        np.log(np.maximum(area, 1)), mean(probs[0]), mean(probs[1]),
        label_maxima(labels, count, probs[2])[0], mean(probs[2]),
        mean(probs[0], ring, ring_size), mean(probs[1], ring, ring_size),
        mean((labels > 0).astype(np.float64), ring, ring_size),
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
