"""The web page's report: every download decodes to the same cells as the label image it came from."""

import base64
import csv
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cellseg.report import page_report
from conftest import disc


def decode(report: dict, key: str) -> bytes:
    return base64.b64decode(report["downloads"][key]["base64"])


def test_report_downloads_match_labels():
    shape = (90, 120)
    labels = np.zeros(shape, np.int32)
    labels[disc(shape, (30, 30), 12)] = 1
    labels[disc(shape, (50, 80), 20)] = 2
    image = (labels > 0) * 30000 + 1000  # 16-bit, as a TIFF from a microscope
    scores = np.array([0.9, 0.75])

    report = page_report(image.astype(np.uint16), labels, scores, "plate 3/well_A1.tif")

    assert (report["count"], report["width"], report["height"], report["name"]) == (2, 120, 90, "well_A1")
    assert [c["score"] for c in report["cells"]] == [0.9, 0.75]
    # the page labels measurements with these units: each names a measurement the cells have
    assert report["units"]["area"] == "px²" and report["units"]["perimeter"] == "px"
    assert set(report["units"]) <= set(report["cells"][0])
    assert np.array_equal(np.array(Image.open(io.BytesIO(decode(report, "labels")))), labels)
    rows = list(csv.DictReader(io.StringIO(decode(report, "csv").decode())))
    assert [(r["image"], int(r["cell_id"]), int(r["area"])) for r in rows] == [
        ("well_A1", i, int((labels == i).sum())) for i in (1, 2)]
    coco = json.loads(decode(report, "coco"))
    assert coco["images"][0]["file_name"] == "well_A1.tif"
    for ann in coco["annotations"]:
        assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), labels == ann["id"])
    assert sorted(zipfile.ZipFile(io.BytesIO(decode(report, "rois"))).namelist()) == ["cell-00001.roi", "cell-00002.roi"]
    assert len(json.loads(decode(report, "geojson"))["features"]) == 2
    assert report["downloads"]["csv"]["filename"] == "well_A1_cells.csv"

    # the views: 8-bit gray image and two RGBA layers, transparent where there is no cell
    views = {k: np.array(Image.open(io.BytesIO(base64.b64decode(v.split(",", 1)[1])))) for k, v in report["views"].items()}
    assert views["image"].shape == shape and views["image"].dtype == np.uint8
    assert views["outlines"].shape == (*shape, 4) and views["filled"].shape == (*shape, 4)
    assert not views["filled"][labels == 0, 3].any() and views["filled"][labels > 0, 3].all()
    outline = views["outlines"][..., 3] > 0
    assert outline.any() and not outline[labels == 0].any()


def test_report_with_a_pixel_size_adds_micrometres_everywhere_and_keeps_pixels():
    """Issue 19: labs report areas in µm². The cells, the units, the CSV and the GeoJSON get µm values
    beside the pixel ones, and the report says which size it used and where from."""
    from cellseg.pixelsize import PixelSize

    shape = (90, 120)
    labels = np.zeros(shape, np.int32)
    labels[disc(shape, (30, 30), 12)] = 1
    labels[disc(shape, (50, 80), 20)] = 2
    image = ((labels > 0) * 200 + 20).astype(np.uint8)
    plain = page_report(image, labels, np.array([0.9, 0.75]), "well.tif")
    size = PixelSize(0.65, 0.65, "ImageJ metadata")
    report = page_report(image, labels, np.array([0.9, 0.75]), "well.tif", pixel_size=size)

    assert plain["pixel_size"] is None and "area_um2" not in plain["cells"][0] and "area_um2" not in plain["units"]
    assert report["pixel_size"] == {"x_um": 0.65, "y_um": 0.65, "source": "ImageJ metadata"}
    for cell, pixels in zip(report["cells"], plain["cells"]):
        assert {k: cell[k] for k in pixels} == pixels  # every pixel value unchanged
        assert cell["area_um2"] == pytest.approx(cell["area"] * 0.65**2, rel=1e-5)
        assert cell["perimeter_um"] == pytest.approx(cell["perimeter"] * 0.65, rel=1e-5)
        assert cell["major_axis_length_um"] == pytest.approx(cell["major_axis_length"] * 0.65, rel=1e-5)
    assert (report["units"]["area_um2"], report["units"]["perimeter_um"], report["units"]["area"]) == ("µm²", "µm", "px²")
    assert set(report["units"]) <= set(report["cells"][0])

    plain_rows = list(csv.DictReader(io.StringIO(decode(plain, "csv").decode())))
    rows = list(csv.DictReader(io.StringIO(decode(report, "csv").decode())))
    assert list(rows[0]) == list(plain_rows[0])  # the same columns, pixel ones first
    assert plain_rows[0]["area_um2"] == plain_rows[0]["pixel_size_x_um"] == ""
    assert float(rows[1]["area_um2"]) == pytest.approx(int(rows[1]["area"]) * 0.65**2, rel=1e-5)
    assert (rows[0]["pixel_size_x_um"], rows[0]["pixel_size_y_um"]) == ("0.65", "0.65")
    measurements = json.loads(decode(report, "geojson"))["features"][1]["properties"]["measurements"]
    assert measurements["area_um2"] == report["cells"][1]["area_um2"] and measurements["area"] == int(rows[1]["area"])


def test_cells_csv_of_images_with_and_without_a_pixel_size():
    """The µm columns are always there (every job's table alike), empty for images without a size."""
    from cellseg.outputs import cells_csv

    cell = {"cell_id": 1, "area": 10, "perimeter": 12.0}
    with_size = {"name": "a", "pixel_size": {"x_um": 0.5, "y_um": 0.5, "source": "given (--pixel-size)"},
                 "cells": [{**cell, "area_um2": 2.5, "perimeter_um": 6.0}]}
    without = {"name": "b", "pixel_size": None, "cells": [cell]}
    older = {"name": "c", "cells": [cell]}  # a record of an earlier version: no pixel_size key
    rows = list(csv.DictReader(io.StringIO(cells_csv([with_size, without, older]).decode())))
    assert [(r["image"], r["area"], r["area_um2"], r["pixel_size_x_um"]) for r in rows] == [
        ("a", "10", "2.5", "0.5"), ("b", "10", "", ""), ("c", "10", "", "")]
    assert next(csv.DictReader(io.StringIO(cells_csv([without, older]).decode())))["area_um2"] == ""
