"""The inference path shared by evaluation, batch jobs, the service and training's validation.

raw image -> normalise (whole image) -> pad / tile -> network (batched) -> crop / stitch
-> probability maps (foreground, boundary, distance) -> seeded watershed -> label image
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cellseg.postprocess import PostprocessParams, maps_to_labels
from cellseg.preprocess import normalize, pad_to, padded_size
from cellseg.tiling import plan_tiles, stitch

# A callable mapping a float32 (N, 1, H, W) batch to (N, 3, H, W) probabilities.
PredictFn = Callable[[np.ndarray], np.ndarray]

# Images up to this many pixels per side go through the network whole; larger ones are tiled.
DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_CONTEXT = 64


@dataclass(frozen=True)
class Piece:
    """One network input cut from an image: the whole image or one tile of it."""

    image_index: int
    array: np.ndarray  # normalised (h, w)


def image_pieces(image: np.ndarray, tile_size: int, context: int) -> tuple[list[np.ndarray], list | None]:
    h, w = image.shape
    if h <= tile_size and w <= tile_size:
        return [image], None
    tiles = plan_tiles(h, w, tile_size, context)
    return [image[t.y0 : t.y1, t.x0 : t.x1] for t in tiles], tiles


def predict_padded(predict: PredictFn, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run arrays of possibly different shapes as one batch: reflect-pad all to a shared shape
    (multiple of 32), predict, crop each output back to its own shape."""
    height = padded_size(max(a.shape[0] for a in arrays))
    width = padded_size(max(a.shape[1] for a in arrays))
    batch = np.stack([pad_to(a, height, width) for a in arrays])[:, None].astype(np.float32)
    probs = predict(batch)
    return [p[:, : a.shape[0], : a.shape[1]] for p, a in zip(probs, arrays)]


def predict_maps(
    predict: PredictFn,
    images: Sequence[np.ndarray],
    batch_size: int = 4,
    tile_size: int = DEFAULT_TILE_SIZE,
    context: int = DEFAULT_TILE_CONTEXT,
) -> list[np.ndarray]:
    """Probability maps (3, H, W) for raw (H, W) images: normalise, tile, batch, stitch."""
    pieces: list[Piece] = []
    plans = []
    for index, image in enumerate(images):
        arrays, tiles = image_pieces(normalize(image), tile_size, context)
        plans.append(tiles)
        pieces += [Piece(index, a) for a in arrays]
    outputs: list[np.ndarray] = []
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start : start + batch_size]
        outputs += predict_padded(predict, [p.array for p in chunk])
    results = []
    for index, (image, tiles) in enumerate(zip(images, plans)):
        mine = [o for o, p in zip(outputs, pieces) if p.image_index == index]
        results.append(mine[0] if tiles is None else stitch(mine, tiles, *image.shape))
    return results


@dataclass
class Segmentation:
    labels: np.ndarray  # int32 (H, W), 0 = background, 1..N cells
    probs: np.ndarray  # float32 (3, H, W)

    @property
    def count(self) -> int:
        return int(self.labels.max())

    def scores(self) -> np.ndarray:
        """Confidence per cell 1..N: mean foreground probability over its pixels."""
        sums = np.bincount(self.labels.ravel(), weights=self.probs[0].ravel(), minlength=self.count + 1)
        areas = np.bincount(self.labels.ravel(), minlength=self.count + 1)
        return (sums / np.maximum(areas, 1))[1:]


def segment_images(
    predict: PredictFn,
    images: Sequence[np.ndarray],
    params: PostprocessParams = PostprocessParams(),
    batch_size: int = 4,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> list[Segmentation]:
    maps = predict_maps(predict, images, batch_size=batch_size, tile_size=tile_size)
    return [Segmentation(maps_to_labels(m, params), m) for m in maps]
