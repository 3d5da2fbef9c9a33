"""The per-cell filter a lab's annotations teach (cellseg.cell_filter, train.cell_filter)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest

from cellseg.cell_filter import FEATURES, CellFilter, cell_features
from cellseg.postprocess import PostprocessParams, maps_to_labels


def disk(shape, centre, radius) -> np.ndarray:
    ys, xs = np.indices(shape)
    return (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 <= radius**2


def maps_of(cells: list[tuple[tuple[int, int], int, float]], shape=(96, 96)) -> np.ndarray:
    """(3, H, W) maps with one round cell per (centre, radius, foreground probability): a distance map
    peaking at each centre, no boundary."""
    probs = np.zeros((3, *shape), np.float32)
    ys, xs = np.indices(shape)
    for centre, radius, fg in cells:
        inside = disk(shape, centre, radius)
        probs[0][inside] = fg
        distance = 1 - np.hypot(ys - centre[0], xs - centre[1]) / radius
        probs[2] = np.maximum(probs[2], np.where(inside, distance, 0))
    return probs


def weighing(feature: str, weight: float, intercept: float, cutoff: float) -> CellFilter:
    """A filter that looks at one raw feature only: P = sigmoid(weight * value + intercept)."""
    n = len(FEATURES)
    coef = [weight if name == feature else 0.0 for name in FEATURES]
    return CellFilter((0.0,) * n, (1.0,) * n, tuple(coef), intercept, cutoff)


PARAMS = PostprocessParams(fg_threshold=0.5, seed_threshold=0.3, min_size=5)


def test_features_describe_each_cell_in_label_order():
    probs = maps_of([((30, 30), 10, 0.95), ((70, 80), 5, 0.7)])
    labels = maps_to_labels(probs, PARAMS)
    assert labels.max() == 2
    f = dict(zip(FEATURES, cell_features(labels, probs).T))
    areas = np.bincount(labels.ravel())[1:]
    assert np.allclose(f["log_area"], np.log(areas))
    assert np.allclose(f["foreground_mean"], [0.95, 0.7], atol=1e-6)
    assert np.allclose(f["on_image_border"], 0) and np.all(f["elongation"] < 0.1)  # round, inside
    assert np.allclose(f["ring_cells"], 0)  # nothing touches them
    assert cell_features(np.zeros((8, 8), np.int32), np.zeros((3, 8, 8), np.float32)).shape == (0, len(FEATURES))


def test_a_filter_in_the_parameters_drops_the_cells_it_rates_unlikely_and_renumbers():
    probs = maps_of([((30, 30), 10, 0.95), ((70, 80), 5, 0.7), ((75, 20), 8, 0.9)])
    assert maps_to_labels(probs, PARAMS).max() == 3
    # P(annotated) = sigmoid(40 * (foreground_mean - 0.8)): 0.98 for sure cells, 0.002 for the faint one
    params = replace(PARAMS, cell_filter=weighing("foreground_mean", 40.0, -32.0, 0.5))
    labels = maps_to_labels(probs, params)
    assert labels.max() == 2 and set(np.unique(labels)) == {0, 1, 2}
    assert labels[70, 80] == 0 and labels[30, 30] > 0 and labels[75, 20] > 0


def test_the_filter_travels_through_json_metadata_and_stays_hashable():
    params = replace(PARAMS, cell_filter=weighing("log_area", 2.0, -7.0, 0.3))
    again = PostprocessParams(**json.loads(json.dumps(params.to_dict())))
    assert again == params and isinstance(again.cell_filter, CellFilter)
    assert len({params, again}) == 1  # candidate lists de-duplicate parameter sets with dict.fromkeys
    assert PostprocessParams(**json.loads(json.dumps(PARAMS.to_dict()))).cell_filter is None
    # no None anywhere: BentoML's model store refuses it in metadata (a fine-tuned model without rules
    # could not be registered: caught by test_finetune's two-minute run)
    assert None not in PARAMS.to_dict().values() and "cell_filter" not in PARAMS.to_dict()
    assert again.with_overrides(fg_threshold=0.6).cell_filter == params.cell_filter  # a request's thresholds keep it


@pytest.mark.parametrize("change, message", [
    ({"features": FEATURES[:-1] + ("perimeter",)}, "fit it again"),
    ({"coef": (1.0,) * 3}, "needs"),
    ({"cutoff": 1.0}, "cutoff"),
    ({"scale": (0.0,) * len(FEATURES)}, "non-positive"),
])
def test_a_filter_fitted_on_other_features_or_broken_is_refused(change, message):
    values = {**weighing("log_area", 1.0, 0.0, 0.5).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        PostprocessParams(cell_filter=values)


@dataclass
class Annotated:
    """What train.cell_filter reads of a Sample: its true cells."""

    gt: np.ndarray

    def labels(self) -> np.ndarray:
        return self.gt


def debris_images(n: int, seed: int = 0):
    """Images with three annotated cells (radius 9-12, sure) and three faint debris blobs (radius 3-4)
    the annotators left out: the filter has to learn that small faint cells are not cells."""
    rng = np.random.default_rng(seed)
    samples, maps = [], []
    for _ in range(n):
        cells = [((20 + 28 * i, 24), int(rng.integers(9, 13)), float(rng.uniform(0.85, 0.99))) for i in range(3)]
        debris = [((15 + 30 * i, 75), int(rng.integers(3, 5)), float(rng.uniform(0.55, 0.7))) for i in range(3)]
        gt = np.zeros((96, 96), np.int32)
        for k, (centre, radius, _) in enumerate(cells, 1):
            gt[disk(gt.shape, centre, radius)] = k
        samples.append(Annotated(gt))
        maps.append(maps_of(cells + debris))
    return samples, maps


def test_fitting_learns_to_drop_what_the_annotators_left_out():
    pytest.importorskip("sklearn")
    from train.cell_rules import fit_cell_filter

    samples, maps = debris_images(6)
    fit = fit_cell_filter(samples, maps, PARAMS)
    assert fit.rule is not None and fit.msa_without == pytest.approx(0.5, abs=0.05)  # 3 true of 6 cut
    assert fit.gain > 0.3  # each image filtered by a fit on the other five: the debris goes
    test_samples, test_maps = debris_images(2, seed=1)
    filtered = [maps_to_labels(m, replace(PARAMS, cell_filter=fit.rule)) for m in test_maps]
    assert [labels.max() for labels in filtered] == [3, 3]
    assert all(np.array_equal(labels > 0, s.gt > 0) for labels, s in zip(filtered, test_samples))


def test_fitting_weighs_the_features_it_is_given():
    """fit_cell_filter's `kind` and `featurize` (scripts/finetune_probes.py's image features): the rule
    learns from those figures alone, so a column position that parts cells from debris teaches it and
    a constant teaches nothing."""
    pytest.importorskip("sklearn")
    from dataclasses import dataclass
    from typing import ClassVar

    from scipy import ndimage as ndi

    from cellseg.cell_filter import CellFilter
    from train.cell_rules import fit_cell_filter

    @dataclass(frozen=True)
    class ColumnFilter(CellFilter):
        features: tuple[str, ...] = ("column",)
        FEATURES: ClassVar[tuple[str, ...]] = ("column",)

    def column(sample, labels, maps):
        ids = np.arange(1, int(labels.max()) + 1)
        return np.array([[c[1]] for c in ndi.center_of_mass(labels > 0, labels, ids)]).reshape(-1, 1)

    samples, maps = debris_images(6)
    fit = fit_cell_filter(samples, maps, PARAMS, kind=ColumnFilter, featurize=column)
    assert isinstance(fit.rule, ColumnFilter) and len(fit.rule.coef) == 1 and fit.gain > 0.3
    blind = fit_cell_filter(samples, maps, PARAMS, kind=ColumnFilter,
                            featurize=lambda sample, labels, maps: np.zeros((int(labels.max()), 1)))
    assert blind.gain < 0.01


def test_too_few_unannotated_cells_fit_no_filter():
    pytest.importorskip("sklearn")
    from train.cell_rules import fit_cell_filter

    samples, maps = debris_images(1)
    fit = fit_cell_filter(samples, maps, PARAMS)
    assert fit.rule is None and "too few examples" in fit.reason and fit.gain == 0


def debris_annotated(samples, maps):
    """The same images with the debris annotated too: where the filter would drop annotated cells."""
    out = []
    for probs in maps:
        labels = maps_to_labels(probs, PARAMS)
        out.append(Annotated(labels))
    return out


def test_finetune_keeps_the_filter_only_where_the_held_back_images_confirm_it():
    pytest.importorskip("torch")
    from train.cell_rules import fit_cell_filter
    from train.finetune import Split, pick_rule

    def pick_cell_filter(split, maps, held_maps, params):
        return pick_rule("cell_filter", fit_cell_filter(split.train, maps, params), split, held_maps, params)

    samples, maps = debris_images(6)
    held, held_maps = debris_images(2, seed=1)
    kept = pick_cell_filter(Split(samples, held), maps, held_maps, PARAMS)
    assert kept.kept and kept.params.cell_filter is not None and "confirmed on the held-back" in kept.reason
    assert kept.fit["held_back_msa"]["with"] > kept.fit["held_back_msa"]["without"]
    assert replace(kept.params, cell_filter=None) == PARAMS  # the thresholds' choice is left as it was

    refuted = pick_cell_filter(Split(samples, debris_annotated(held, held_maps)), maps, held_maps, PARAMS)
    assert not refuted.kept and refuted.params == PARAMS and "did not confirm" in refuted.reason

    unconfirmed = pick_cell_filter(Split(samples, []), maps, None, PARAMS)
    assert not unconfirmed.kept and "no held-back image" in unconfirmed.reason

    nothing_to_learn = pick_cell_filter(Split(debris_annotated(samples, maps), held), maps, held_maps, PARAMS)
    assert not nothing_to_learn.kept and "too few examples" in nothing_to_learn.reason


def test_second_moments_in_row_blocks_equal_the_whole_image_computation():
    """Coordinates are summed a block of rows at a time (memory); the result is the plain formula's."""
    from cellseg.cell_filter import BLOCK_ROWS, second_moments

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(BLOCK_ROWS * 2 + 37, 90)).astype(np.int32)
    ys, xs = np.indices(labels.shape, dtype=np.float64)
    expected = []
    for k in range(1, 6):
        y, x = ys[labels == k], xs[labels == k]
        expected.append((y.var(), x.var(), ((y - y.mean()) * (x - x.mean())).mean()))
    assert np.allclose(np.stack(second_moments(labels, 5), axis=1), expected, rtol=1e-9, atol=1e-6)


