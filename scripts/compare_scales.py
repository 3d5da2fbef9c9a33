"""Does the network see small cells better when the image is enlarged first? Inference only.

Each validation image is resized by SCALE (bilinear), segmented by the network, its maps resized back
to native resolution (area averaging) and post-processed there with the model's defaults, so every
scale is scored against the same native-resolution annotations. The network was trained with zoom
augmentation 0.75-1.33, so scales up to about 1.33 stay within what it has seen. Network time grows
with SCALE².

    python scripts/compare_scales.py --scales 1,1.25,1.5 --json docs/scale_comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations, selection_score  # noqa: E402
from cellseg.inference import Segmentation, predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402


def maps_at_scale(model: OnnxModel, image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape
    if scale == 1:
        return predict_maps(model.predict, [image])[0]
    big = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    maps = predict_maps(model.predict, [big])[0]
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) for m in maps])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--split", default="val")
    p.add_argument("--scales", default="1,1.25,1.5")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    model = OnnxModel(args.model)
    params = model.default_params
    samples = load_split(args.data, args.split)
    images = [s.image() for s in samples]
    report = {"model": str(args.model), "split": args.split, "params": params.to_dict(), "scales": {}}
    keys = ("ap50", "ap75", "msa", "count_error")
    for scale in [float(s) for s in args.scales.split(",")]:
        t0 = time.perf_counter()
        maps = [maps_at_scale(model, im, scale) for im in tqdm(images, desc=f"scale {scale}")]
        seconds = (time.perf_counter() - t0) / len(images)
        metrics = evaluate_segmentations(samples, [Segmentation.from_maps(m, params) for m in maps])
        row = {"network_seconds_per_image": round(seconds, 3), "score": round(selection_score(metrics), 4),
               **{f"{name}_{k}": round(m[k], 4) for name, m in {**metrics["per_source"], **metrics["per_cell_type"]}.items()
                  for k in keys}}
        report["scales"][str(scale)] = row
        print(f"scale {scale}: {seconds:.2f} s/image, score {row['score']}, " + ", ".join(
            f"{t} AP75 {row[t + '_ap75']:.3f} mSA {row[t + '_msa']:.3f}"
            for t in ("livecell", "sartorius", "astro", "cort", "shsy5y")), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
