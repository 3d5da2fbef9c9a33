"""Few-shot curves: fine-tune on k annotated images of one cell type, measure on other images of it.

    python scripts/fewshot.py --type astro --k 1,3,10 --minutes 5 --json docs/fewshot_astro.json

For each k, the first k images of the type in the project's validation split are written as a lab
would hand them over (`X.png` + `X_masks.png`, 16-bit labels) and `python -m train finetune` runs on
them with nothing held back (`--hold-out 0`). Base and fine-tuned models are then measured on
`--test` other images of the type from the training split (a fixed, seeded sample): note that the
base model was trained on those, so its "before" is if anything flattering. Each run's folder stays
under --work for inspection (model, metrics.json, MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inference import machine_description  # noqa: E402
from cellseg.data import Sample, default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.instances import label_png_bytes, png_bytes  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402

KEYS = ("ap50", "ap75", "msa", "foreground_iou", "count_error")


def write_lab_folder(samples: list[Sample], folder: Path) -> None:
    """Images and their label masks under Cellpose's names, as a lab exports them."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        stem = sample.id.replace(":", "_")
        image = read_image(sample.image_path)
        (folder / f"{stem}.png").write_bytes(png_bytes(np.clip(image, 0, 65535).astype(np.uint16)))
        (folder / f"{stem}_masks.png").write_bytes(label_png_bytes(sample.labels()))


def measure(model_path: Path, samples: list[Sample], images) -> dict:
    metrics = evaluate_segmentations(samples, OnnxModel(model_path).segment(images))  # its own thresholds
    return {k: round(float(metrics[k]), 4) for k in KEYS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", required=True, help="cell type (e.g. astro, shsy5y, cort)")
    p.add_argument("--k", default="1,3,10", help="training-set sizes")
    p.add_argument("--minutes", type=float, default=5.0, help="fine-tuning budget per run")
    p.add_argument("--test", type=int, default=12, help="images of the type measured on (training split)")
    p.add_argument("--base-model", type=Path, default=default_model_path(), help="the base ONNX (before)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--work", type=Path, default=Path("runs/fewshot"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import numpy as np

    pool = [s for s in load_split(args.data, "val") if s.cell_type == args.type]
    others = [s for s in load_split(args.data, "train") if s.cell_type == args.type]
    test = [others[i] for i in sorted(np.random.default_rng(0).choice(len(others), min(args.test, len(others)),
                                                                       replace=False))]
    images = [s.image() for s in test]
    result = {"type": args.type, "test_images": [s.id for s in test], "base_model": str(args.base_model),
              "before": measure(args.base_model, test, images), "runs": [], "machine": machine_description(),
              "command": "python scripts/fewshot.py " + " ".join(sys.argv[1:])}
    print(f"{args.type}: before {result['before']} on {len(test)} images", flush=True)
    for k in (int(v) for v in args.k.split(",")):
        if k > len(pool):
            print(f"k={k}: only {len(pool)} validation images of {args.type}; skipped", flush=True)
            continue
        run = args.work / f"{args.type}-k{k}"
        write_lab_folder(pool[:k], run / "annotated")
        started = time.time()
        subprocess.run([sys.executable, "-m", "train", "finetune", str(run / "annotated"), "--out", str(run / "model"),
                        "--minutes", str(args.minutes), "--hold-out", "0", "--name", f"{args.type}-k{k}"],
                       cwd=ROOT, check=True)
        minutes = round((time.time() - started) / 60, 1)
        row = {"k": k, "train_images": [s.id for s in pool[:k]], "minutes_total": minutes,
               "after_fp32": measure(run / "model" / "model.onnx", test, images),
               "after_int8": measure(run / "model" / "model.int8.onnx", test, images)}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
