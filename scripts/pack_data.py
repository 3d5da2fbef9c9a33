"""Pack annotated images into a small folder that travels to a lent GPU machine.

The device tool carries at most 64 MiB with the repository, and the real data is 130 MB, mostly
noisy 8-bit PNGs that no lossless codec shrinks enough. So the images are stored as JPEG (quality
95 by default: a mean absolute difference of about 1 grey level, well under the images' own noise
and the training's noise augmentation) and the annotations as the original COCO RLEs, so every
metric is computed against the exact masks. `cellseg.data.load_split` reads the packed folder like
the original layout (`--data .data/packed`). Models trained on it are evaluated again on the
original images before anything is reported.

    python scripts/pack_data.py --out .data/packed            # train + val splits of ../shared/data
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cellseg.data import PACKED_INDEX, default_data_root, load_split
from cellseg.preprocess import normalize


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit images as they are; others through the same percentile normalisation as inference."""
    if image.min() >= 0 and image.max() <= 255 and np.all(image == np.round(image)):
        return image.astype(np.uint8)
    return np.clip(normalize(image) * 255 + 0.5, 0, 255).astype(np.uint8)


def pack(data: Path, splits: list[str], out: Path, quality: int) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries, seen = [], set()
    for split in splits:
        for sample in tqdm(load_split(data, split), desc=f"packing {split}"):
            if sample.id in seen:
                continue
            seen.add(sample.id)
            name = f"images/{len(entries):05d}.jpg"
            buffer = io.BytesIO()
            Image.fromarray(to_uint8(sample.image())).save(buffer, "JPEG", quality=quality)
            (out / name).write_bytes(buffer.getvalue())
            entries.append({"id": sample.id, "source": sample.source, "cell_type": sample.cell_type,
                            "image": name, "size": [sample.height, sample.width],
                            "counts": [r["counts"].decode("ascii") for r in sample.rles]})
    index = {"jpeg_quality": quality, "splits": splits, "samples": entries}
    (out / PACKED_INDEX).write_text(json.dumps(index))
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--splits", default="train,val", help="comma-separated splits (see cellseg.data.load_split)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the packed images")
    args = p.parse_args(argv)
    index = pack(args.data, args.splits.split(","), args.out, args.quality)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{len(index['samples'])} images packed into {args.out}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
