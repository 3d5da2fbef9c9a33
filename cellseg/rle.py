"""Run-length encodings: COCO RLE (pycocotools, column-major) and Kaggle RLE (row-major, 1-based)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


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
    """One COCO RLE per label 1..max(labels) (in label order; absent labels give empty masks).

    The runs of every cell come from one pass over the image in COCO's column-major order; only
    the compression of each cell's run lengths (pycocotools) is per cell. Same strings as
    `encode_coco` on each cell's mask (the tests check it), and the cost grows with the cells' runs,
    not with cells x image size (a 16 MP image with 10,000 cells never allocates 10,000 masks)."""
    height, width = labels.shape
    total = height * width
    count = int(labels.max(initial=0))
    flat = np.ascontiguousarray(labels.T).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.r_[0, changes]
    ends = np.r_[changes, total]
    values = flat[starts]
    cells = values > 0
    starts, ends, values = starts[cells], ends[cells], values[cells]
    order = np.argsort(values, kind="stable")  # by cell, runs kept in image order
    starts, ends, cell_of_run = starts[order], ends[order], values[order]
    bounds = np.searchsorted(cell_of_run, np.arange(1, count + 2))
    # COCO counts alternate background and foreground run lengths, starting with background: for
    # each run, the gap since the cell's previous run (or since pixel 0), then the run itself.
    previous_end = np.r_[0, ends[:-1]]
    previous_end[bounds[:-1][bounds[:-1] < len(ends)]] = 0  # each cell's first run starts counting at 0
    counts = np.empty(2 * len(starts), dtype=np.int64)
    counts[0::2], counts[1::2] = starts - previous_end, ends - starts
    counts = counts.tolist()
    objects = []
    for cell in range(count):
        first, last = bounds[cell], bounds[cell + 1]
        if first == last:
            objects.append({"size": [height, width], "counts": [total]})
            continue
        cell_counts = counts[2 * first : 2 * last]
        if ends[last - 1] < total:  # pycocotools writes no zero-length trailing run
            cell_counts.append(int(total - ends[last - 1]))
        objects.append({"size": [height, width], "counts": cell_counts})
    if not objects:
        return []
    # one call compresses every cell's counts to COCO's string form
    return [{"size": [height, width], "counts": rle["counts"].decode("ascii")}
            for rle in mask_utils.frPyObjects(objects, height, width)]


def coco_counts(rle: dict) -> np.ndarray:
    """Run lengths of a COCO RLE (alternating background/foreground, column-major), decoded from
    the compressed string without materialising the mask (pycocotools' maskApi.c rleFrString).
    ValueError for a truncated or damaged string."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    values: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data) or k > 12:
                raise ValueError("the RLE string is truncated or damaged")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        values.append(x)
    return np.asarray(values, dtype=np.int64)


def checked_counts(rle: dict, height: int, width: int) -> np.ndarray:
    """`coco_counts` of an RLE checked to be one of a height x width image: its size, and runs that
    are non-negative and add up to the image's pixels (pycocotools trusts them and writes past the
    mask otherwise). ValueError says what is wrong."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if not isinstance(size, list) or size != [height, width]:
        raise ValueError(f"the RLE is of size {str(size)[:60]}, not the image's [height, width] = [{height}, {width}]")
    try:
        counts = coco_counts(rle)
    except (KeyError, TypeError, OverflowError) as exc:
        raise ValueError(f"the RLE's counts are unreadable ({type(exc).__name__})") from None
    if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != height * width:
        raise ValueError(f"the RLE's runs must be non-negative and add up to the image's {height * width:,} pixels")
    return counts


def paint_coco(target_colmajor: np.ndarray, rle: dict, value: int, height: int, width: int) -> None:
    """Set the pixels of `rle` to `value` in a flat column-major view of a height x width image (see
    `labels_from_instances`); cost grows with the number of runs, not the image size. ValueError for
    an RLE that is not one of this image (`checked_counts`)."""
    bounds = np.cumsum(checked_counts(rle, height, width))
    for start, end in zip(bounds[0::2], bounds[1::2]):
        target_colmajor[start:end] = value


def kaggle_runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(0-based starts, lengths) of Kaggle "start length" pairs, checked to lie in a height x width image."""
    values = np.asarray(rle.split(), dtype=np.int64)
    if values.size % 2:
        raise ValueError("Kaggle RLE must have an even number of values (start length pairs)")
    starts, lengths = values[0::2] - 1, values[1::2]
    if values.size and (starts.min() < 0 or (starts + lengths).max() > height * width):
        raise ValueError(f"Kaggle RLE runs outside a {height}x{width} image")
    return starts, lengths


def decode_kaggle(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle "start length" pairs (1-based starts, pixels numbered row by row) to a mask."""
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(*kaggle_runs(rle, height, width)):
        flat[start : start + length] = True
    return flat.reshape(height, width)


def kaggle_to_coco(rle: str, height: int, width: int) -> dict:
    """A Kaggle RLE as the compressed COCO RLE `mask_utils.encode` gives for its mask (bytes counts),
    from the cell's own pixels: no image-sized mask is made, so reading the 37,963 cells of the
    Kaggle CSV costs what the cells cover, not 37,963 images' worth."""
    starts, lengths = kaggle_runs(rle, height, width)
    lengths = np.maximum(lengths, 0)
    # every pixel's row-major index, then its column-major one (COCO numbers pixels down columns)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    row_major = np.repeat(starts, lengths) + offsets
    column_major = np.unique((row_major % width) * height + row_major // width)  # sorted; overlaps once
    total = height * width
    if column_major.size == 0:
        counts = [total]
    else:
        breaks = np.flatnonzero(np.diff(column_major) != 1) + 1
        run_starts = column_major[np.r_[0, breaks]]
        run_ends = column_major[np.r_[breaks - 1, column_major.size - 1]] + 1
        counts = np.empty(2 * run_starts.size, dtype=np.int64)
        counts[0::2] = run_starts - np.r_[0, run_ends[:-1]]
        counts[1::2] = run_ends - run_starts
        counts = counts.tolist()
        if run_ends[-1] < total:  # pycocotools writes no zero-length trailing run
            counts.append(int(total - run_ends[-1]))
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def encode_kaggle(mask: np.ndarray) -> str:
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.uint8).ravel(), [0]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = changes[0::2], changes[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))
