"""Label image -> per-cell records (JSON for the API, COCO annotations, CSV measurements)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from cellseg.preprocess import normalize
from cellseg.rle import labels_to_coco_rles, paint_coco

MAX_LABEL_PNG = 65535  # labels are written as 16-bit PNG


def confluence(labels: np.ndarray) -> float:
    """Percentage of the image covered by cells."""
    return float(100.0 * np.count_nonzero(labels) / labels.size)


def instances_from_labels(labels: np.ndarray, scores: np.ndarray | None = None) -> list[dict]:
    """One record per cell 1..N: id, area, COCO bbox [x, y, w, h], centroid [x, y], score, COCO RLE."""
    count = int(labels.max(initial=0))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    sum_y, sum_x = coordinate_sums(labels, 0), coordinate_sums(labels, 1)
    rles = labels_to_coco_rles(labels)
    records = []
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        y0, x0 = window[0].start, window[1].start
        records.append({
            "id": index,
            "area": int(areas[index]),
            "bbox": [int(x0), int(y0), int(window[1].stop - x0), int(window[0].stop - y0)],
            "centroid": [round(float(sum_x[index] / areas[index]), 2), round(float(sum_y[index] / areas[index]), 2)],
            "score": round(float(scores[index - 1]), 4) if scores is not None else None,
            "rle": rles[index - 1],
        })
    return records


def coordinate_sums(labels: np.ndarray, axis: int) -> np.ndarray:
    """Per label 0..max, the sum of its pixels' row (axis 0) or column (axis 1) indices: from the
    labels' counts per row (or column) where that table is small, else a weighted sum over pixels."""
    from cellseg.measure import counts_per_line

    table = counts_per_line(labels, axis)
    if table is None:
        n = int(labels.max(initial=0)) + 1
        index = np.arange(labels.shape[axis])
        weights = np.broadcast_to(index[:, None] if axis == 0 else index[None, :], labels.shape)
        return np.bincount(labels.ravel(), weights=weights.ravel().astype(np.float64), minlength=n)
    return (np.arange(labels.shape[axis]) @ table).astype(np.float64)


def labels_from_instances(instances: list[dict], height: int, width: int) -> np.ndarray:
    """Inverse of `instances_from_labels` (cells keep their ids)."""
    # COCO RLE runs are column-major: paint a (width, height) array, whose transpose is the image.
    columns = np.zeros((width, height), dtype=np.int32)
    flat = columns.reshape(-1)
    for inst in instances:
        paint_coco(flat, inst["rle"], inst["id"])
    return np.ascontiguousarray(columns.T)


def measure_cells(labels: np.ndarray, image: np.ndarray | None = None) -> list[dict]:
    """Per-cell measurements (pixel units) for the CSV, the web page and GeoJSON: regionprops'
    definitions, computed for all cells at once by `cellseg.measure`."""
    from cellseg.measure import measure_cells as measure_all

    return measure_all(labels, image)


class TooManyCellsError(ValueError):
    """More cells than a 16-bit label image can number."""


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG of a uint8/uint16 array (gray, RGB or RGBA); compress_level 1 for pictures only shown."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def display_gray(image: np.ndarray) -> np.ndarray:
    """Any image as 8-bit gray for people to look at: normalised as the network sees it, clipped."""
    return (np.clip(normalize(image), 0, 1) * 255).astype(np.uint8)


def label_png_bytes(labels: np.ndarray) -> bytes:
    """16-bit grayscale PNG of a label image (0 = background, 1..N cells)."""
    if labels.max(initial=0) > MAX_LABEL_PNG:
        raise TooManyCellsError(f"{int(labels.max()):,} cells do not fit a 16-bit label PNG (at most {MAX_LABEL_PNG:,})")
    return png_bytes(labels.astype(np.uint16))


def binary_png_bytes(labels: np.ndarray) -> bytes:
    return png_bytes(((labels > 0) * 255).astype(np.uint8))


def overlay_png_bytes(image: np.ndarray, labels: np.ndarray, color=(255, 64, 0)) -> bytes:
    """The image (contrast-stretched to 8-bit) with each cell's outline drawn on it."""
    rgb = np.repeat(display_gray(image)[..., None], 3, axis=2)
    rgb[find_boundaries(labels, mode="inner")] = color
    return png_bytes(rgb)
