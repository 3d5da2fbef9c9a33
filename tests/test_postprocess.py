import numpy as np
import pytest

from cellseg.postprocess import PostprocessParams, maps_to_labels, remove_small
from cellseg.targets import make_targets
from conftest import disc


def test_two_touching_discs_come_out_as_two_cells():
    shape = (64, 96)
    a, b = disc(shape, (32, 34), 14), disc(shape, (32, 60), 14)  # overlapping: the union is one blob
    labels = np.zeros(shape, np.int32)
    labels[a] = 1
    labels[b & ~a] = 2
    from scipy import ndimage as ndi

    assert ndi.label(labels > 0)[1] == 1, "the two discs must touch for this test to mean anything"
    out = maps_to_labels(make_targets(labels))
    assert out.max() == 2
    # each predicted cell sits on one true cell
    for index in (1, 2):
        overlap = np.bincount(labels[out == index], minlength=3)[1:]
        assert overlap.max() / overlap.sum() > 0.95


def test_targets_channels():
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    fg, boundary, dist = make_targets(labels)
    assert fg.sum() == 400
    assert boundary.sum() == 400 - 16 * 16  # 2-px inner ring of a 20x20 square
    assert dist.max() == pytest.approx(1.0) and dist[labels == 0].max() == 0


def test_min_size_removes_small_cells():
    labels = np.zeros((50, 50), np.int32)
    labels[5:25, 5:25] = 1
    labels[40:43, 40:43] = 2  # 9 px
    maps = make_targets(labels)
    assert maps_to_labels(maps, PostprocessParams(min_size=20)).max() == 1
    assert maps_to_labels(maps, PostprocessParams(min_size=0, min_seed_size=1)).max() == 2
    assert remove_small(labels, 10).max() == 1


def test_foreground_without_seed_is_kept():
    probs = np.zeros((3, 30, 30), np.float32)
    probs[0, 5:20, 5:20] = 0.9  # foreground, but no core anywhere
    out = maps_to_labels(probs, PostprocessParams(min_size=10))
    assert out.max() == 1 and (out > 0).sum() == 225


@pytest.mark.parametrize("field,value", [("fg_threshold", 1.5), ("seed_threshold", 0.0), ("min_size", -1),
                                         ("seed_sigma", -1.0)])
def test_invalid_params_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        PostprocessParams(**{field: value}).validate()


def test_overrides_replace_only_what_is_given_and_are_validated():
    base = PostprocessParams(seed_threshold=0.3, min_seed_size=10)
    merged = base.with_overrides(fg_threshold=0.6, seed_threshold=None, min_size=None)
    assert merged == PostprocessParams(fg_threshold=0.6, seed_threshold=0.3, min_seed_size=10)
    with pytest.raises(ValueError, match="fg_threshold"):
        base.with_overrides(fg_threshold=2.0)


def test_weak_borders_merge_and_strong_ones_do_not():
    from cellseg.postprocess import merge_weak_borders

    labels = np.zeros((40, 60), np.int32)
    labels[5:35, 5:30] = 1
    labels[5:35, 30:55] = 2  # touches cell 1 along x = 29/30
    boundary = np.zeros(labels.shape, np.float32)
    # no boundary between them: one lobed cell split by the watershed -> merged
    merged = merge_weak_borders(labels, boundary, 0.4)
    assert set(np.unique(merged)) == {0, 1} and (merged > 0).sum() == (labels > 0).sum()
    # a real boundary between them: two cells stay two
    boundary[:, 28:32] = 0.9
    assert set(np.unique(merge_weak_borders(labels, boundary, 0.4))) == {0, 1, 2}
    # off by default
    assert merge_weak_borders(labels, np.zeros_like(boundary), 0.0) is labels
