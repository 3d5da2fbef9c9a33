"""The inference path shared by evaluation, batch jobs, the service and training's validation.

raw image -> normalise (whole image) -> pad / tile -> network (batched) -> crop / stitch
-> probability maps (foreground, boundary, distance) -> seeded watershed -> label image
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cellseg.cell_filter import CellFilter
from cellseg.postprocess import PostprocessParams, maps_to_cells
from cellseg.preprocess import normalize, pad_to, padded_size
from cellseg.tiling import plan_tiles, stitch

# A callable mapping a float32 (N, 1, H, W) batch to (N, 3, H, W) probabilities.
PredictFn = Callable[[np.ndarray], np.ndarray]

# Images up to this many pixels per side go through the network whole; larger ones are tiled.
DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_CONTEXT = 64
# Most pixels sent to the network in one call. The network's activations grow with the batch's
# pixels, so a 4000x4000 image's tiles go through one at a time and 8 batched LIVECell images two by
# two. On a CPU, throughput hardly depends on the batch size (the cores are busy either way), while
# memory grows with it; on a GPU, raise it.
MAX_BATCH_PIXELS = int(os.environ.get("CELLSEG_MAX_BATCH_PIXELS", 1024 * 1024))


@dataclass(frozen=True)
class ImagePlan:
    """How an image was cut into network inputs: whole (tiles is None) or into tiles."""

    height: int
    width: int
    tiles: list | None


def split_image(image: np.ndarray, tile_size: int = DEFAULT_TILE_SIZE,
                context: int = DEFAULT_TILE_CONTEXT) -> tuple[list[np.ndarray], ImagePlan]:
    """Normalise a raw (H, W) image (whole image, before any tiling) and cut it into network inputs."""
    normalized = normalize(image)
    h, w = normalized.shape
    if h <= tile_size and w <= tile_size:
        return [normalized], ImagePlan(h, w, None)
    tiles = plan_tiles(h, w, tile_size, context)
    return [normalized[t.y0 : t.y1, t.x0 : t.x1] for t in tiles], ImagePlan(h, w, tiles)


def merge_outputs(outputs: Sequence[np.ndarray], plan: ImagePlan) -> np.ndarray:
    """Network outputs of `split_image`'s pieces back into one (3, H, W) map."""
    if plan.tiles is None:
        return outputs[0]
    return stitch(list(outputs), plan.tiles, plan.height, plan.width)


def predict_padded(predict: PredictFn, arrays: Sequence[np.ndarray], max_batch_pixels: int = MAX_BATCH_PIXELS,
                   finish: Callable[[np.ndarray], np.ndarray] = np.ascontiguousarray) -> list[np.ndarray]:
    """Predict arrays of possibly different shapes: each is reflect-padded to a multiple of 32,
    arrays with the same padded shape run as one batch (of at most `max_batch_pixels`), outputs
    are cropped back.

    Padding each array only to its own size (not to the largest in the batch) keeps every result
    independent of which other requests it was batched with. `finish` turns each cropped view
    into the array kept: a copy by default, so the batch's full output is freed rather than kept
    alive by views; `predict_codes` encodes it to 8 bits instead.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault((padded_size(a.shape[0]), padded_size(a.shape[1])), []).append(i)
    outputs: list[np.ndarray | None] = [None] * len(arrays)
    for (height, width), members in groups.items():
        per_call = max(1, max_batch_pixels // (height * width))
        for start in range(0, len(members), per_call):
            chunk = members[start : start + per_call]
            batch = np.stack([pad_to(arrays[i], height, width) for i in chunk])[:, None].astype(np.float32)
            for i, probs in zip(chunk, predict(batch)):
                outputs[i] = finish(probs[:, : arrays[i].shape[0], : arrays[i].shape[1]])
    return outputs  # type: ignore[return-value]


# The probability maps leave the network as 8-bit codes (steps of 1/255): a quarter of the bytes that
# the service moves from its network process to its HTTP front, and applied on every path (service,
# batch jobs, evaluation) so that all of them give the same cells. Against float32 maps, on the
# validation split: AP50 -0.0002, mSA -0.0001 (docs/METRICS.md).
MAP_LEVELS = 255


def encode_map(probs: np.ndarray) -> np.ndarray:
    """Probability maps (float, 0..1) to uint8 codes: round(clip(m, 0, 1) * 255), in one scratch array
    (the network process allocates every array afresh, so temporaries cost page faults)."""
    scratch = np.clip(probs, 0.0, 1.0)
    scratch *= MAP_LEVELS
    return np.rint(scratch, out=scratch).astype(np.uint8)


def encode_maps(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [encode_map(m) for m in maps]


def predict_codes(predict: PredictFn, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`predict_padded`, each output encoded to 8-bit codes straight from the batch's output."""
    return predict_padded(predict, arrays, finish=encode_map)