def test_segmentation_keeps_the_filters_scores_from_its_cut():
    """from_maps scores the kept cells with the probabilities the filter computed while cutting (the
    features once, not twice, and every score at or above the cutoff it was kept by); here, with no
    neighbours to remove, the same as computing them afresh on the kept cells."""
    from cellseg.inference import Segmentation

    probs = maps_of([((30, 30), 10, 0.95), ((70, 80), 5, 0.7), ((75, 20), 8, 0.9)])
    params = replace(PARAMS, cell_filter=weighing("foreground_mean", 40.0, -32.0, 0.5))
    seg = Segmentation.from_maps(probs, params)
    assert np.array_equal(seg.labels, maps_to_labels(probs, params)) and seg.count == 2
    assert seg.filter_scores is not None
    assert np.allclose(seg.scores(), params.cell_filter.probabilities(seg.labels, seg.probs))
    assert np.allclose(Segmentation(seg.labels, probs, params.cell_filter).scores(), seg.scores())


def test_label_maxima_equal_scipys_with_absent_labels_and_label_zero_ignored():
    """One shared sort instead of scipy's sort per call (cellseg.cell_filter.label_maxima): the same
    numbers for every cell, 0 for a label without pixels, background never counted."""
    from scipy import ndimage as ndi

    from cellseg.cell_filter import label_maxima

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 40, (64, 48)).astype(np.int32)
    labels[labels == 7] = 0  # label 7 absent, inside the range
    labels[0, 0], background = 0, rng.random((64, 48)).astype(np.float32)
    background[labels == 0] = 5.0  # higher than any cell's value: must not leak into a cell
    values = [background, rng.random((64, 48))]
    count = 45  # labels 40..45 absent at the end
    for got, value in zip(label_maxima(labels, count, *values), values):
        expected = ndi.maximum(value, labels, np.arange(1, count + 1))
        expected[[6, *range(39, 45)]] = 0
        np.testing.assert_array_equal(got, expected)
    assert all(len(m) == 0 for m in label_maxima(np.zeros((4, 4), np.int32), 0, values[0][:4, :4]))


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("high", [40, 70_000])  # 16-bit passes, and the labels that do not fit them
@pytest.mark.parametrize("shape", [(37, 29), (1, 12), (12, 1), (2, 2)])
def test_square_extreme_equals_scipys_filters(size, high, shape):
    """cellseg.cell_filter.square_extreme replaces scipy's maximum/minimum filters on label images
    (the ring of cell_features, the borders of cell_merge): the same numbers, borders included."""
    from scipy import ndimage as ndi

    from cellseg.cell_filter import square_extreme

    labels = np.random.default_rng(size + high).integers(0, high, shape).astype(np.int32)
    for extreme, reference in ((np.maximum, ndi.maximum_filter), (np.minimum, ndi.minimum_filter)):
        got = square_extreme(labels, size, extreme)
        assert got.dtype == labels.dtype
        np.testing.assert_array_equal(got, reference(labels, size=size))


