"""Merging touching cells that a lab's annotations say are one: the over-split a lab's cells suffer.

The shipped model cuts a large astrocyte into several pieces: its distance map peaks more than once
inside one cell. Given every piece its own annotated cell, mSA on unseen astrocytes would rise from
0.095 to 0.146 (an oracle merge, docs/metrics_notes.md issue 29). Whether two touching pieces are one
cell shows along their shared border (how low the distance map falls there against the pieces'
peaks, how strong the boundary map is, how long the border is against the smaller piece), and a
logistic regression over those numbers, fitted on a lab's annotated images (`train.cell_rules`),
learns it. Pairs rated at or above the cutoff merge, chains of them into one cell.

Like the cell filter it rides in the model's post-processing parameters (`PostprocessParams.cell_merge`)
and needs only numpy and scipy at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cellseg.cell_filter import LogisticRule, label_maxima, square_extreme
from cellseg.targets import relabel_sequential

PAIR_FEATURES = ("border_boundary", "border_distance", "border_foreground", "border_core",
                 "valley_depth", "core_valley_depth", "log_border_length", "border_per_size",
                 "log_smaller_area", "log_larger_area", "lower_distance_peak", "lower_core_peak")


def touching_pairs(labels: np.ndarray, maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(a, b > a, border pixels, mean of each of `maps` along the border) for every pair of touching
    cells (8-connectivity; background excluded): each pixel whose 3x3 neighbourhood holds another
    cell counts towards that pair, on both sides of the border."""
    eroded = square_extreme(labels, 3, np.minimum)  # = grey_erosion with a 3x3 square
    dilated = square_extreme(labels, 3, np.maximum)
    inner = np.flatnonzero(eroded != labels)  # positions once, then gathers: cheaper than 6 boolean masks
    outer = np.flatnonzero(dilated != labels)
    flat = labels.ravel()
    small = np.concatenate((eroded.ravel()[inner], flat[outer]))
    large = np.concatenate((flat[inner], dilated.ravel()[outer]))
    cells = small > 0  # small < large always: the minimum (maximum) filter differs from the pixel's own
    positions = np.concatenate((inner, outer))[cells]
    n = int(labels.max()) + 1
    pairs, index = np.unique(small[cells].astype(np.int64) * n + large[cells], return_inverse=True)
    counts = np.bincount(index, minlength=len(pairs)).astype(np.float64)
    means = [np.bincount(index, m.ravel()[positions], minlength=len(pairs)) / np.maximum(counts, 1) for m in maps]
    first, second = np.divmod(pairs, n)
    return first, second, counts, means


def pair_features(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, features (P, len(PAIR_FEATURES))) for every pair of touching cells of a sequential label
    image cut from the (3, H, W) maps (foreground, boundary, distance)."""
    count = int(labels.max())
    core = probs[2] * (1.0 - probs[1])
    first, second, length, (boundary, distance, foreground, core_mean) = touching_pairs(
        labels, [probs[1], probs[2], probs[0], core])
    if len(first) == 0:
        return first, second, np.zeros((0, len(PAIR_FEATURES)))
    area = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    peak, core_peak = (np.concatenate(([0.0], m)) for m in label_maxima(labels, count, probs[2], core))
    smaller, larger = np.minimum(area[first], area[second]), np.maximum(area[first], area[second])
    low_peak = np.minimum(peak[first], peak[second])
    low_core = np.minimum(core_peak[first], core_peak[second])
    features = np.stack([
        boundary, distance, foreground, core_mean,
        distance / np.maximum(low_peak, 1e-3), core_mean / np.maximum(low_core, 1e-3),
        np.log(length), length / np.sqrt(np.maximum(smaller, 1)),
        np.log(np.maximum(smaller, 1)), np.log(np.maximum(larger, 1)), low_peak, low_core,
    ], axis=1)
    return first, second, features


def chain_ids(count: int, first: np.ndarray, second: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """Per label 0..count-1: the smallest label of its chain of pairs marked in `merge` (itself where
    it is in none); label-sized, so the image is gathered once by whoever applies it."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    graph = coo_array((np.ones(int(merge.sum())), (first[merge], second[merge])), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, count, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(count))
    return smallest[component]


def join_pairs(labels: np.ndarray, first: np.ndarray, second: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """`labels` with each chain of the pairs marked in `merge` made one cell, numbered by its smallest
    label (the numbering cellseg.postprocess.merge_weak_borders keeps; gaps are left)."""
    if not merge.any():
        return labels
    return chain_ids(int(labels.max()) + 1, first, second, merge).astype(labels.dtype)[labels]


def merge_pairs(labels: np.ndarray, first: np.ndarray, second: np.ndarray, merge: np.ndarray) -> np.ndarray:
    """`join_pairs`, renumbered 1..M in the order of each merged cell's smallest label."""
    if not merge.any():
        return labels
    return relabel_sequential(chain_ids(int(labels.max()) + 1, first, second, merge)).astype(labels.dtype)[labels]


@dataclass(frozen=True)
class CellMerge(LogisticRule):
    """Touching cells merge where P(one annotated cell) >= cutoff."""

    features: tuple[str, ...] = PAIR_FEATURES
    FEATURES: ClassVar[tuple[str, ...]] = PAIR_FEATURES

    def apply(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if labels.max() < 2:
            return labels
        first, second, features = pair_features(labels, probs)
        if len(first) == 0:
            return labels
        return merge_pairs(labels, first, second, self.predict(features) >= self.cutoff)
