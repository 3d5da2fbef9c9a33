"""One image's result in the forms people and lab tools use, made in one place for the batch job,
the service and the web page: a record (size, pixel size, count, confluence, measurements, COCO RLE
instances) and the files built from records (16-bit label PNG, CSV, COCO JSON, ImageJ ROI zip, QuPath
GeoJSON). Measurements are in pixels; where the image's pixel size is known (cellseg.pixelsize), µm
values are added beside them, and the record's `pixel_size` says which size and where it came from.
"""

from __future__ import annotations

import csv
import io
import operator
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cellseg.formats import cell_outlines, geojson_bytes, imagej_roi_zip, qupath_geojson
from cellseg.instances import confluence, instances_from_labels, label_png_bytes, measure_cells
from cellseg.measure import cell_runs
from cellseg.pixelsize import PHYSICAL_UNITS, PixelSize, add_physical_measurements

FORMATS = ("labels", "csv", "coco", "rois", "geojson")
CSV_FIELDS = ["image", "cell_id", "area", "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_width", "bbox_height",
              "perimeter", "eccentricity", "major_axis_length", "minor_axis_length", "solidity", "orientation",
              "mean_intensity", "score"]
# Columns after the pixel ones: the cells in µm and the size used, empty for an image whose pixel size
# is unknown. Always there, so every job's table has the same columns, and a CSV is written a record
# at a time (a job of tens of thousands of images never holds them all).
PHYSICAL_CSV_FIELDS = [*PHYSICAL_UNITS, "pixel_size_x_um", "pixel_size_y_um"]
CELLS_CSV_FIELDS = CSV_FIELDS + PHYSICAL_CSV_FIELDS
COCO_INFO = {"description": "cellseg segment"}
COCO_CATEGORIES = [{"id": 1, "name": "cell"}]


def cell_measurements(image: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
                      pixel_size: PixelSize | None = None, runs=None) -> list[dict]:
    """Every cell's measurements as records, CSVs and GeoJSON carry them: pixels, µm where the size is
    known, and the model's score where `scores` are given. `runs`: the labels' `cell_runs`, if found."""
    cells = add_physical_measurements(measure_cells(labels, image, runs), pixel_size)
    if scores is not None:
        for cell in cells:
            cell["score"] = round(float(scores[cell["cell_id"] - 1]), 4)
    return cells


def image_record(image: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, name: str, source: str,
                 pixel_size: PixelSize | None = None) -> dict:
    """Everything later outputs need from one segmented image, as plain JSON-able data. `pixel_size`
    is {"x_um", "y_um", "source"} or None (other outputs, e.g. time-lapse summaries, rely on that form)."""
    runs = cell_runs(labels)  # found once for the measurements and the instances
    cells = cell_measurements(image, labels, scores, pixel_size, runs)
    return {"source": source, "name": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
            "pixel_size": pixel_size.to_dict() if pixel_size else None,
            "count": len(cells), "confluence": round(confluence(labels), 3),  # cells present: ids may have gaps
            "cells": cells, "instances": instances_from_labels(labels, scores, runs)}


def per_image_files(labels: np.ndarray, record: dict, formats: Iterable[str]) -> dict[str, bytes]:
    """The requested per-image files (labels, rois, geojson) of one segmented image; the cells'
    outlines are traced once for both outline formats. The ROIs of a stack's page (the record's
    `page`: frames of a stack file, not time points that are files of their own) carry its position."""
    formats = list(formats)
    outlines = cell_outlines(labels) if {"rois", "geojson"} <= set(formats) else None
    encoders = {"labels": lambda: label_png_bytes(labels),
                "rois": lambda: imagej_roi_zip(labels, outlines, record.get("page")),
                "geojson": lambda: geojson_bytes(qupath_geojson(labels, record["cells"], outlines=outlines))}
    return {fmt: encoders[fmt]() for fmt in formats if fmt in encoders}


def cells_csv_header() -> bytes:
    return (",".join(CELLS_CSV_FIELDS) + "\r\n").encode()


def cells_csv_rows(record: dict) -> bytes:
    """The CSV rows of one record's cells, named by its `name` (records of earlier versions have no
    `pixel_size` key: no size)."""
    size = record.get("pixel_size") or {}
    blank = dict.fromkeys(CELLS_CSV_FIELDS) | {"image": record["name"], "pixel_size_x_um": size.get("x_um"),
                                               "pixel_size_y_um": size.get("y_um")}
    row = operator.itemgetter(*CELLS_CSV_FIELDS)
    text = io.StringIO()
    csv.writer(text).writerows(row(blank | cell) for cell in record["cells"])
    return text.getvalue().encode()


def cells_csv(records: Iterable[dict]) -> bytes:
    """One row per cell of every record (`cells_csv_rows`), under the header."""
    return cells_csv_header() + b"".join(cells_csv_rows(record) for record in records)


def coco_image(record: dict, image_id: int, label_file: str | None = None) -> dict:
    """A record's entry in a COCO document's images."""
    entry = {"id": image_id, "file_name": Path(record["source"]).name,
             "source": record["source"], "height": record["height"], "width": record["width"]}
    if label_file:
        entry["label_file"] = label_file
    if record.get("frame") is not None:  # frames of one stack share its file_name
        entry["frame"] = record["frame"]
    return entry


def coco_annotations(record: dict, image_id: int, first_id: int) -> list[dict]:
    """A record's cells as COCO annotations (RLE masks, scores), numbered from `first_id`."""
    return [{"id": first_id + index, "image_id": image_id, "category_id": 1, "iscrowd": 0,
             "segmentation": inst["rle"], "area": inst["area"], "bbox": inst["bbox"], "score": inst["score"]}
            for index, inst in enumerate(record["instances"])]


def coco_document(records: Iterable[dict], label_files: Iterable[str | None] | None = None) -> dict:
    """COCO results/annotations (RLE masks, scores) of every record's cells, one image entry each."""
    images, annotations = [], []
    records = list(records)
    label_files = list(label_files) if label_files is not None else [None] * len(records)
    for image_id, (record, label_file) in enumerate(zip(records, label_files), start=1):
        images.append(coco_image(record, image_id, label_file))
        annotations += coco_annotations(record, image_id, len(annotations) + 1)
    return {"info": COCO_INFO, "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
