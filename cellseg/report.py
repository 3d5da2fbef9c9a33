"""One image's complete result for the web page: what it shows (rendered views, count, confluence,
per-cell measurements, the pixel size used) and every download it offers, from one segmentation, so
what a person downloads is exactly what is on screen. Formats and the summary row come from
`cellseg.outputs` and `cellseg.summary`, as in batch jobs, so that the page's tables of many images
equal a batch job's.
"""

from __future__ import annotations

import base64
import json
from pathlib import PurePath

import numpy as np
from skimage.segmentation import find_boundaries

from cellseg.instances import display_gray, png_bytes
from cellseg.outputs import cells_csv, coco_document, image_record, per_image_files
from cellseg.pixelsize import PHYSICAL_UNITS, PixelSize
from cellseg.summary import summary_csv, summary_row

OUTLINE_RGBA = (255, 64, 0, 255)
FILL_ALPHA = 110  # filled labels stay see-through, so the cell under them can be judged
# The unit of each per-cell measurement, for the page's labels. Measurements are in pixels; where a
# pixel size is known, the µm ones beside them (area_um2, perimeter_um, ...) are named too, with
# PHYSICAL_UNITS, and the page shows those. Fields not listed have none: cell_id, eccentricity and
# solidity (ratios), mean_intensity (the image's own gray values) and score (a probability).
CELL_UNITS = {"area": "px²", "centroid_x": "px", "centroid_y": "px", "bbox_x": "px", "bbox_y": "px",
              "bbox_width": "px", "bbox_height": "px", "perimeter": "px", "major_axis_length": "px",
              "minor_axis_length": "px", "orientation": "rad"}


def _png(array: np.ndarray) -> bytes:
    return png_bytes(array, compress_level=1)  # fast: these are shown, not kept


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def rendered_views(image: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    """PNGs a browser can show for any input (8/16-bit, TIFF): the image contrast-stretched to 8-bit
    gray, and two transparent layers to put over it: cell outlines, and cells filled in colour."""
    gray = display_gray(image)
    outlines = np.zeros((*labels.shape, 4), np.uint8)
    outlines[find_boundaries(labels, mode="inner")] = OUTLINE_RGBA
    # a fixed colour per cell id; neighbours rarely share one among 4096 hues and brightnesses
    palette = np.random.default_rng(0).integers(60, 256, size=(int(labels.max()) + 1, 4), dtype=np.uint8)
    palette[:, 3] = FILL_ALPHA
    palette[0] = 0
    filled = palette[labels]
    return {"image": _png(gray), "outlines": _png(outlines), "filled": _png(filled)}


def page_report(image: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, filename: str,
                pixel_size: PixelSize | None = None, name: str | None = None, place: dict | None = None,
                frames: int = 1) -> dict:
    """JSON for the web page: count, confluence, cells (measurements and score; in µm too where
    `pixel_size` is known), pixel_size ({x_um, y_um, source} or None), units (of the cells'
    measurements), views (PNG data URLs), downloads (name, media type and base64 bytes of the label
    PNG, CSV, COCO, ROI zip, GeoJSON, and the image's summary.csv) and summary (its summary.csv row).

    `name` is the output name a batch job gives the image (default: the file's stem) and `place` what
    its record says of its stack or series (batch.Item.record_fields: stack, frame, time_s, page for a
    stack's page; plate, well, field), so that the page's combined tables equal `cellseg segment`'s;
    `stack` then says which frame of how many (a stack's pages only)."""
    stem = name or PurePath(filename).stem or "image"
    record = image_record(image, labels, scores, name=stem, source=PurePath(filename).name or "image",
                          pixel_size=pixel_size) | (place or {})
    row = summary_row(record)
    files = per_image_files(labels, record, ("labels", "rois", "geojson"))
    downloads = {
        "labels": (f"{stem}_labels.png", "image/png", files["labels"]),
        "csv": (f"{stem}_cells.csv", "text/csv", cells_csv([record])),
        "coco": (f"{stem}.coco.json", "application/json", json.dumps(coco_document([record])).encode()),
        "rois": (f"{stem}_RoiSet.zip", "application/zip", files["rois"]),
        "geojson": (f"{stem}.geojson", "application/geo+json", files["geojson"]),
        "summary": (f"{stem}_summary.csv", "text/csv", summary_csv([row])),
    }
    # a page of a stack file; a time point that is a file of its own (placed by its name) is a single image
    stack = ({"name": place["stack"], "frame": place["frame"], "frames": frames, "time_s": place["time_s"]}
             if place and "page" in place else None)
    return {
        "name": stem, "width": record["width"], "height": record["height"],
        "count": record["count"], "confluence": record["confluence"], "cells": record["cells"],
        "pixel_size": record["pixel_size"], "summary": row, "stack": stack,
        "units": {**CELL_UNITS, **(PHYSICAL_UNITS if pixel_size else {})},
        "views": {key: _data_url(png, "image/png") for key, png in rendered_views(image, labels).items()},
        "downloads": {key: {"filename": name, "media_type": media, "base64": base64.b64encode(data).decode()}
                      for key, (name, media, data) in downloads.items()},
    }
