"""The web page's report: every download decodes to the same cells as the label image it came from."""

import base64
import csv
import io
import json
import zipfile

import numpy as np
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
