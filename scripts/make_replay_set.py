r"""A replay set for `python -m train finetune --replay`: annotated images the base trained on, a few
per cell type from the project's training split, leaving out a fine-tune's own images.

    python scripts/make_replay_set.py --out runs/replay/images --per-type 5 \
        --leave-out docs/fewshot29_crop384_padfix.json

writes OUT/<id>.png and <id>_masks.png (16-bit label masks). `--leave-out`: a `scripts/fewshot.py`
record whose fine-tuning images (every run's `train_images`) are left out. Licence of the images:
CC BY-NC 4.0 (LIVECell/Sartorius).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot import write_lab_folder  # noqa: E402  the folders scripts/fewshot.py hands the fine-tune

from cellseg.data import default_data_root, load_split  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--types", default="astro,cort,shsy5y")
    p.add_argument("--per-type", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--leave-out", type=Path, help="a scripts/fewshot.py record: its fine-tuning images are left out")
    p.add_argument("--data", type=Path, default=default_data_root())
    args = p.parse_args(argv)
    left_out = set()
    if args.leave_out:
        left_out = {i for run in json.loads(args.leave_out.read_text())["runs"] for i in run["train_images"]}
    train = [s for s in load_split(args.data, "train") if s.id not in left_out]
    chosen = []
    for cell_type in args.types.split(","):
        pool = [s for s in train if s.cell_type == cell_type]
        chosen += [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))[: args.per_type]]
    write_lab_folder(chosen, args.out)
    print(f"wrote {len(chosen)} annotated images to {args.out} ({len(left_out)} left out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
