"""A ready annotated folder to try fine-tuning on, made from the real data in ../shared/data:

    python scripts/make_example.py --cell-type astro --images 10 --out my_lab

writes my_lab/astro/<id>.png and <id>_masks.png (16-bit label masks, one number per cell: the format
`python -m train finetune` and `cellseg evaluate --data` read) for that many images of a Kaggle-
Sartorius cell type (astro, cort or shsy5y) from the project's training split, so the validation
images stay unseen. my_lab/ is git-ignored. Licence of the images: CC BY-NC 4.0 (LIVECell/Sartorius).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.instances import label_png_bytes, png_bytes  # noqa: E402
from cellseg.targets import relabel_sequential  # noqa: E402

CELL_TYPES = ("astro", "cort", "shsy5y")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell-type", choices=CELL_TYPES, default="astro")
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("my_lab"))
    p.add_argument("--data", type=Path, default=default_data_root())
    args = p.parse_args(argv)
    samples = sorted((s for s in load_split(args.data, "train")
                      if s.source == "sartorius" and s.cell_type == args.cell_type), key=lambda s: s.id)
    if len(samples) < args.images:
        raise SystemExit(f"only {len(samples)} {args.cell_type} images in the training split")
    folder = args.out / args.cell_type
    folder.mkdir(parents=True, exist_ok=True)
    for sample in samples[: args.images]:
        stem = sample.id.split(":")[-1]
        (folder / f"{stem}.png").write_bytes(png_bytes(np.clip(sample.image(), 0, 255).astype(np.uint8)))
        (folder / f"{stem}_masks.png").write_bytes(label_png_bytes(relabel_sequential(sample.labels())))
    print(f"wrote {args.images} annotated {args.cell_type} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
