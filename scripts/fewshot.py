"""Few-shot curves: fine-tune on k annotated images of one cell type, measure on other images of it.

    python scripts/fewshot.py --type astro --k 1,3,10 --minutes 5 --json docs/fewshot_astro.json

For each k, k images of the type (`--pool val`: the first k of the validation split; `--pool train`:
a seeded draw from the training split) are written as a lab would hand them over (`X.png` +
`X_masks.png`, 16-bit labels) and `python -m train finetune` runs on them with nothing held back
(`--hold-out 0`). Base and fine-tuned models are then measured on `--test` images of the type from
the other split (a fixed, seeded sample). With `--pool val` the shipped model was trained on the test
images, so its "before" is flattering; `--pool train`, or a base that never saw the type
(`--base-model`, trained with `python -m train --exclude-types TYPE`), measures on unseen images. Each run's folder stays
under --work for inspection (model, metrics.json, MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inference import command_line, machine_description, publish_report  # noqa: E402
from cellseg.data import Sample, default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.instances import label_png_bytes, png_bytes  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402
from train.finetune import summary  # noqa: E402  the figures finetune's metrics.json reports


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
    return summary(evaluate_segmentations(samples, OnnxModel(model_path).segment(images)))  # its own thresholds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", required=True, help="cell type (e.g. astro, shsy5y, cort)")
    p.add_argument("--k", default="1,3,10", help="training-set sizes")
    p.add_argument("--minutes", type=float, default=5.0, help="fine-tuning budget per run")
    p.add_argument("--test", type=int, default=12, help="images of the type measured on (from the other split)")
    p.add_argument("--pool", choices=("val", "train"), default="val",
                   help="split the k training images come from; the test images come from the other one. "
                        "train: the test images are ones the shipped model never saw (validation)")
    p.add_argument("--test-from", choices=("other", "same"), default="other",
                   help="other: test images from the other split; same: from the pool's own split, disjoint from "
                        "the training images (--pool val --test-from same: both sets unseen by the shipped model)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws of training and test images")
    p.add_argument("--base-model", type=Path, default=default_model_path(),
                   help="the base ONNX (before); its weights, <stem>.safetensors beside it, are fine-tuned")
    p.add_argument("--hold-out", default="0",
                   help="passed to finetune: images held back for its verdict ('auto': finetune's default, as a lab "
                        "runs it; default 0: all k train)")
    p.add_argument("--finetune-args", default="",
                   help="more finetune options, one string (e.g. \"--freeze-encoder --lr 1e-3\")")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--work", type=Path, default=Path("runs/fewshot"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import numpy as np

    test_split = "train" if args.pool == "val" else "val"
    pool = [s for s in load_split(args.data, args.pool) if s.cell_type == args.type]
    if args.pool == "train" or args.test_from == "same":  # fine-tune on a seeded draw
        pool = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))]
    if args.test_from == "same":  # the last --test of the draw are measured on, the first k trained on
        if args.test >= len(pool):
            raise SystemExit(f"--test {args.test} leaves none of the {len(pool)} {args.type} images to train on")
        others, pool = pool[len(pool) - args.test:], pool[: len(pool) - args.test]
    else:
        others = [s for s in load_split(args.data, test_split) if s.cell_type == args.type]
    test = [others[i] for i in sorted(np.random.default_rng(args.seed).choice(len(others), min(args.test, len(others)),
                                                                              replace=False))]
    images = [s.image() for s in test]
    base_trained_on = set((OnnxModel(args.base_model).metadata.get("data_split") or {}).get("train") or [])
    result = {"type": args.type, "pool": args.pool, "test_from": args.test_from, "seed": args.seed,
              "test_images": [s.id for s in test],
              "test_images_the_base_trained_on": sum(s.id in base_trained_on for s in test),
              "base_model": str(args.base_model),
              "before": measure(args.base_model, test, images), "runs": [], "machine": machine_description(),
              "command": command_line(), "finetune_args": args.finetune_args, "hold_out": args.hold_out}
    print(f"{args.type}: before {result['before']} on {len(test)} images", flush=True)
    for k in (int(v) for v in args.k.split(",")):
        if k > len(pool):
            print(f"k={k}: only {len(pool)} validation images of {args.type}; skipped", flush=True)
            continue
        run = args.work / f"{args.type}-k{k}"
        write_lab_folder(pool[:k], run / args.type)  # the folder's name is the cell type in reports
        started = time.time()
        hold_out = [] if args.hold_out == "auto" else ["--hold-out", args.hold_out]
        finished = subprocess.run([sys.executable, "-m", "train", "finetune", str(run / args.type), "--out",
                                   str(run / "model"), "--overwrite", "--minutes", str(args.minutes), *hold_out,
                                   "--name", f"{args.type}-k{k}", "--base", str(args.base_model.with_suffix(".safetensors")),
                                   *shlex.split(args.finetune_args)], cwd=ROOT)
        if finished.returncode not in (0, 5):  # 5: its verdict was "not better", recorded below
            raise SystemExit(f"finetune failed (exit {finished.returncode})")
        minutes = round((time.time() - started) / 60, 1)
        metrics = json.loads((run / "model" / "metrics.json").read_text())
        steps = metrics["training"]["steps"]
        row = {"k": k, "train_images": [s.id for s in pool[:k]],
               "train_images_the_base_trained_on": sum(s.id in base_trained_on for s in pool[:k]),
               "minutes_total": minutes, "steps": steps,
               "steps_per_minute": metrics["training"].get("steps_per_minute"),
               "verdict": metrics["verdict"]["line"], "thresholds": metrics.get("thresholds"),
               "cell_merge": metrics.get("cell_merge"), "cell_filter": metrics.get("cell_filter"),
               "after_fp32": measure(run / "model" / "model.onnx", test, images),
               "after_int8": measure(run / "model" / "model.int8.onnx", test, images)}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    publish_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