def test_cell_features_over_row_blocks_equal_a_per_cell_computation():
    """cell_features gathers the cells' and rings' pixels a block of rows at a time; each feature is
    what a plain per-cell computation over the whole image gives, on cells spanning blocks."""
    from cellseg.cell_filter import BLOCK_ROWS, RING_WIDTH

    rng = np.random.default_rng(5)
    shape = (BLOCK_ROWS * 2 + 40, 70)
    probs = rng.random((3, *shape)).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    for k, (top, left, h, w) in enumerate([(0, 0, 30, 20), (BLOCK_ROWS - 10, 5, 40, 50), (300, 30, 200, 25),
                                          (shape[0] - 12, 60, 12, 10), (100, 40, 6, 6)], start=1):
        labels[top:top + h, left:left + w] = k
    labels[BLOCK_ROWS - 10:BLOCK_ROWS + 30:3, 5:55] = 0  # holes: ring pixels inside a cell's box
    got = dict(zip(FEATURES, cell_features(labels, probs).T))
    ys, xs = np.indices(shape)

    def near(mask: np.ndarray) -> np.ndarray:  # pixels within RING_WIDTH (a square) of the mask
        padded, r = np.pad(mask, RING_WIDTH), RING_WIDTH
        return np.any([np.roll(padded, (dy, dx), axis=(0, 1))[r:-r, r:-r]
                       for dy in range(-r, r + 1) for dx in range(-r, r + 1)], axis=0)

    for k in range(1, labels.max() + 1):
        cell = labels == k
        # a ring pixel belongs to the highest label within reach (the filter's maximum): k's ring is
        # near k, under a lower label (or none), with no higher label within reach
        ring = near(cell) & (labels < k) & ~near(labels > k)
        y, x = ys[cell].astype(float), xs[cell].astype(float)
        cov = np.cov(np.stack([y, x]), bias=True)
        major, minor = np.sort(np.linalg.eigvalsh(cov))[::-1]
        box = (y.max() - y.min() + 1) * (x.max() - x.min() + 1)
        maps = probs.astype(np.float64)  # the features sum in float64
        expected = {"log_area": np.log(cell.sum()), "foreground_mean": maps[0][cell].mean(),
                    "boundary_mean": maps[1][cell].mean(), "distance_max": maps[2][cell].max(),
                    "distance_mean": maps[2][cell].mean(), "ring_foreground": maps[0][ring].mean(),
                    "ring_boundary": maps[1][ring].mean(), "ring_cells": (labels[ring] > 0).mean(),
                    "elongation": 1 - np.sqrt(max(minor, 0) / major), "extent": cell.sum() / box,
                    "on_image_border": float(y.min() == 0 or x.min() == 0 or y.max() == shape[0] - 1 or x.max() == shape[1] - 1)}
        for name, value in expected.items():
            assert got[name][k - 1] == pytest.approx(value, rel=1e-9, abs=1e-9), (k, name)


