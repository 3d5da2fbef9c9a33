"""From the network's probability maps to an instance label image (seeded watershed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from cellseg.targets import relabel_sequential


@dataclass(frozen=True)
class PostprocessParams:
    """Knobs of the map-to-instances step. Defaults are stored in the model's metadata."""

    fg_threshold: float = 0.5  # foreground probability above which a pixel is cell
    seed_threshold: float = 0.5  # distance*(1-boundary) above which a pixel is a cell core
    min_size: int = 20  # cells smaller than this (pixels) are dropped
    min_seed_size: int = 3  # cores smaller than this are noise, not cells
    seed_sigma: float = 1.0  # Gaussian smoothing (px) of the core score: stops large cells splitting in two
    # Neighbouring cells whose shared border has a mean boundary probability below this are one cell
    # split by the watershed (a lobed cell has two distance peaks but no boundary between them). 0 = off.
    merge_threshold: float = 0.0

    def validate(self) -> PostprocessParams:
        for name in ("fg_threshold", "seed_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
        for name in ("min_size", "min_seed_size"):
            value = getattr(self, name)
            if not 0 <= value <= 1_000_000:
                raise ValueError(f"{name} must be between 0 and 1000000 pixels, got {value}")
        if not 0.0 <= self.seed_sigma <= 10.0:
            raise ValueError(f"seed_sigma must be between 0 and 10 pixels, got {self.seed_sigma}")
        if not 0.0 <= self.merge_threshold < 1.0:
            raise ValueError(f"merge_threshold must be in [0, 1), got {self.merge_threshold}")
        return self

    def with_overrides(self, **overrides) -> PostprocessParams:
        """These parameters with the given ones replacing them (None means "keep"), validated."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 0 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = labels.copy()
    labels[small[labels]] = 0
    return labels


def merge_weak_borders(labels: np.ndarray, boundary: np.ndarray, threshold: float) -> np.ndarray:
    """Merge touching cells whose shared border has a mean boundary probability below `threshold`
    (skimage's region adjacency graph gives each border's mean)."""
    import networkx as nx
    from skimage import graph

    if threshold <= 0 or labels.max() < 2:
        return labels
    rag = graph.rag_boundary(labels, boundary.astype(np.float64))
    if 0 in rag:
        rag.remove_node(0)  # background is not a cell to merge with
    weak = nx.Graph((u, v) for u, v, data in rag.edges(data=True) if data["weight"] < threshold)
    if weak.number_of_edges() == 0:
        return labels
    lut = np.arange(labels.max() + 1, dtype=np.int32)
    for component in nx.connected_components(weak):
        lut[list(component)] = min(component)
    return lut[labels]


def maps_to_labels(probs: np.ndarray, params: PostprocessParams = PostprocessParams()) -> np.ndarray:
    """(3, H, W) probabilities (foreground, boundary, distance) to an int32 label image.

    Cores (high distance, low boundary, lightly smoothed) seed a watershed on the distance map restricted to the
    foreground, so touching cells split along the valley between their centres. Foreground
    blobs that contain no core are kept as single cells rather than silently dropped.
    """
    foreground = probs[0] > params.fg_threshold
    core_score = probs[2] * (1.0 - probs[1])
    if params.seed_sigma > 0:
        core_score = ndi.gaussian_filter(core_score, params.seed_sigma)
    cores, n_cores = ndi.label((core_score > params.seed_threshold) & foreground)
    cores = remove_small(cores, params.min_seed_size)
    labels = watershed(-probs[2], markers=cores, mask=foreground).astype(np.int32)
    labels = merge_weak_borders(labels, probs[1], params.merge_threshold)
    orphans, n_orphans = ndi.label(foreground & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    labels = remove_small(labels, params.min_size)
    return relabel_sequential(labels).astype(np.int32)
