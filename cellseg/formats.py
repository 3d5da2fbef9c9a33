"""Cell outlines in the formats lab tools open: an ImageJ/Fiji ROI set (written by `roifile`) and a
QuPath GeoJSON FeatureCollection (geometry by `shapely`).

Coordinates: both ImageJ and QuPath put the origin at the top-left *corner* of the first pixel, so
pixel (row r, column c) covers x in [c, c+1), y in [r, r+1) and its centre is (c + 0.5, r + 0.5).
Outlines are traced through pixel centres (`skimage.measure.find_contours` at level 0.5 on the cell's
mask) and shifted by half a pixel into that frame: filling a polygon by pixel centres, as ImageJ,
QuPath and `skimage.draw.polygon2mask` do, gives back the cell's pixels (IoU >= 0.95 for cells of 20
pixels or more; the tests check it).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours

PIXEL_CENTRE = 0.5  # shift from array indices (pixel centres) to corner-origin image coordinates


def cell_outlines(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Per cell id, its outer outline as an (N, 2) array of (x, y) vertices in corner-origin image
    coordinates (closed: the last vertex repeats the first). Where a cell has several pieces, the
    outline of the largest one is given."""
    outlines: dict[int, np.ndarray] = {}
    for cell_id, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        # one pixel of background around the cell, so its contour closes
        mask = np.pad(labels[window] == cell_id, 1).astype(np.float32)
        contours = find_contours(mask, 0.5)
        if not contours:
            continue
        contour = max(contours, key=lambda c: _area(c))
        rows = contour[:, 0] + window[0].start - 1
        cols = contour[:, 1] + window[1].start - 1
        outlines[cell_id] = np.column_stack([cols + PIXEL_CENTRE, rows + PIXEL_CENTRE])
    return outlines


def _area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def imagej_roi_zip(labels: np.ndarray) -> bytes:
    """An ImageJ/Fiji ROI set (.zip of .roi files, one polygon per cell, named by cell id)."""
    from roifile import ImagejRoi, roiwrite

    rois = [ImagejRoi.frompoints(points[:-1], name=f"cell-{cell_id:05d}")
            for cell_id, points in cell_outlines(labels).items()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rois.zip"
        if rois:
            roiwrite(path, rois)
        else:  # an empty ROI set is an empty zip
            import zipfile

            zipfile.ZipFile(path, "w").close()
        return path.read_bytes()


def qupath_geojson(labels: np.ndarray, measurements: list[dict] | None = None, classification: str = "Cell") -> dict:
    """A GeoJSON FeatureCollection of detections, as QuPath imports it: one Polygon per cell with
    `objectType: "detection"`, a classification, and the cell's measurements."""
    from shapely.geometry import Polygon, mapping

    by_id = {int(m["cell_id"]): m for m in measurements or []}
    features = []
    for cell_id, points in cell_outlines(labels).items():
        polygon = Polygon(points)
        if not polygon.is_valid:  # a self-touching outline: repaired, keeping its largest part
            repaired = polygon.buffer(0)
            polygon = max(getattr(repaired, "geoms", [repaired]), key=lambda g: g.area)
        values = {k: v for k, v in by_id.get(cell_id, {}).items() if isinstance(v, (int, float)) and k != "cell_id"}
        features.append({
            "type": "Feature",
            "id": f"cell-{cell_id}",
            "geometry": mapping(polygon),
            "properties": {"objectType": "detection", "name": f"cell {cell_id}",
                           "classification": {"name": classification, "color": [255, 110, 0]},
                           "measurements": values, "cell_id": cell_id},
        })
    return {"type": "FeatureCollection", "features": features}


def geojson_bytes(collection: dict) -> bytes:
    import json

    buffer = io.StringIO()
    json.dump(collection, buffer, separators=(",", ":"))
    return buffer.getvalue().encode()
