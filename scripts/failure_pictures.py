"""Side-by-side pictures of annotated cells (left, green) and the model's cells (right, orange) for
validation images, with per-image counts and mSA: evidence for docs/METRICS.md.

    python scripts/failure_pictures.py --model models/livecell-unet.onnx --per-type 1 --out docs/failures
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.instances import overlay_png_bytes  # noqa: E402
from cellseg.matching import mean_score_accuracy  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402


def side_by_side(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, caption: str) -> Image.Image:
    left = Image.open(io.BytesIO(overlay_png_bytes(image, truth, color=(40, 220, 40))))
    right = Image.open(io.BytesIO(overlay_png_bytes(image, predicted, color=(255, 110, 0))))
    canvas = Image.new("RGB", (left.width + right.width + 8, left.height + 22), "white")
    canvas.paste(left, (0, 22))
    canvas.paste(right, (left.width + 8, 22))
    ImageDraw.Draw(canvas).text((4, 4), caption, fill="black")
    return canvas


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--split", default="val")
    p.add_argument("--per-type", type=int, default=1, help="pictures per cell type (the worst mSA first)")
    p.add_argument("--types", default="", help="comma-separated cell types (default: all)")
    p.add_argument("--out", type=Path, default=Path("docs/failures"))
    args = p.parse_args()
    model = OnnxModel(args.model)
    wanted = set(filter(None, args.types.split(",")))
    samples = [s for s in load_split(args.data, args.split) if not wanted or s.cell_type in wanted]
    scored = []
    for s in samples:
        image, truth = s.image(), s.labels()
        predicted = model.segment([image])[0].labels
        scored.append((s, image, truth, predicted, mean_score_accuracy(truth, predicted)))
    args.out.mkdir(parents=True, exist_ok=True)
    for cell_type in sorted({s.cell_type for s in samples}):
        rows = sorted((r for r in scored if r[0].cell_type == cell_type), key=lambda r: r[4])[: args.per_type]
        for s, image, truth, predicted, msa in rows:
            caption = (f"{s.id}  annotated {int(truth.max())} cells (green)  |  model {int(predicted.max())} cells "
                       f"(orange)  mSA {msa:.3f}")
            path = args.out / f"{cell_type}-{s.id.split(':')[-1].split('.')[0]}.png"
            side_by_side(image, truth, predicted, caption).save(path)
            print(f"wrote {path}: {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
