"""From the network's probability maps to an instance label image (seeded watershed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from cellseg.cell_filter import CellFilter
from cellseg.cell_merge import CellMerge, join_pairs, touching_pairs
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
    # A core must also exceed this score somewhere (hysteresis): the thin processes of an astrocyte
    # pass seed_threshold in patches of their own but never reach a cell centre's peak, and each such
    # patch used to seed a cell of its own. 0 = off (every core above seed_threshold seeds).
    seed_peak: float = 0.0
    # Drops the cells a lab's annotators would not draw (cellseg.cell_filter), fitted on its images by
    # `python -m train finetune`; None = every cell kept. A dict (from JSON metadata) becomes a CellFilter.
    cell_filter: CellFilter | None = None
    # Merges touching cells the lab's annotations say are one (cellseg.cell_merge), before the filter;
    # fitted the same way. None = the watershed's cells as cut.
    cell_merge: CellMerge | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell_filter", CellFilter.from_value(self.cell_filter))
        object.__setattr__(self, "cell_merge", CellMerge.from_value(self.cell_merge))

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
        if not 0.0 <= self.seed_peak < 1.0:
            raise ValueError(f"seed_peak must be in [0, 1), got {self.seed_peak}")
        return self

    def with_overrides(self, **overrides) -> PostprocessParams:
        """These parameters with the given ones replacing them (None means "keep"), validated."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    def without_rules(self) -> PostprocessParams:
        """The thresholds alone: cells as the watershed cuts them, no learnt merge or filter."""
        return replace(self, cell_merge=None, cell_filter=None)

    def to_dict(self) -> dict:
        """JSON-ready; a rule the parameters lack is left out rather than null (BentoML's model store
        refuses None in metadata, and a fine-tuned model's parameters go there)."""
        values = asdict(self)
        for name in ("cell_filter", "cell_merge"):
            rule = getattr(self, name)
            if rule is None:
                del values[name]
            else:
                values[name] = rule.to_dict()
        return values


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 0 or labels.max() == 0:
        return labels
    keep = np.arange(labels.max() + 1, dtype=labels.dtype)
    keep[np.bincount(labels.ravel()) < min_size] = 0
    keep[0] = 0
    return keep[labels]


def border_means(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label a, label b > a, mean of `values` along their shared border) for every pair of touching
    cells (8-connectivity; background excluded). The same border pixels and means as skimage's
    `graph.rag_boundary`, whose RAG of Python objects costs about 5x more on a LIVECell image."""
    first, second, _, (means,) = touching_pairs(labels, [values])
    return first, second, means


def merge_weak_borders(labels: np.ndarray, boundary: np.ndarray, threshold: float) -> np.ndarray:
    """Merge touching cells whose shared border has a mean boundary probability below `threshold`;
    chains of such cells become one cell, numbered by its smallest label."""
    if threshold <= 0 or labels.max() < 2:
        return labels
    first, second, means = border_means(labels, boundary)
    return join_pairs(labels, first, second, means < threshold)


def seeded_watershed(elevation: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """skimage's watershed of `elevation` from `seeds` within `mask`, flooding only what it must.

    A seed pixel whose four neighbours all carry its label can only ever be its own seed's: the
    flood never has to pass through it. Leaving these interiors out of the mask and painting them
    back gives the same labels (the tests check it) for about half the priority-queue work, since
    cell cores cover much of the foreground. One caveat: where heights tie exactly (8-bit maps),
    skimage's heap pops tied seed pixels in an order that depends on everything in it, so a few
    border pixels between touching cells can go the other way (0.002% of pixels on the validation
    split, AP50 -0.0002; docs/BENCHMARKS.md); neither order is more right than the other.
    """
    interior = seeds > 0
    interior[1:] &= seeds[1:] == seeds[:-1]  # same label as the pixel above (image edges count as same)
    interior[:-1] &= seeds[:-1] == seeds[1:]  # ... below
    interior[:, 1:] &= seeds[:, 1:] == seeds[:, :-1]  # ... left
    interior[:, :-1] &= seeds[:, :-1] == seeds[:, 1:]  # ... right
    flooded = watershed(elevation, markers=np.where(interior, 0, seeds), mask=mask & ~interior)
    return np.where(interior, seeds, flooded).astype(np.int32)


def maps_to_labels(probs: np.ndarray, params: PostprocessParams = PostprocessParams()) -> np.ndarray:
    """(3, H, W) probabilities (foreground, boundary, distance) to an int32 label image.

    Cores (high distance, low boundary, lightly smoothed) seed a watershed on the distance map restricted to the
    foreground, so touching cells split along the valley between their centres. Foreground
    blobs that contain no core are kept as single cells rather than silently dropped.
    """
    return maps_to_cells(probs, params)[0]


def maps_to_cells(probs: np.ndarray, params: PostprocessParams) -> tuple[np.ndarray, np.ndarray | None]:
    """`maps_to_labels`' labels, and with a cell filter its P(annotated) of each kept cell (the scores
    it decided by, computed once); None without a filter."""
    foreground = probs[0] > params.fg_threshold
    cores = seed_cores(core_score(probs, params.seed_sigma), foreground, params)
    labels = seeded_watershed(-probs[2], cores, foreground)
    labels = merge_weak_borders(labels, probs[1], params.merge_threshold)
    labels = finish_labels(labels, foreground, params.min_size)
    if params.cell_merge:
        labels = params.cell_merge.apply(labels, probs)
    return params.cell_filter.apply_with_scores(labels, probs) if params.cell_filter else (labels, None)


# The stages of `maps_to_labels`, also timed one by one by scripts/bench_postprocess.py.

def core_score(probs: np.ndarray, sigma: float) -> np.ndarray:
    """distance x (1 - boundary), lightly smoothed: high in the middle of a cell, low between cells."""
    score = probs[2] * (1.0 - probs[1])
    return ndi.gaussian_filter(score, sigma) if sigma > 0 else score


def seed_cores(score: np.ndarray, foreground: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """The watershed's seeds: connected foreground pixels whose core score passes the threshold,
    without the ones smaller than `min_seed_size` (noise, not cells) and, where `seed_peak` is set,
    without the ones whose highest score stays under it (hysteresis thresholding)."""
    cores, count = ndi.label((score > params.seed_threshold) & foreground)
    if params.seed_peak > params.seed_threshold and count:
        # skimage.filters.apply_hysteresis_threshold's rule (a pixel above the peak), with the labels
        # already at hand and one count (ndi.maximum per label costs 10x more; tests compare the two)
        keep = np.bincount(cores[score > params.seed_peak], minlength=count + 1) > 0
        keep[0] = False
        cores = np.where(keep[cores], cores, 0)
    return remove_small(cores, params.min_seed_size)


def finish_labels(labels: np.ndarray, foreground: np.ndarray, min_size: int) -> np.ndarray:
    """Foreground blobs with no seed become cells of their own; cells under `min_size` go; the
    rest are numbered 1..N."""
    orphans, n_orphans = ndi.label(foreground & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return relabel_sequential(labels, min_size)
