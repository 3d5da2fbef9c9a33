"""Split large images into overlapping tiles and stitch the per-tile outputs back.

Each tile carries `context` extra pixels on every side that are predicted but thrown away, so every
kept pixel was seen with enough surroundings and tile seams leave no artefacts (as in stardist).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    # Region of the image fed to the network (with context) ...
    y0: int
    y1: int
    x0: int
    x1: int
    # ... and the part of it kept in the output, in image coordinates.
    keep_y0: int
    keep_y1: int
    keep_x0: int
    keep_x1: int


def _starts(size: int, core: int) -> list[int]:
    return list(range(0, max(size - core, 0) + 1, core)) + ([size - core] if size > core and (size - core) % core else [])


def plan_tiles(height: int, width: int, tile: int, context: int) -> list[Tile]:
    """Tiles of at most `tile` px (with `context` px margins) covering a height x width image."""
    core = tile - 2 * context
    if core <= 0:
        raise ValueError(f"tile size {tile} leaves no core with context {context}")
    tiles = []
    for cy in _starts(height, core):
        for cx in _starts(width, core):
            ky1, kx1 = min(cy + core, height), min(cx + core, width)
            y0, x0 = max(cy - context, 0), max(cx - context, 0)
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            y0, x0 = max(y1 - tile, 0), max(x1 - tile, 0)
            tiles.append(Tile(y0, y1, x0, x1, cy, ky1, cx, kx1))
    # Overlapping cores (last row/column) are fine: later tiles overwrite with equally valid values.
    return tiles


def stitch(outputs: list[np.ndarray], tiles: list[Tile], height: int, width: int) -> np.ndarray:
    """(C, h, w) outputs of `tiles` into one (C, height, width) array."""
    channels = outputs[0].shape[0]
    result = np.zeros((channels, height, width), dtype=outputs[0].dtype)
    for out, t in zip(outputs, tiles):
        result[:, t.keep_y0 : t.keep_y1, t.keep_x0 : t.keep_x1] = out[
            :, t.keep_y0 - t.y0 : t.keep_y1 - t.y0, t.keep_x0 - t.x0 : t.keep_x1 - t.x0
        ]
    return result
