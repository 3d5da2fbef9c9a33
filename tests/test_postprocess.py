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


# The fast paths below must give what the plain library calls give: skimage's watershed over the
# whole mask, and merges read from skimage's region adjacency graph (kept here as the reference).

def random_maps(seed: int, shape=(96, 128)) -> np.ndarray:
    """Smooth random (foreground, boundary, distance) maps with many touching blobs."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    maps = np.stack([ndi.gaussian_filter(rng.random(shape), sigma) for sigma in (3, 1.5, 4)])
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True)
    return maps.astype(np.float32)


def reference_merge(labels: np.ndarray, boundary: np.ndarray, threshold: float) -> np.ndarray:
    import networkx as nx
    from skimage import graph

    rag = graph.rag_boundary(labels, boundary.astype(np.float64))
    if 0 in rag:
        rag.remove_node(0)
    weak = nx.Graph((u, v) for u, v, d in rag.edges(data=True) if d["weight"] < threshold)
    lut = np.arange(labels.max() + 1, dtype=np.int32)
    for component in nx.connected_components(weak):
        lut[list(component)] = min(component)
    return lut[labels]


@pytest.mark.parametrize("seed", range(6))
def test_seeded_watershed_equals_skimage_watershed(seed):
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from cellseg.postprocess import seeded_watershed

    fg, _, dist = random_maps(seed)
    mask = fg > 0.35
    seeds, n = ndi.label((dist > 0.55) & mask)
    assert n >= 3
    expected = watershed(-dist, markers=seeds, mask=mask)
    assert np.array_equal(seeded_watershed(-dist, seeds, mask), expected)


@pytest.mark.parametrize("seed", range(6))
def test_border_merge_equals_skimage_rag(seed):
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from cellseg.postprocess import merge_weak_borders

    fg, boundary, dist = random_maps(seed)
    labels = watershed(-dist, markers=ndi.label(dist > 0.5)[0], mask=fg > 0.3).astype(np.int32)
    for threshold in (0.2, 0.4, 0.6):
        expected = reference_merge(labels, boundary, threshold)
        got = merge_weak_borders(labels, boundary, threshold)
        assert np.array_equal(got, expected)
    assert len(np.unique(merge_weak_borders(labels, boundary, 0.6))) < len(np.unique(labels))  # some merged


def test_postprocessing_unchanged_on_real_maps(onnx_model, demo_images):
    """The whole map-to-labels step equals the plain skimage version on real network outputs (float
    maps: with 8-bit maps, equal heights tie and skimage's heap orders ties among the seeds it starts
    from differently, which moves a few border pixels; docs/BENCHMARKS.md measures that)."""
    from scipy import ndimage as ndi
    from skimage.filters import apply_hysteresis_threshold
    from skimage.segmentation import watershed

    from cellseg.imageio import read_image
    from cellseg.inference import predict_padded
    from cellseg.preprocess import normalize
    from cellseg.targets import relabel_sequential

    params = onnx_model.default_params.without_rules()  # the watershed's cells; the rules have their own tests
    assert params.seed_peak > params.seed_threshold  # the shipped defaults use hysteresis seeds
    for probs in predict_padded(onnx_model.predict, [normalize(read_image(p)) for p in demo_images[:3]]):
        foreground = probs[0] > params.fg_threshold
        core = ndi.gaussian_filter(probs[2] * (1.0 - probs[1]), params.seed_sigma)
        seeds = (core > params.seed_threshold) & foreground
        if params.seed_peak:
            seeds = apply_hysteresis_threshold(np.where(foreground, core, 0), params.seed_threshold, params.seed_peak)
        cores = remove_small(ndi.label(seeds)[0], params.min_seed_size)
        labels = reference_merge(watershed(-probs[2], markers=cores, mask=foreground).astype(np.int32), probs[1],
                                 params.merge_threshold)
        orphans, n = ndi.label(foreground & (labels == 0))
        labels = np.where(orphans > 0, orphans + labels.max(), labels) if n else labels
        expected = relabel_sequential(remove_small(labels, params.min_size))
        assert np.array_equal(maps_to_labels(probs, params), expected)


def test_seed_peak_keeps_process_patches_from_seeding_cells_of_their_own():
    """An astrocyte-like cell: a round body (core score peaking at 0.9) with a long thin process
    whose score rises to 0.3 in a patch away from the body. With a plain threshold of 0.2 the patch
    seeds a second cell; with seed_peak 0.5 it does not, and the watershed floods the process from
    the body's seed, so the cell stays one."""
    from cellseg.postprocess import PostprocessParams, maps_to_labels

    h, w = 64, 128
    yy, xx = np.mgrid[:h, :w]
    body = (yy - 32) ** 2 + (xx - 24) ** 2 <= 14**2
    process = (np.abs(yy - 32) <= 2) & (xx >= 24) & (xx < 120)
    foreground = (body | process).astype(np.float32)
    distance = np.zeros((h, w), np.float32)
    distance[body] = (1 - np.sqrt((yy - 32) ** 2 + (xx - 24) ** 2) / 14)[body] * 0.9
    distance[process & ~body] = 0.1
    distance[process & (xx >= 80) & (xx < 100)] = 0.3  # a widening along the process
    probs = np.stack([foreground, np.zeros_like(distance), distance])
    plain = PostprocessParams(fg_threshold=0.5, seed_threshold=0.2, min_seed_size=3, seed_sigma=0, min_size=5)
    assert maps_to_labels(probs, plain).max() == 2  # the defect: the process patch is a cell
    labels = maps_to_labels(probs, plain.with_overrides(seed_peak=0.5))
    assert labels.max() == 1 and (labels > 0).sum() == (body | process).sum()


def test_seed_peak_keeps_every_real_cell():
    from cellseg.postprocess import PostprocessParams, maps_to_labels

    h, w = 64, 96
    yy, xx = np.mgrid[:h, :w]
    probs = np.zeros((3, h, w), np.float32)
    for cx in (20, 48, 76):  # three touching round cells, each peaking at 0.8
        r = np.sqrt((yy - 32) ** 2 + (xx - cx) ** 2)
        inside = r <= 14
        probs[0][inside] = 1
        probs[2][inside] = np.maximum(probs[2][inside], (1 - r / 14)[inside] * 0.8)
    params = PostprocessParams(fg_threshold=0.5, seed_threshold=0.2, seed_sigma=0, seed_peak=0.5)
    assert maps_to_labels(probs, params).max() == 3
    with pytest.raises(ValueError, match="seed_peak"):
        params.with_overrides(seed_peak=1.0)
