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
    lo, hi = np.percentile(image, [low, high])
    scale = hi - lo
    if scale <= 1e-6 * max(1.0, abs(hi)):
        # A flat image has no contrast to stretch; centre it instead of dividing by ~0.
        return np.zeros_like(image)
    return ((image - lo) / scale).astype(np.float32)


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad the last two axes to (height, width); reflection avoids fake edges at borders."""
    h, w = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, height - h), (0, width - w)]
    mode = "reflect" if h > 1 and w > 1 and height - h < h and width - w < w else "symmetric"
    return np.pad(image, pad, mode=mode)


def padded_size(size: int, divisor: int = SIZE_DIVISOR) -> int:
    return -(-size // divisor) * divisor
