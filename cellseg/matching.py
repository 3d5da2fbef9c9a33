"""Instance matching between ground-truth and predicted label images (after stardist.matching).

A predicted cell matches a true cell when their IoU reaches the threshold; pairs are chosen by
maximum-weight bipartite matching, so each cell is matched at most once at any threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

MSA_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true label (rows, 1..max) and predicted label (cols, 1..max)."""
    gt, pred = np.asarray(gt, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {gt.shape} vs {pred.shape}")
    n_gt, n_pred = int(gt.max(initial=0)), int(pred.max(initial=0))
    overlap = np.bincount((gt * (n_pred + 1) + pred).ravel(), minlength=(n_gt + 1) * (n_pred + 1))
    overlap = overlap.reshape(n_gt + 1, n_pred + 1)
    gt_area = overlap.sum(axis=1, keepdims=True)
    pred_area = overlap.sum(axis=0, keepdims=True)
    union = gt_area + pred_area - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[1:, 1:]


@dataclass
class MatchStats:
    threshold: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    precision: float
    recall: float
    f1: float
    accuracy: float  # TP / (TP + FP + FN), the Kaggle Sartorius per-threshold score
    mean_matched_iou: float

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num / den) if den else empty


def match_from_iou(iou: np.ndarray, threshold: float) -> MatchStats:
    n_true, n_pred = iou.shape
    tp, matched_iou = 0, 0.0
    if n_true and n_pred:
        # Costs below the threshold are zeroed so they never win a pairing they cannot count for.
        weights = np.where(iou >= threshold, iou, 0.0)
        rows, cols = linear_sum_assignment(weights, maximize=True)
        hits = weights[rows, cols] >= threshold
        hits &= weights[rows, cols] > 0
        tp, matched_iou = int(hits.sum()), float(weights[rows, cols][hits].sum())
    fp, fn = n_pred - tp, n_true - tp
    # No cells and no predictions is a perfect answer.
    empty = 1.0 if n_true == 0 and n_pred == 0 else 0.0
    return MatchStats(
        threshold=float(threshold), tp=tp, fp=fp, fn=fn, n_true=n_true, n_pred=n_pred,
        precision=_ratio(tp, n_pred, empty), recall=_ratio(tp, n_true, empty),
        f1=_ratio(2 * tp, n_true + n_pred, empty), accuracy=_ratio(tp, tp + fp + fn, empty),
        mean_matched_iou=_ratio(matched_iou, tp, 0.0),
    )


def matching(gt: np.ndarray, pred: np.ndarray, thresholds=(0.5,)) -> list[MatchStats]:
    """Match statistics of `pred` against `gt` at each IoU threshold."""
    iou = iou_matrix(gt, pred)
    # Labels absent from an image (gaps in numbering) are not cells.
    iou = iou[np.isin(np.arange(1, iou.shape[0] + 1), np.unique(gt))]
    iou = iou[:, np.isin(np.arange(1, iou.shape[1] + 1), np.unique(pred))]
    return [match_from_iou(iou, t) for t in thresholds]


def mean_score_accuracy(gt: np.ndarray, pred: np.ndarray, thresholds=MSA_THRESHOLDS) -> float:
    """Mean over IoU thresholds 0.50..0.95 of TP/(TP+FP+FN) (the Kaggle Sartorius metric, one image)."""
    return float(np.mean([s.accuracy for s in matching(gt, pred, thresholds)]))