def test_a_base_filter_the_labs_images_refute_is_dropped():
    """Issue 29: no filter at all is a candidate where the base carries one. These annotators drew
    the faint blobs too; the base's filter drops them (mSA 0.5 against 1.0 without it) and nothing
    is left for a lab's filter to learn, so the base's goes, the held-back images agreeing."""
    pytest.importorskip("torch")
    from train.cell_rules import fit_cell_filter
    from train.finetune import Split, pick_rule

    samples, maps = debris_images(6)
    held, held_maps = debris_images(2, seed=1)
    annotated, held_annotated = debris_annotated(samples, maps), debris_annotated(held, held_maps)
    base = replace(PARAMS, cell_filter=weighing("foreground_mean", 40.0, -32.0, 0.5))  # drops the faint ones
    fit = fit_cell_filter(annotated, maps, base)
    assert fit.rule is None and fit.msa_no_rule == pytest.approx(1.0) and fit.msa_without == pytest.approx(0.5, abs=0.05)
    choice = pick_rule("cell_filter", fit, Split(annotated, held_annotated), held_maps, base)
    assert choice.params == PARAMS and "the base's cell filter dropped" in choice.reason, choice.reason
    assert choice.fit["held_back_msa"]["with"] > choice.fit["held_back_msa"]["without"]
    # where the lab's images agree with the base's filter, it stays
    kept = pick_rule("cell_filter", fit_cell_filter(samples, maps, base), Split(samples, held), held_maps, base)
    assert kept.params.cell_filter == base.cell_filter, kept.reason
