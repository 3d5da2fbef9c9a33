import numpy as np
import pytest

from cellseg.evaluate import coco_ap, semantic_scores
from cellseg.matching import iou_matrix, matching, mean_score_accuracy
from cellseg.rle import labels_to_coco_rles


def squares(*boxes, shape=(40, 40)):
    lab = np.zeros(shape, np.int32)
    for i, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        lab[y0:y1, x0:x1] = i
    return lab


def test_perfect_prediction_scores_one():
    gt = squares((0, 0, 10, 10), (20, 20, 30, 35))
    [stats] = matching(gt, gt)
    assert (stats.tp, stats.fp, stats.fn) == (2, 0, 0)
    assert stats.precision == stats.recall == stats.f1 == stats.accuracy == 1.0
    assert mean_score_accuracy(gt, gt) == 1.0


def test_disjoint_prediction_scores_zero():
    gt = squares((0, 0, 10, 10))
    pred = squares((20, 20, 30, 30))
    [stats] = matching(gt, pred)
    assert (stats.tp, stats.fp, stats.fn) == (0, 1, 1)
    assert stats.f1 == stats.accuracy == 0.0
    assert mean_score_accuracy(gt, pred) == 0.0


def test_partial_overlap_is_exact():
    gt = squares((0, 0, 10, 10))  # 100 px
    pred = squares((0, 0, 10, 15))  # 150 px, 100 shared -> IoU 100/150
    assert iou_matrix(gt, pred)[0, 0] == pytest.approx(2 / 3)
    # matched at 0.5, 0.55, 0.6, 0.65 (4 of 10 thresholds); unmatched above: mSA = 4/10
    assert mean_score_accuracy(gt, pred) == pytest.approx(0.4)
    s50, s70 = matching(gt, pred, thresholds=(0.5, 0.7))
    assert (s50.tp, s70.tp, s70.fp, s70.fn) == (1, 0, 1, 1)
    assert s70.accuracy == 0.0 and s50.mean_matched_iou == pytest.approx(2 / 3)


def test_counts_with_extra_and_missed_cells():
    gt = squares((0, 0, 10, 10), (20, 0, 30, 10), (0, 20, 10, 30))
    pred = squares((0, 0, 10, 10), (20, 0, 30, 10), (30, 30, 38, 38), (32, 0, 38, 6))
    [s] = matching(gt, pred)
    assert (s.tp, s.fp, s.fn) == (2, 2, 1)
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(2 / 3)
    assert s.accuracy == pytest.approx(2 / 5)


def test_empty_images():
    empty = np.zeros((10, 10), np.int32)
    assert matching(empty, empty)[0].accuracy == 1.0
    assert matching(squares((0, 0, 3, 3), shape=(10, 10)), empty)[0].accuracy == 0.0


def test_semantic_scores_hand_computed():
    gt = squares((0, 0, 10, 10), shape=(20, 20))
    pred = squares((0, 0, 10, 5), shape=(20, 20))
    s = semantic_scores(gt, pred)
    assert s["foreground_iou"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(2 * 50 / 150)
    assert s["pixel_accuracy"] == pytest.approx(1 - 50 / 400)
    assert s["foreground_precision"] == 1.0 and s["foreground_recall"] == pytest.approx(0.5)
    assert semantic_scores(pred, gt)["foreground_precision"] == pytest.approx(0.5)
    # confluence: 50 of the annotated 100 pixels covered, off by half; twice the area, off by one
    assert s["confluence_error"] == pytest.approx(0.5) and semantic_scores(pred, gt)["confluence_error"] == 1.0
    # a miss and a false cell of the same size cancel in confluence, not in foreground IoU
    shifted = semantic_scores(gt, squares((10, 10, 20, 20), shape=(20, 20)))
    assert shifted["confluence_error"] == 0.0 and shifted["foreground_iou"] == 0.0


def test_coco_ap_of_ground_truth_is_exactly_one():
    gt = [squares((0, 0, 10, 10), (15, 15, 30, 30), (0, 30, 5, 40)), squares((5, 5, 25, 25))]
    rles = [labels_to_coco_rles(g) for g in gt]
    scores = [np.ones(len(r)) for r in rles]
    result = coco_ap(rles, [g.shape for g in gt], rles, scores)
    assert result == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}


def test_coco_ap_reads_at_2000_detections():
    """150 cells in one image: AP read at 100 detections would be capped well below 1."""
    lab = np.zeros((150, 200), np.int32)
    n = 0
    for y in range(0, 150, 10):
        for x in range(0, 100, 10):
            n += 1
            lab[y : y + 8, x : x + 8] = n
    assert n == 150
    rles = [labels_to_coco_rles(lab)]
    assert coco_ap(rles, [lab.shape], rles, [np.ones(n)])["ap"] == 1.0


def test_coco_ap_with_no_predictions_is_zero():
    gt = squares((0, 0, 10, 10))
    assert coco_ap([labels_to_coco_rles(gt)], [gt.shape], [[]], [np.array([])])["ap"] == 0.0
