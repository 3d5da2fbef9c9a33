"""Intensity normalisation and padding: the one definition used by training and inference."""

from __future__ import annotations

import numpy as np

# Per-image percentile normalisation makes the network blind to bit depth and exposure:
# an 8-bit image and the same image stored as 16-bit (x257) or RGB give the same array.
NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.0}
# smp.Unet downsamples 5 times.
SIZE_DIVISOR = 32


def normalize(image: np.ndarray, low: float = NORMALIZATION["low"], high: float = NORMALIZATION["high"]) -> np.ndarray:
    """Map the image's `low`..`high` percentiles to 0..1 (values outside are kept, not clipped)."""
    image = np.asarray(image, dtype=np.float32)
    levels = integer_levels(image)
    lo, hi = np.percentile(image, [low, high]) if levels is None else histogram_percentiles(levels, [low, high])
    scale = hi - lo
    if scale <= 1e-6 * max(1.0, abs(hi)):
        # A flat image has no contrast to stretch; centre it instead of dividing by ~0.
        return np.zeros_like(image)
    if levels is None:
        return ((image - lo) / scale).astype(np.float32)
    # the same arithmetic, once per grey level instead of once per pixel
    table = ((np.arange(int(levels.max()) + 1, dtype=np.float32) - lo) / scale).astype(np.float32)
    return table[levels]


# 8- and 16-bit images (every microscope camera's output) arrive as float32 holding whole numbers.
# Their percentiles and normalisation can then go through a histogram of at most 65,536 levels, in
# about a third of the time of np.percentile's partial sort and per-pixel arithmetic, with
# bit-identical results (tests/test_preprocess.py compares them on random 8- and 16-bit images).

def integer_levels(image: np.ndarray) -> np.ndarray | None:
    """The image as uint16 when every pixel is a whole number in 0..65535, else None."""
    if image.size < 2:
        return None
    levels = image.astype(np.uint16)  # wraps or truncates values that are not 16-bit levels...
    return levels if np.array_equal(levels, image) else None  # ... which this comparison catches


def histogram_percentiles(levels: np.ndarray, percents: list[float]) -> np.ndarray:
    """np.percentile(levels, percents) (its default "linear" method) from a histogram, with the same
    rounding: virtual index (n-1)*q, lerp of the two order statistics around it in float64, and
    numpy's b - (b-a)*(1-t) form where t >= 0.5."""
    ranks = np.cumsum(np.bincount(levels.ravel()))  # ranks[v] = number of pixels <= v
    n = levels.size
    virtual = (n - 1) * (np.asarray(percents, dtype=np.float64) / 100)
    below = np.floor(virtual)
    t = virtual - below
    below = below.astype(np.intp)
    a = np.searchsorted(ranks, below, side="right").astype(np.float32)  # the value of sorted pixel #below
    b = np.searchsorted(ranks, np.minimum(below + 1, n - 1), side="right").astype(np.float32)
    step = b - a
    return np.where(t >= 0.5, b - step * (1 - t), a + step * t)


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad the last two axes to (height, width); reflection avoids fake edges at borders."""
    h, w = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, height - h), (0, width - w)]
    mode = "reflect" if h > 1 and w > 1 and height - h < h and width - w < w else "symmetric"
    return np.pad(image, pad, mode=mode)


def padded_size(size: int, divisor: int = SIZE_DIVISOR) -> int:
    return -(-size // divisor) * divisor
