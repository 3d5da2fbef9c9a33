"""ImageJ ROI sets and QuPath GeoJSON: read back with their own libraries, rasterised, they match the cells."""

import io
import zipfile

import numpy as np
import pytest
from skimage.draw import polygon2mask

from cellseg.formats import cell_outlines, imagej_roi_zip, qupath_geojson
from cellseg.instances import measure_cells
from conftest import disc

roifile = pytest.importorskip("roifile")
shapely = pytest.importorskip("shapely")


def mask_from_xy(xy: np.ndarray, shape) -> np.ndarray:
    """Fill a corner-origin (x, y) polygon by pixel centres, as ImageJ and QuPath do."""
    rc = np.column_stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5])
    return polygon2mask(shape, rc)


def iou(a, b) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.fixture
def labels() -> np.ndarray:
    shape = (120, 160)
    out = np.zeros(shape, np.int32)
    out[disc(shape, (30, 30), 14)] = 1
    out[disc(shape, (60, 100), 25)] = 2
    out[80:110, 10:40] = 3  # a square: corners must survive
    ring = disc(shape, (95, 130), 18) & ~disc(shape, (95, 130), 7)
    out[ring] = 4  # a cell with a hole: the outline is its outer edge
    return out


def check_outlines(outlines: dict[int, np.ndarray], labels: np.ndarray, min_iou=0.95) -> None:
    for cell_id, xy in outlines.items():
        truth = labels == cell_id
        filled = mask_from_xy(xy, labels.shape)
        if cell_id == 4:  # hole filled
            truth = truth | (filled & (labels == 0))
        assert iou(filled, truth) >= min_iou, (cell_id, iou(filled, truth))


def test_outlines_rasterise_back_to_the_cells(labels):
    outlines = cell_outlines(labels)
    assert sorted(outlines) == [1, 2, 3, 4]
    check_outlines(outlines, labels)


def test_imagej_roi_set_reads_back_with_roifile(labels, tmp_path):
    data = imagej_roi_zip(labels)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert len(names) == 4 and all(n.endswith(".roi") for n in names)
    path = tmp_path / "RoiSet.zip"
    path.write_bytes(data)
    rois = roifile.roiread(path)
    assert [r.name for r in rois] == [f"cell-{i:05d}" for i in (1, 2, 3, 4)]
    check_outlines({int(r.name.split("-")[1]): r.coordinates() for r in rois}, labels)


def test_qupath_geojson_is_valid_detections_with_measurements(labels):
    from shapely.geometry import shape as to_shape

    collection = qupath_geojson(labels, measure_cells(labels))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 4
    for feature in collection["features"]:
        props = feature["properties"]
        assert feature["geometry"]["type"] == "Polygon" and props["objectType"] == "detection"
        assert props["classification"]["name"] == "Cell" and props["measurements"]["area"] > 0
        polygon = to_shape(feature["geometry"])
        assert polygon.is_valid
        xy = np.asarray(polygon.exterior.coords)
        check_outlines({props["cell_id"]: xy}, labels)
        # the polygon's area is the cell's pixel count, to within the corner cutting of the outline
        assert polygon.area == pytest.approx(props["measurements"]["area"], rel=0.1) or props["cell_id"] == 4


def test_empty_image_gives_empty_outputs():
    empty = np.zeros((40, 40), np.int32)
    assert zipfile.ZipFile(io.BytesIO(imagej_roi_zip(empty))).namelist() == []
    assert qupath_geojson(empty)["features"] == []


@pytest.mark.data
def test_real_segmentation_round_trips(onnx_model, demo_images):
    from cellseg.imageio import read_image

    tif = next(p for p in demo_images if p.suffix == ".tif")
    labels = onnx_model.segment([read_image(tif)])[0].labels
    outlines = cell_outlines(labels)
    assert len(outlines) == labels.max()
    ious = np.array([iou(mask_from_xy(xy, labels.shape), labels == i) for i, xy in outlines.items()])
    assert ious.min() >= 0.95, np.sort(ious)[:5]  # every cell, as ImageJ/QuPath would fill it


def test_label_png_refuses_more_cells_than_16_bits_hold():
    from cellseg.instances import TooManyCellsError, label_png_bytes

    labels = np.arange(70_000, dtype=np.int32).reshape(280, 250)  # 69,999 cells of one pixel
    with pytest.raises(TooManyCellsError, match="69,999 cells do not fit a 16-bit label PNG"):
        label_png_bytes(labels)
    assert label_png_bytes(np.minimum(labels, 65_535))[:8] == b"\x89PNG\r\n\x1a\n"
