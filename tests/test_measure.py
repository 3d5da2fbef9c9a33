"""cellseg.measure gives regionprops' numbers for every CSV column, computed for all cells at once."""

import numpy as np
import pytest
from skimage.measure import regionprops

from cellseg.measure import measure_cells

# mean intensity: float32 (skimage) vs float64 (ours) accumulation moves the 3rd decimal at most by 1
TOLERANCE = {"mean_intensity": 1.01e-3}


def reference(labels: np.ndarray, image: np.ndarray | None) -> list[dict]:
    """The regionprops version these measurements replaced (rounded the same way)."""
    rows = []
    for prop in regionprops(labels, intensity_image=image):
        y0, x0, y1, x1 = prop.bbox
        row = {"cell_id": int(prop.label), "area": int(prop.area),
               "centroid_x": round(float(prop.centroid[1]), 2), "centroid_y": round(float(prop.centroid[0]), 2),
               "bbox_x": int(x0), "bbox_y": int(y0), "bbox_width": int(x1 - x0), "bbox_height": int(y1 - y0),
               "perimeter": round(float(prop.perimeter), 2), "eccentricity": round(float(prop.eccentricity), 4),
               "major_axis_length": round(float(prop.axis_major_length), 2),
               "minor_axis_length": round(float(prop.axis_minor_length), 2),
               "solidity": round(float(prop.solidity), 4), "orientation": round(float(prop.orientation), 4)}
        if image is not None:
            row["mean_intensity"] = round(float(prop.intensity_mean), 3)
        rows.append(row)
    return rows


def assert_same(labels: np.ndarray, image: np.ndarray | None = None) -> None:
    ours, theirs = measure_cells(labels, image), reference(labels, image)
    assert [r["cell_id"] for r in ours] == [r["cell_id"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE.get(key, 1e-9)), (key, a["cell_id"], a[key], b[key])


def test_awkward_shapes():
    labels = np.zeros((40, 50), np.int32)
    labels[0, 0] = 1  # one pixel in the corner
    labels[5:8, 0:20] = 2  # a bar on the left edge
    labels[np.arange(10, 30), np.arange(10, 30)] = 3  # a one-pixel diagonal line
    labels[10:20, 35:45] = 4
    labels[13:17, 38:42] = 0  # a square with a hole
    labels[25:28, 35:38] = 5
    labels[32:35, 44:47] = 5  # one cell in two pieces
    labels[36:40, 46:50] = 7  # cell 6 missing; 7 in the bottom-right corner
    labels[30:34, 0:4] = 8
    labels[30:32, 4:6] = 8  # an L-shape, touching cell 9
    labels[32:36, 4:8] = 9
    image = np.random.default_rng(0).random(labels.shape).astype(np.float32) * 1000
    assert_same(labels, image)
    assert_same(labels)
    assert measure_cells(np.zeros((8, 8), np.int32)) == []


def test_cell_runs_give_exact_areas_boxes_and_moments():
    """Runs touching both image edges, absent labels, one-pixel runs: every sum equals the pixels' own."""
    from scipy import ndimage as ndi

    from cellseg.measure import cell_runs

    noise = ndi.gaussian_filter(np.random.default_rng(3).random((90, 110)), 3)
    labels = ndi.label(noise > np.quantile(noise, 0.6))[0].astype(np.int32)
    labels[:, -1] = labels.max() + 2  # a column on the right edge; the label before it is absent
    labels[0, :] = 1  # a row along the top, joining cell 1
    runs = cell_runs(labels)
    assert runs.count == labels.max()
    sums = runs.moments()
    for cell in range(1, runs.count + 1):
        rows, cols = np.nonzero(labels == cell)
        assert runs.present()[cell] == bool(len(rows))
        assert runs.areas()[cell] == len(rows)
        if not len(rows):
            continue
        assert [b[cell] for b in runs.boxes()] == [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
        expected = [rows.sum(), (rows * rows).sum(), (rows * cols).sum(), cols.sum(), (cols * cols).sum()]
        assert [int(s[cell]) for s in sums] == expected


def test_round_cells_orientation_ties():
    """A disc and a square have equal second moments on both axes: the orientation follows
    regionprops' tie rule exactly (integer moments, no rounding noise)."""
    yy, xx = np.mgrid[:30, :60]
    labels = ((yy - 15) ** 2 + (xx - 15) ** 2 <= 81).astype(np.int32)
    labels[10:20, 40:50] = 2
    assert_same(labels)


def test_random_blobs():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(1)
    noise = ndi.gaussian_filter(rng.random((120, 160)), 3)
    labels, _ = ndi.label(noise > np.quantile(noise, 0.6))
    assert labels.max() > 10
    assert_same(labels.astype(np.int32), rng.random(labels.shape).astype(np.float32))


@pytest.mark.data
def test_real_images_match_regionprops(data_root):
    """Every column on real annotations: LIVECell and all three Sartorius cell types."""
    from cellseg.data import load_split, subsample_per_type

    for sample in subsample_per_type(load_split(data_root, "val"), 2):
        assert_same(sample.labels(), sample.image())


def test_qhull_fallback_gives_the_same_hulls(monkeypatch):
    """The serving image has no OpenCV: SciPy's qhull must give the same convex areas."""
    import builtins

    from scipy import ndimage as ndi

    from cellseg import measure

    rng = np.random.default_rng(2)
    noise = ndi.gaussian_filter(rng.random((100, 140)), 2.5)
    labels = ndi.label(noise > np.quantile(noise, 0.55))[0].astype(np.int32)
    with_cv2 = measure.convex_areas(labels, int(labels.max()))
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("no OpenCV here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    np.testing.assert_array_equal(measure.convex_areas(labels, int(labels.max())), with_cv2)
    assert_same(labels)
