"""Run-length encodings: COCO RLE (pycocotools, column-major) and Kaggle RLE (row-major, 1-based)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi


def encode_coco(mask: np.ndarray) -> dict:
    """Binary (H, W) mask to a JSON-ready COCO RLE ({"size": [H, W], "counts": str})."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_coco(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def labels_to_coco_rles(labels: np.ndarray) -> list[dict]:
    """One COCO RLE per label 1..max(labels) (in label order; absent labels give empty masks)."""
    rles = []
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        mask = np.zeros(labels.shape, dtype=bool)
        if window is not None:
            mask[window] = labels[window] == index
        rles.append(encode_coco(mask))
    return rles


def decode_kaggle(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle "start length" pairs (1-based starts, pixels numbered row by row) to a mask."""
    values = np.asarray(rle.split(), dtype=np.int64)
    if values.size % 2:
        raise ValueError("Kaggle RLE must have an even number of values (start length pairs)")
    starts, lengths = values[0::2] - 1, values[1::2]
    flat = np.zeros(height * width, dtype=bool)
    if values.size and (starts.min() < 0 or (starts + lengths).max() > flat.size):
        raise ValueError(f"Kaggle RLE runs outside a {height}x{width} image")
    for start, length in zip(starts, lengths):
        flat[start : start + length] = True
    return flat.reshape(height, width)


def encode_kaggle(mask: np.ndarray) -> str:
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.uint8).ravel(), [0]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = changes[0::2], changes[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))
