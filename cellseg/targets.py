"""What each output channel of the network means, as a function of an instance label image.

The network predicts three maps (all probabilities in 0..1 after the model's final sigmoid):

0. ``foreground``: pixel belongs to any cell.
1. ``boundary``: pixel lies within ``BOUNDARY_WIDTH`` px of its cell's edge (inner boundary).
   Between two touching cells this gives a band of 2*BOUNDARY_WIDTH px that keeps them apart.
2. ``distance``: distance to the cell's edge divided by the largest such distance in that cell,
   so every cell, small or large, peaks at 1 in its middle. Thresholding it gives one seed per
   cell for the watershed, even where cells touch along a long edge.

Training builds these from annotations; post-processing (`cellseg.postprocess`) inverts them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

OUTPUT_CHANNELS = ("foreground", "boundary", "distance")
BOUNDARY_WIDTH = 2


def _instance_distances(labels: np.ndarray) -> np.ndarray:
    """Euclidean distance of each cell pixel to the nearest pixel outside that cell."""
    dist = np.zeros(labels.shape, dtype=np.float32)
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        # One pixel of margin so cells touching the crop edge still get a finite distance there.
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in window)
        cell = labels[padded] == index
        d = ndi.distance_transform_edt(cell).astype(np.float32)
        dist[padded][cell] = d[cell]
    return dist


def make_targets(labels: np.ndarray, boundary_width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """(3, H, W) float32 targets for an (H, W) integer label image (0 = background)."""
    labels = np.asarray(labels)
    if labels.max() > 0:
        labels = relabel_sequential(labels)
    dist = _instance_distances(labels)
    foreground = labels > 0
    boundary = foreground & (dist <= boundary_width)
    peak = ndi.maximum(dist, labels, index=np.arange(1, labels.max() + 1)) if labels.max() else []
    peak_map = np.zeros_like(dist)
    if len(peak):
        lut = np.concatenate([[1.0], np.asarray(peak, dtype=np.float32)])
        peak_map = lut[labels]
    normalized = np.where(foreground, dist / np.maximum(peak_map, 1e-6), 0.0)
    return np.stack([foreground, boundary, normalized]).astype(np.float32)


def relabel_sequential(labels: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Labels renumbered 1..N in the order of their values (0 stays 0); labels with fewer than
    `min_size` pixels become 0 in the same pass (one count and one table lookup)."""
    keep = np.bincount(labels.ravel()) >= max(min_size, 1)  # linear time, where np.unique sorts
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]
