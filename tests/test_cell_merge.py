"""Merging touching cells that a lab's annotations say are one (cellseg.cell_merge, train.cell_rules)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest

from cellseg.cell_merge import PAIR_FEATURES, CellMerge, merge_pairs, pair_features
from cellseg.postprocess import PostprocessParams, maps_to_labels

PARAMS = PostprocessParams(fg_threshold=0.5, seed_threshold=0.5, seed_sigma=0, min_seed_size=3, min_size=5)
SHAPE = (64, 160)


def two_lobes(probs: np.ndarray, gt: np.ndarray, left: tuple[int, int], gap: int, radius: int, one_cell: bool,
              next_label: int) -> int:
    """Two overlapping disks whose distance map peaks twice (the watershed cuts them apart): one cell
    with no boundary between its lobes, or two cells with a strong boundary where they meet."""
    ys, xs = np.indices(SHAPE)
    right = (left[0], left[1] + gap)
    d_left = 1 - np.hypot(ys - left[0], xs - left[1]) / radius
    d_right = 1 - np.hypot(ys - right[0], xs - right[1]) / radius
    inside = (d_left > 0) | (d_right > 0)
    probs[0][inside] = 0.95
    probs[2] = np.maximum(probs[2], np.where(inside, np.maximum(d_left, d_right), 0))
    if one_cell:
        gt[inside] = next_label
        return next_label + 1
    border = inside & (np.abs(d_left - d_right) < 0.12)
    probs[1][border] = 0.9
    gt[inside & (d_left >= d_right)] = next_label
    gt[inside & (d_left < d_right)] = next_label + 1
    return next_label + 2


@dataclass
class Annotated:
    gt: np.ndarray

    def labels(self) -> np.ndarray:
        return self.gt


def lobed_images(n: int, seed: int = 0):
    """Each image: two lobed cells (one annotated cell each) and two touching pairs of distinct cells."""
    rng = np.random.default_rng(seed)
    samples, maps = [], []
    for _ in range(n):
        probs, gt = np.zeros((3, *SHAPE), np.float32), np.zeros(SHAPE, np.int32)
        label = 1
        for k, one_cell in enumerate((True, False, True, False)):
            radius = int(rng.integers(9, 12))
            label = two_lobes(probs, gt, (32, 18 + 38 * k), int(rng.integers(radius + 2, radius + 5)), radius, one_cell, label)
        samples.append(Annotated(gt))
        maps.append(probs)
    return samples, maps


def test_pairs_and_their_border_figures():
    samples, maps = lobed_images(1)
    labels = maps_to_labels(maps[0], PARAMS)
    assert labels.max() == 8  # every lobe its own cell: the over-split to undo
    first, second, features = pair_features(labels, maps[0])
    assert len(first) == 4 and np.all(first < second) and features.shape == (4, len(PAIR_FEATURES))
    boundary = dict(zip(PAIR_FEATURES, features.T))["border_boundary"]
    assert sorted(np.round(boundary, 1))[:2] == [0.0, 0.0] and np.all(np.sort(boundary)[2:] > 0.3)


def test_merging_pairs_makes_chains_one_cell_numbered_in_order():
    labels = np.array([[1, 2, 3, 4, 5]], np.int32)
    merged = merge_pairs(labels, np.array([1, 2, 4]), np.array([2, 3, 5]), np.array([True, True, False]))
    assert merged.tolist() == [[1, 1, 1, 2, 3]]
    assert merge_pairs(labels, np.array([1]), np.array([2]), np.array([False])) is labels


def test_a_merge_rule_in_the_parameters_joins_what_it_rates_one_cell_and_travels_as_json():
    samples, maps = lobed_images(1)
    n = len(PAIR_FEATURES)
    # P(one cell) = sigmoid(-20 * (border_boundary - 0.3)): lobes with no boundary merge, walled pairs do not
    coef = tuple(-20.0 if name == "border_boundary" else 0.0 for name in PAIR_FEATURES)
    rule = CellMerge((0.0,) * n, (1.0,) * n, coef, 6.0, 0.5)
    params = replace(PARAMS, cell_merge=rule)
    labels = maps_to_labels(maps[0], params)
    assert labels.max() == 6 and set(np.unique(labels)) == set(range(7))
    assert np.array_equal(labels > 0, samples[0].gt > 0)
    again = PostprocessParams(**json.loads(json.dumps(params.to_dict())))
    assert again == params and isinstance(again.cell_merge, CellMerge)
    with pytest.raises(ValueError, match="fit it again"):
        PostprocessParams(cell_merge={**rule.to_dict(), "features": list(PAIR_FEATURES[:-1]) + ["other"]})


def test_fitting_learns_which_touching_cells_are_one_from_annotations():
    pytest.importorskip("sklearn")
    from cellseg.matching import mean_score_accuracy
    from train.cell_rules import fit_cell_merge, one_annotated_cell

    samples, maps = lobed_images(6)
    labels = maps_to_labels(maps[0], PARAMS)
    first, second, _ = pair_features(labels, maps[0])
    assert one_annotated_cell(samples[0].gt, labels, first, second).sum() == 2  # the two lobed cells' halves

    fit = fit_cell_merge(samples, maps, PARAMS)
    assert fit.rule is not None and fit.gain > 0.2, fit.to_dict()
    test_samples, test_maps = lobed_images(2, seed=1)
    merged = [maps_to_labels(m, replace(PARAMS, cell_merge=fit.rule)) for m in test_maps]
    assert [lab.max() for lab in merged] == [6, 6]
    assert all(mean_score_accuracy(s.gt, lab) > 0.9 for s, lab in zip(test_samples, merged))


def test_finetune_picks_the_merge_first_and_the_filter_judges_merged_cells():
    pytest.importorskip("torch")
    from train.finetune import Split, pick_cell_rules

    samples, maps = lobed_images(6)
    held, held_maps = lobed_images(2, seed=1)
    params, rules = pick_cell_rules(Split(samples, held), maps, held_maps, PARAMS)
    assert rules["cell_merge"].kept and params.cell_merge is not None, rules["cell_merge"].reason
    # after merging every cut cell matches an annotated one: nothing for a filter to learn
    assert not rules["cell_filter"].kept and "too few examples" in rules["cell_filter"].reason
    assert params.cell_filter is None and replace(params, cell_merge=None) == PARAMS


def test_a_base_that_carries_rules_is_what_the_labs_rules_must_beat():
    """A lab's rule replaces the base's only where it beats the base's own (a base with rules: the
    shipped model may carry them); here the base's merge is already right, so it stays."""
    pytest.importorskip("torch")
    from train.cell_rules import fit_cell_merge
    from train.finetune import Split, pick_cell_rules

    samples, maps = lobed_images(6)
    base_rule = fit_cell_merge(samples, maps, PARAMS).rule
    base = replace(PARAMS, cell_merge=base_rule)
    refit = fit_cell_merge(samples, maps, base)
    # the figure to beat is the base's merge (every lobed cell whole: mSA 1), not no merge (about 0.6)
    assert refit.msa_without == pytest.approx(1.0) and refit.gain <= 0
    held, held_maps = lobed_images(2, seed=1)
    params, rules = pick_cell_rules(Split(samples, held), maps, held_maps, base)
    assert params.cell_merge == base_rule and not rules["cell_merge"].kept
    assert "(the base's stays)" in rules["cell_merge"].reason
