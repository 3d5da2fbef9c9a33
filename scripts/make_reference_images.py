"""The small real images the precision check runs int8 and fp32 on (cellseg/precision.py):

    python scripts/make_reference_images.py    # writes cellseg/reference/*.png

One 256x256 crop per cell type of four (two LIVECell, two Kaggle-Sartorius), from the training
split (never validation), where the crop holds the most annotated cells. Licence: CC BY-NC 4.0
(LIVECell, Sartorius), as the shipped weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellseg.data import default_data_root, load_split  # noqa: E402

CELL_TYPES = (("livecell", "A172"), ("livecell", "SKOV3"), ("sartorius", "shsy5y"), ("sartorius", "astro"))
SIZE = 256
OUT = Path(__file__).resolve().parent.parent / "cellseg" / "reference"


def busiest_window(labels: np.ndarray, size: int, step: int = 32) -> tuple[int, int]:
    """(y, x) of the size x size window holding the most distinct cells."""
    best, where = -1, (0, 0)
    for y in range(0, labels.shape[0] - size + 1, step):
        for x in range(0, labels.shape[1] - size + 1, step):
            cells = len(np.unique(labels[y : y + size, x : x + size]))
            if cells > best:
                best, where = cells, (y, x)
    return where


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    train = load_split(args.data, "train")
    args.out.mkdir(parents=True, exist_ok=True)
    for source, cell_type in CELL_TYPES:
        sample = sorted((s for s in train if (s.source, s.cell_type) == (source, cell_type)), key=lambda s: s.id)[0]
        y, x = busiest_window(sample.labels(), SIZE)
        raw = sample.image()[y : y + SIZE, x : x + SIZE]
        path = args.out / f"{source}-{cell_type}.png"
        Image.fromarray(np.clip(raw, 0, 255).astype(np.uint8)).save(path, optimize=True)
        print(f"{path}: {sample.id} at y={y} x={x}, {len(np.unique(sample.labels()[y:y+SIZE, x:x+SIZE])) - 1} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
