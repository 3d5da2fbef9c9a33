"""The normalisation's histogram path gives exactly what the plain per-pixel formula gives."""

import numpy as np
import pytest

from cellseg.preprocess import histogram_percentiles, integer_levels, normalize


def plain_normalize(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """The formula as it was before the histogram path (np.percentile, then per-pixel arithmetic)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    scale = hi - lo
    if scale <= 1e-6 * max(1.0, abs(hi)):
        return np.zeros_like(image)
    return ((image - lo) / scale).astype(np.float32)


def random_images(seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        h, w = rng.integers(1, 300, size=2)
        top = int(rng.choice([1, 3, 255, 4095, 65535]))
        kind = rng.integers(3)
        if kind == 0:
            image = rng.integers(0, top + 1, size=(h, w))
        elif kind == 1:  # a skewed, phase-contrast-like histogram with a few bright outliers
            image = np.clip(rng.normal(top * 0.3, top * 0.05 + 1, size=(h, w)), 0, top).round()
            image.flat[rng.integers(image.size, size=3)] = top
        else:  # few distinct levels: many ties at the percentiles
            image = rng.choice(rng.integers(0, top + 1, size=3), size=(h, w))
        yield image.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_path_is_bit_identical_to_the_plain_formula(seed):
    for image in random_images(seed):
        assert integer_levels(image) is not None or image.size < 2
        np.testing.assert_array_equal(normalize(image), plain_normalize(image))
        if image.size >= 2:
            for percents in ([1.0, 99.0], [0.0, 100.0], [50.0, 37.5], [2.5, 99.9]):
                np.testing.assert_array_equal(histogram_percentiles(integer_levels(image), percents),
                                              np.percentile(image, percents))


def test_images_that_are_not_16_bit_levels_take_the_plain_path():
    rng = np.random.default_rng(3)
    for image in (rng.random((40, 50)).astype(np.float32) * 1000,  # fractions
                  rng.integers(-500, 500, size=(40, 50)).astype(np.float32),  # negative levels
                  rng.integers(0, 200_000, size=(40, 50)).astype(np.float32)):  # beyond 16 bits
        assert integer_levels(image) is None
        np.testing.assert_array_equal(normalize(image), plain_normalize(image))


def test_flat_and_tiny_images():
    assert not normalize(np.full((30, 30), 7, np.float32)).any()
    np.testing.assert_array_equal(normalize(np.array([[5.0]], np.float32)), plain_normalize(np.array([[5.0]])))
    image = np.zeros((30, 30), np.float32)
    image[0, 0] = 65535  # one bright pixel: the 99th percentile is still 0, so the image is flat
    np.testing.assert_array_equal(normalize(image), plain_normalize(image))