def decode_maps(codes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 codes back to float32 probabilities."""
    return [c.astype(np.float32) * np.float32(1.0 / MAP_LEVELS) for c in codes]


# Test-time augmentation: the network sees each piece as is and mirrored (left-right, up-down, both);
# the four outputs, mirrored back, are averaged. Cells have no preferred orientation, so the average
# is a less noisy estimate of the same maps.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def tta_expand(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each (h, w) array followed by its mirrored variants (len(TTA_FLIPS) per array)."""
    return [np.ascontiguousarray(np.flip(a, axes)) if axes else a for a in arrays for axes in TTA_FLIPS]


def tta_reduce(outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of `tta_expand` on the network's (3, h, w) outputs: mirror back and average."""
    n = len(TTA_FLIPS)
    merged = []
    for start in range(0, len(outputs), n):
        group = [np.flip(o, axes) if axes else o for o, axes in zip(outputs[start : start + n], TTA_FLIPS)]
        merged.append((np.sum(group, axis=0) / n).astype(np.float32))
    return merged


def predict_maps(
    predict: PredictFn,
    images: Sequence[np.ndarray],
    batch_size: int = 4,
    tile_size: int = DEFAULT_TILE_SIZE,
    context: int = DEFAULT_TILE_CONTEXT,
    tta: bool = False,
) -> list[np.ndarray]:
    """Probability maps (3, H, W) for raw (H, W) images: normalise, tile, batch, stitch.
    With `tta`, every piece also goes through the network mirrored three ways (4x the work)."""
    split = [split_image(image, tile_size, context) for image in images]
    pieces = [array for arrays, _ in split for array in arrays]
    if tta:
        pieces = tta_expand(pieces)
    outputs: list[np.ndarray] = []
    for start in range(0, len(pieces), batch_size):  # 8-bit maps, exactly as the service's network returns them
        outputs += decode_maps(predict_codes(predict, pieces[start : start + batch_size]))
    if tta:
        outputs = tta_reduce(outputs)
    results, offset = [], 0
    for arrays, plan in split:
        results.append(merge_outputs(outputs[offset : offset + len(arrays)], plan))
        offset += len(arrays)
    return results


@dataclass
class Segmentation:
    labels: np.ndarray  # int32 (H, W), 0 = background, 1..N cells
    probs: np.ndarray  # float32 (3, H, W)
    cell_filter: CellFilter | None = None  # the model's (params.cell_filter): it also scores the cells
    filter_scores: np.ndarray | None = None  # its P(annotated) per cell, where from_maps applied it

    @classmethod
    def from_maps(cls, probs: np.ndarray, params: PostprocessParams) -> Segmentation:
        """The cells `params` cut from the network's (3, H, W) maps, the maps kept for the scores (with
        a cell filter, its probabilities kept as they are computed: the same labels as maps_to_labels)."""
        labels, scores = maps_to_cells(probs, params)
        return cls(labels, probs, params.cell_filter, scores)

    @property
    def count(self) -> int:
        return int(self.labels.max())

    def scores(self) -> np.ndarray:
        """Confidence per cell 1..N: mean foreground probability over its pixels or, for a model with
        a cell filter, the filter's probability that the lab would annotate it (a better ranking:
        unseen astrocytes AP50 0.229 -> 0.268 with one fitted on ten of them, docs/metrics_notes.md)."""
        if self.filter_scores is not None:
            return self.filter_scores
        if self.cell_filter is not None:
            return self.cell_filter.probabilities(self.labels, self.probs)
        sums = np.bincount(self.labels.ravel(), weights=self.probs[0].ravel(), minlength=self.count + 1)
        areas = np.bincount(self.labels.ravel(), minlength=self.count + 1)
        return (sums / np.maximum(areas, 1))[1:]


def segment_images(
    predict: PredictFn,
    images: Sequence[np.ndarray],
    params: PostprocessParams = PostprocessParams(),
    batch_size: int = 4,
    tile_size: int = DEFAULT_TILE_SIZE,
    tta: bool = False,
) -> list[Segmentation]:
    maps = predict_maps(predict, images, batch_size=batch_size, tile_size=tile_size, tta=tta)
    return [Segmentation.from_maps(m, params) for m in maps]
