"""Evaluation with the metrics the project reports (and training validates with).

Semantic, per image then averaged: foreground IoU, Dice, pixel accuracy (at native resolution).
Instances: COCO segm AP / AP50 / AP75 with LIVECell's protocol (pycocotools, maxDets
100/500/2000, read at 2000 detections), mSA (Kaggle Sartorius: mean over IoU 0.50..0.95 of
TP/(TP+FP+FN), per image, then averaged) and relative cell-count error.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.data import Sample
from cellseg.inference import Segmentation
from cellseg.matching import mean_score_accuracy
from cellseg.rle import labels_to_coco_rles

METRIC_KEYS = ("foreground_iou", "dice", "pixel_accuracy", "ap", "ap50", "ap75", "msa", "count_error")
MAX_DETS = (100, 500, 2000)


def semantic_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    gt, pred = gt > 0, pred > 0
    inter, union = np.logical_and(gt, pred).sum(), np.logical_or(gt, pred).sum()
    total = gt.sum() + pred.sum()
    return {
        "foreground_iou": float(inter / union) if union else 1.0,
        "dice": float(2 * inter / total) if total else 1.0,
        "pixel_accuracy": float((gt == pred).mean()),
        # Which way the foreground errs: low precision = cell predicted where none is annotated.
        "foreground_precision": float(inter / pred.sum()) if pred.sum() else 1.0,
        "foreground_recall": float(inter / gt.sum()) if gt.sum() else 1.0,
        # A lab's readout: how far the covered fraction of the image (confluence) is from the annotated
        # one, relative to it; unlike foreground IoU it lets a miss here and a false cell there cancel.
        "confluence_error": float(abs(int(pred.sum()) - int(gt.sum())) / max(int(gt.sum()), 1)),
    }


def _coco_ground_truth(rles_per_image: Sequence[list[dict]], shapes: Sequence[tuple[int, int]]) -> COCO:
    images, annotations = [], []
    for image_id, (rles, (h, w)) in enumerate(zip(rles_per_image, shapes), start=1):
        images.append({"id": image_id, "height": h, "width": w})
        for rle in rles:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": rle, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(gt_rles: Sequence[list[dict]], shapes: Sequence[tuple[int, int]],
            pred_rles: Sequence[list[dict]], pred_scores: Sequence[np.ndarray]) -> dict[str, float]:
    """COCO segm AP, AP50, AP75 at maxDets=2000 (read from the precision array: `summarize()`
    would report AP at 100 detections whatever maxDets says, which caps dense LIVECell images)."""
    detections = [
        {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(score)}
        for image_id, (rles, scores) in enumerate(zip(pred_rles, pred_scores), start=1)
        for rle, score in zip(rles, scores)
    ]
    if not detections:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    gt = _coco_ground_truth(gt_rles, shapes)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.maxDets = list(MAX_DETS)
        # Only the "all" area range is read: the small/medium/large ranges would triple the work.
        ev.params.areaRng, ev.params.areaRngLbl = [ev.params.areaRng[0]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, 0, 0, MAX_DETS.index(2000)]  # [IoU thr, recall]

    def mean_valid(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else 0.0

    thresholds = np.round(ev.params.iouThrs, 2)
    return {
        "ap": mean_valid(precision),
        "ap50": mean_valid(precision[thresholds == 0.5]),
        "ap75": mean_valid(precision[thresholds == 0.75]),
    }


def _group_metrics(per_image: list[dict], gt_rles, shapes, pred_rles, pred_scores) -> dict:
    averaged = ("foreground_iou", "dice", "pixel_accuracy", "foreground_precision", "foreground_recall", "msa",
                "count_error", "confluence_error")
    out = {k: float(np.mean([r[k] for r in per_image])) for k in averaged}
    out.update(coco_ap(gt_rles, shapes, pred_rles, pred_scores))
    out["n_images"] = len(per_image)
    out["n_cells"] = int(sum(r["n_true"] for r in per_image))
    out["n_predicted"] = int(sum(r["n_pred"] for r in per_image))
    return {k: out[k] for k in (*METRIC_KEYS, "foreground_precision", "foreground_recall", "confluence_error",
                                "n_images", "n_cells", "n_predicted")}


def evaluate_segmentations(samples: Sequence[Sample], segmentations: Sequence[Segmentation],
                           groups: Sequence[str] = ("per_cell_type", "per_source"), overall: bool = True) -> dict:
    """All metrics, overall, per cell type and per source, plus one row per image. `groups` and
    `overall` can be narrowed where only some figures are needed (COCO AP is the slow part)."""
    per_image, gt_rles, shapes, pred_rles, pred_scores = [], [], [], [], []
    for sample, seg in zip(samples, segmentations):
        gt_labels = sample.labels()
        n_true, n_pred = len(sample.rles), seg.count
        row = {"id": sample.id, "cell_type": sample.cell_type, "source": sample.source,
               "n_true": n_true, "n_pred": n_pred}
        row.update(semantic_scores(gt_labels, seg.labels))
        row["msa"] = mean_score_accuracy(gt_labels, seg.labels)
        row["count_error"] = abs(n_pred - n_true) / max(n_true, 1)
        per_image.append(row)
        gt_rles.append(sample.rles)
        shapes.append(gt_labels.shape)
        pred_rles.append(labels_to_coco_rles(seg.labels))
        pred_scores.append(seg.scores())

    def subset(indices: list[int]) -> dict:
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return _group_metrics(pick(per_image), pick(gt_rles), pick(shapes), pick(pred_rles), pick(pred_scores))

    members: dict[str, dict[str, list[int]]] = {"per_cell_type": defaultdict(list), "per_source": defaultdict(list)}
    for i, row in enumerate(per_image):
        members["per_cell_type"][row["cell_type"]].append(i)
        members["per_source"][row["source"]].append(i)
    result = subset(list(range(len(per_image)))) if overall else {}
    for name in groups:
        result[name] = {key: subset(idx) for key, idx in sorted(members[name].items())}
    result["per_image"] = per_image
    return result


def selection_score(metrics: dict) -> float:
    """Mean over sources of (AP50 + mSA) / 2: the one figure that picks checkpoints and post-processing
    defaults, so that neither LIVECell nor Sartorius is traded away for the other."""
    groups = list(metrics.get("per_source", {}).values()) or [metrics]
    return float(np.mean([(g["ap50"] + g["msa"]) / 2 for g in groups]))


def format_table(result: dict) -> str:
    """A readable table: overall, then per cell type."""
    cols = ("n_images", "n_cells", *METRIC_KEYS)
    header = f"{'group':<14}" + "".join(f"{c:>15}" for c in cols)
    lines = [header, "-" * len(header)]

    def row(name: str, m: dict) -> str:
        return f"{name:<14}" + "".join(
            f"{m[c]:>15d}" if isinstance(m[c], int) else f"{m[c]:>15.3f}" for c in cols)

    lines.append(row("ALL", result))
    for name, metrics in result["per_source"].items():
        lines.append(row(f"[{name}]", metrics))
    for name, metrics in result["per_cell_type"].items():
        lines.append(row(name, metrics))
    return "\n".join(lines)


PER_IMAGE_COLUMNS = (("n_true", "cells"), ("n_pred", "predicted"), ("foreground_iou", "fg IoU"), ("msa", "mSA"),
                     ("count_error", "count err"))


def format_per_image(result: dict) -> str:
    """One line per image (`cellseg evaluate --per-image`): which images the model does worst on, a lab's
    first question; the worst mSA first. AP50 is a figure over many cells: it stays per group."""
    rows = sorted(result["per_image"], key=lambda r: r["msa"])
    width = max([len("image"), *(len(str(r["id"])) for r in rows)])
    header = f"{'image':<{width}}  {'type':<10}" + "".join(f"{label:>11}" for _, label in PER_IMAGE_COLUMNS)
    lines = [header, "-" * len(header)]
    for r in rows:
        values = "".join(f"{r[key]:>11d}" if isinstance(r[key], int) else f"{r[key]:>11.3f}"
                         for key, _ in PER_IMAGE_COLUMNS)
        lines.append(f"{str(r['id']):<{width}}  {str(r['cell_type']):<10}{values}")
    return "\n".join(lines)

