"""Write docs/METRICS.md from `cellseg evaluate --json` outputs and the model's training history.

    python scripts/write_metrics_doc.py --val outputs/eval_val.json --train outputs/eval_train.json \
        --history models/livecell-unet.history.json --out docs/METRICS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLS = ("n_images", "n_cells", "foreground_iou", "dice", "pixel_accuracy", "ap", "ap50", "ap75", "msa", "count_error")
TARGETS = {"foreground_iou": 0.75, "ap50": 0.35, "msa": 0.15}


def table(result: dict) -> str:
    lines = ["| group | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 1)]

    def row(name, m):
        return f"| {name} | " + " | ".join(str(m[c]) if isinstance(m[c], int) else f"{m[c]:.3f}" for c in COLS) + " |"

    lines.append(row("**all**", result))
    lines += [row(f"[{k}]", v) for k, v in result["per_source"].items()]
    lines += [row(k, v) for k, v in result["per_cell_type"].items()]
    return "\n".join(lines)


def per_image(result: dict) -> str:
    lines = ["| image | cell type | true | predicted | fg IoU | mSA |", "|---|---|---|---|---|---|"]
    for r in result["per_image"]:
        lines.append(f"| `{r['id']}` | {r['cell_type']} | {r['n_true']} | {r['n_pred']} | "
                     f"{r['foreground_iou']:.3f} | {r['msa']:.3f} |")
    return "\n".join(lines)


def curve(history: list[dict]) -> str:
    lines = ["| epoch | step | train min | loss | val fg IoU | val AP | val AP50 | val mSA |",
             "|---|---|---|---|---|---|---|---|"]
    for h in history:
        v = h["val"]
        lines.append(f"| {h['epoch']} | {h['step']} | {h['train_seconds'] / 60:.1f} | {h['loss']['total']:.3f} | "
                     f"{v['foreground_iou']:.3f} | {v['ap']:.3f} | {v['ap50']:.3f} | {v['msa']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--train", type=Path)
    p.add_argument("--history", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/METRICS.md"))
    p.add_argument("--notes", type=Path, help="markdown appended at the end (analysis)")
    args = p.parse_args()
    val = json.loads(args.val.read_text())
    history = json.loads(args.history.read_text())
    met = ", ".join(f"{k} {val[k]:.3f} ({'meets' if val[k] >= t else 'MISSES'} ≥ {t})" for k, t in TARGETS.items())
    text = f"""# Accuracy of the shipped model

Model: `models/{Path(val['model']).name}` (sha256 `{val['model_sha256']}`). Post-processing: `{val['postprocess']}`.
All numbers come from `cellseg evaluate`, i.e. the same inference path as the service and batch jobs
(whole-image percentile normalisation, ONNX Runtime, seeded watershed), at native resolution.

## Validation split (6 images, 6 cell types; never trained on)

Command: `cellseg evaluate --model models/livecell-unet.onnx --split val --json {args.val}`

Targets: {met}.

{table(val)}

Per image:

{per_image(val)}
"""
    if args.train:
        train = json.loads(args.train.read_text())
        text += f"""
## Training split (15 images; for comparison: the gap to validation shows over/under-fitting)

Command: `cellseg evaluate --model models/livecell-unet.onnx --split train --json {args.train}`

{table(train)}
"""
    text += f"""
## Learning curve (validation after every epoch, from the checkpoint's history)

From `{args.history}` (written by `python -m export`). Validation here used the post-processing
defaults of training time (seed 0.5, no smoothing), so its AP is lower than the final table's.

{curve(history)}

Metric definitions: `cellseg/evaluate.py` (COCO AP/AP50/AP75 with pycocotools, maxDets 100/500/2000,
read at 2000 detections; mSA = mean over IoU 0.50..0.95 of TP/(TP+FP+FN) per image; count_error =
mean |predicted - true| / true cell count; foreground IoU / Dice / pixel accuracy per image, averaged).
"""
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
