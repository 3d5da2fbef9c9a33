"""int8 recipes side by side: validation accuracy (same split and post-processing as fp32) and
network time on one LIVECell image, in one run. Picks which int8 variant may be served by default.

    python scripts/compare_int8.py --json docs/int8_comparison.json

A recipe qualifies as the default when its AP50 and mSA are each within 0.01 of fp32 (issue 9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench_inference import livecell_images, machine_description, timeit, write_report  # noqa: E402
from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import predict_padded  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402
from cellseg.preprocess import normalize  # noqa: E402
from export.int8 import Int8Recipe, calibration_images, quantize  # noqa: E402

RECIPES = {
    "per-tensor, 8 images, minmax": Int8Recipe(False, 8, "minmax"),
    "per-channel, 8 images, minmax": Int8Recipe(True, 8, "minmax"),
    "per-channel, 32 images, minmax": Int8Recipe(True, 32, "minmax"),
    "per-channel, 32 images, percentile": Int8Recipe(True, 32, "percentile"),
    "per-channel, 32 images, entropy": Int8Recipe(True, 32, "entropy"),
    "per-channel, 32 images, minmax, stem+head fp32": Int8Recipe(True, 32, "minmax", True),
}
TOLERANCE = 0.01
KEYS = ("ap50", "msa", "foreground_iou")


def summary(metrics: dict) -> dict:
    out = {k: round(metrics[k], 4) for k in KEYS}
    out["per_source"] = {s: {k: round(m[k], 4) for k in ("ap50", "msa")} for s, m in metrics["per_source"].items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.onnx"))
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--workdir", type=Path, default=Path("runs/int8"))
    p.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    samples = load_split(args.data, "val")
    images = [s.image() for s in samples]
    fp32 = OnnxModel(args.model, threads=os.cpu_count())
    params = fp32.default_params
    one = [normalize(read_image(livecell_images(args.data, 1)[0]))]

    def measure(model: OnnxModel) -> dict:
        result = summary(evaluate_segmentations(samples, model.segment(images, params)))
        result["network_1_image_ms"] = timeit(lambda: predict_padded(model.predict, one), args.repeats)["p50_ms"]
        return result

    rows = {"fp32": measure(fp32)}
    print("fp32", json.dumps(rows["fp32"]), flush=True)
    cache: dict[int, list] = {}
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        out = args.workdir / (name.replace(", ", "_").replace(" ", "-").replace("+", "") + ".onnx")
        t0 = time.time()
        if recipe.calibration_images not in cache:
            cache[recipe.calibration_images] = calibration_images(args.data, recipe.calibration_images)
        quantize(args.model, out, cache[recipe.calibration_images], recipe)
        row = {"recipe": recipe.to_dict(), "file": str(out), "quantize_s": round(time.time() - t0, 1),
               **measure(OnnxModel(out, threads=os.cpu_count()))}
        row["delta"] = {k: round(row[k] - rows["fp32"][k], 4) for k in ("ap50", "msa")}
        row["qualifies"] = all(abs(v) <= TOLERANCE for v in row["delta"].values())
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    report = {"machine": machine_description(), "model": str(args.model), "split": "val", "images": len(samples),
              "tolerance": TOLERANCE, "postprocess": params.to_dict(), "rows": rows}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
