"""Fitting a lab's cell filter (cellseg.cell_filter) on its annotated training images.

Each cell cut from a training image's maps is labelled by whether it matches an annotated cell
(IoU >= 0.5). A logistic regression (scikit-learn) learns that from the cells' features; the cutoff
under which a cell is dropped is picked by leave-one-image-out: each image's cells are scored by a
filter fitted on the other images, so the cutoff is chosen on cells the filter never saw. The
figures it returns say what the filter is worth there, against no filter; `python -m train finetune`
keeps it only where that gain reaches its margin and the held-back images confirm it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cellseg.cell_filter import FEATURES, CellFilter, cell_features
from cellseg.data import Sample
from cellseg.matching import iou_matrix, mean_score_accuracy
from cellseg.postprocess import PostprocessParams, maps_to_labels

CUTOFFS = (0.1, 0.2, 0.3, 0.4, 0.5)  # P(annotated) under which a cell is dropped
REGULARISATION = 0.3  # sklearn's C: a few hundred cells, eleven features; stronger than its default 1.0
MIN_CELLS_PER_CLASS = 5  # fewer matched (or unmatched) cells than this teach nothing


@dataclass
class CutCells:
    """One image's cells as the parameters cut them: labels, features, matched or not."""

    gt: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    matched: np.ndarray  # bool per cell: IoU >= 0.5 with an annotated cell


@dataclass
class FilterFit:
    filter: CellFilter | None  # None: too few cells of either kind to fit one
    msa_without: float  # mean mSA on the training images, no filter
    msa_cross_validated: dict[float, float]  # cutoff -> mean mSA, each image filtered by the others' fit
    reason: str = ""

    @property
    def gain(self) -> float:
        return max(self.msa_cross_validated.values(), default=self.msa_without) - self.msa_without

    def to_dict(self) -> dict:
        return {"msa_without": round(self.msa_without, 4), "gain": round(self.gain, 4), "reason": self.reason,
                "msa_cross_validated": {str(k): round(v, 4) for k, v in self.msa_cross_validated.items()},
                "cutoff": self.filter.cutoff if self.filter else None}


def cut_cells(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams) -> list[CutCells]:
    params = replace(params, cell_filter=None)  # the cells the filter will be shown
    out = []
    for sample, probs in zip(samples, maps):
        gt, labels = sample.labels(), maps_to_labels(probs, params)
        iou = iou_matrix(gt, labels)
        matched = iou.max(axis=0) >= 0.5 if iou.size else np.zeros(int(labels.max()), bool)
        out.append(CutCells(gt, labels, cell_features(labels, probs), matched))
    return out


def mean_msa(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams) -> float:
    """Mean over images of mSA (cellseg.evaluate's figure) of the cells `params` cut, filter included."""
    return float(np.mean([mean_score_accuracy(s.labels(), maps_to_labels(m, params)) for s, m in zip(samples, maps)]))


def fit_logistic(features: np.ndarray, matched: np.ndarray, cutoff: float) -> CellFilter:
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature (no cell on the border) weighs nothing
    model = LogisticRegression(C=REGULARISATION, max_iter=1000).fit((features - mean) / scale, matched)
    return CellFilter(tuple(mean.tolist()), tuple(scale.tolist()), tuple(model.coef_[0].tolist()),
                      float(model.intercept_[0]), cutoff, FEATURES)


def filtered_msa(cells: CutCells, probabilities: np.ndarray, cutoff: float) -> float:
    lut = np.zeros(len(probabilities) + 1, dtype=cells.labels.dtype)
    keep = probabilities >= cutoff
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return mean_score_accuracy(cells.gt, lut[cells.labels])


def fit_cell_filter(samples: Sequence[Sample], maps: Sequence[np.ndarray], params: PostprocessParams,
                    cutoffs: Sequence[float] = CUTOFFS) -> FilterFit:
    """A filter fitted on every training image, its cutoff the best by leave-one-image-out mSA."""
    cells = cut_cells(samples, maps, params)
    without = float(np.mean([mean_score_accuracy(c.gt, c.labels) for c in cells]))
    matched = np.concatenate([c.matched for c in cells])
    kinds = (int(matched.sum()), int((~matched).sum()))
    if len(cells) < 2 or min(kinds) < MIN_CELLS_PER_CLASS:
        return FilterFit(None, without, {}, f"too few cells to learn from ({kinds[0]} matched an annotation, "
                                            f"{kinds[1]} did not, in {len(cells)} image(s))")
    scores = {cutoff: [] for cutoff in cutoffs}
    for i, held in enumerate(cells):
        rest = [c for j, c in enumerate(cells) if j != i]
        rest_matched = np.concatenate([c.matched for c in rest])
        if len(held.matched) == 0 or rest_matched.all() or not rest_matched.any():
            for cutoff in cutoffs:  # nothing to fit or filter here: the image scores as it is
                scores[cutoff].append(mean_score_accuracy(held.gt, held.labels))
            continue
        fitted = fit_logistic(np.concatenate([c.features for c in rest]), rest_matched, 0.0)
        z = (held.features - np.asarray(fitted.mean)) / np.asarray(fitted.scale)
        probabilities = 1.0 / (1.0 + np.exp(-(z @ np.asarray(fitted.coef) + fitted.intercept)))
        for cutoff in cutoffs:
            scores[cutoff].append(filtered_msa(held, probabilities, cutoff))
    cross_validated = {cutoff: float(np.mean(v)) for cutoff, v in scores.items()}
    best = max(cross_validated, key=cross_validated.get)
    fitted = fit_logistic(np.concatenate([c.features for c in cells]), matched, best)
    return FilterFit(fitted, without, cross_validated)
