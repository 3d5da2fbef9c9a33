"""Regenerate `cellseg/splits.json`: the project's fixed train/validation split.

    python scripts/make_split.py            # writes cellseg/splits.json
    python scripts/make_split.py --check    # exit 1 if the file differs from what the data gives

Validation keeps the six images of the first split (one each of BT474, MCF7, Huh7, A172, SKOV3 and a
Sartorius SH-SY5Y image) and adds VAL_PER_TYPE Sartorius images of each cell type, drawn with a fixed
seed; every other annotated image trains. The draw depends only on the sorted image ids, so it is
reproducible on any machine holding the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellseg.data import default_data_root, read_any  # noqa: E402

SPLIT_FILE = ROOT / "cellseg" / "splits.json"
FIRST_VAL = [
    "livecell:val:BT474_Phase_C3_1_01d04h00m_4.tif",
    "livecell:val:MCF7_Phase_F4_2_00d00h00m_4.tif",
    "livecell:val:Huh7_Phase_A10_1_02d12h00m_3.tif",
    "livecell:test:A172_Phase_C7_2_02d00h00m_4.tif",
    "livecell:test:SKOV3_Phase_E4_1_00d00h00m_1.tif",
    "sartorius:04cd81dfb245",
]
FIRST_TRAIN_SARTORIUS = ["sartorius:0030fd0e6378", "sartorius:049f02e0f764", "sartorius:05c61f0f46b7",
                         "sartorius:ffc2ead3e8cc"]
VAL_PER_TYPE = 10
SEED = 20261125


def make_split(data_root: Path) -> dict:
    samples = read_any(data_root)
    by_type: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        if s.source == "sartorius" and s.id not in FIRST_VAL and s.id not in FIRST_TRAIN_SARTORIUS:
            by_type[s.cell_type].append(s.id)
    rng = np.random.default_rng(SEED)
    val = list(FIRST_VAL)
    for cell_type in sorted(by_type):
        val += sorted(rng.choice(sorted(by_type[cell_type]), VAL_PER_TYPE, replace=False).tolist())
    train = [s.id for s in samples if s.id not in set(val)]
    return {
        "_comment": (
            "Fixed split of the annotated images in ../shared/data, made by scripts/make_split.py. Validation: the "
            "first split's six images (BT474, MCF7, Huh7, A172, SKOV3, Sartorius SH-SY5Y) plus 10 Sartorius images "
            "of each cell type (astro, cort, shsy5y), drawn with a fixed seed; every other annotated image trains. "
            "Ids: livecell:<annotation file split>:<file name> or sartorius:<image id>."
        ),
        "train": train,
        "val": val,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--check", action="store_true", help="compare with the recorded file instead of writing it")
    args = p.parse_args()
    text = json.dumps(make_split(args.data), indent=2) + "\n"
    if args.check:
        same = SPLIT_FILE.read_text() == text
        print("split file matches the data" if same else "split file differs from what the data gives")
        return 0 if same else 1
    SPLIT_FILE.write_text(text)
    split = json.loads(text)
    print(f"wrote {SPLIT_FILE}: {len(split['train'])} train, {len(split['val'])} val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
