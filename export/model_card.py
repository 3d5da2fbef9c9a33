"""The model card written next to the shipped ONNX file."""

from __future__ import annotations

from pathlib import Path

METRIC_ROWS = ("foreground_iou", "dice", "pixel_accuracy", "ap", "ap50", "ap75", "msa", "count_error")


def _metrics_table(metrics: dict) -> str:
    cols = ("n_images", "n_cells", *METRIC_ROWS)
    lines = ["| group | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def row(name, m):
        return f"| {name} | " + " | ".join(str(m[c]) if isinstance(m[c], int) else f"{m[c]:.3f}" for c in cols) + " |"

    lines.append(row("**all**", metrics))
    for name, m in metrics.get("per_source", {}).items():
        lines.append(row(f"[{name}]", m))
    for name, m in metrics.get("per_cell_type", {}).items():
        lines.append(row(name, m))
    return "\n".join(lines)


def write_model_card(path: Path, onnx_path: Path, meta: dict, sha256: str, export_command: str) -> None:
    training, arch, metrics = meta["training"], meta["architecture"], meta["metrics"]
    split = meta["data_split"]
    text = f"""# Model card: {meta['name']}

`{onnx_path.name}` — {onnx_path.stat().st_size / 1e6:.1f} MB, fp32, sha256 `{sha256}`

## What it does
Instance segmentation of cells in label-free phase-contrast microscopy (LIVECell-style, ~0.6 µm/px,
704x520 tiles; larger images are tiled). Input: one grayscale image, normalised per image
({meta['normalization']['method']} {meta['normalization']['low']}–{meta['normalization']['high']} → 0–1),
shape (N, 1, H, W) with H, W multiples of {meta['input']['size_divisor']} (dynamic batch/height/width).
Output: (N, 3, H, W) sigmoid probabilities, channels `{', '.join(meta['output_channels'])}`:
cell foreground, inner {meta['boundary_width']}-px cell boundary, and per-cell normalised distance to the edge.
`cellseg.postprocess` turns them into a label image with a seeded watershed; its defaults
(stored in the ONNX metadata under `cellseg`): `{meta['postprocess']}`.

## Architecture
`smp.Unet`, encoder `{arch['encoder']}` trained from scratch (`encoder_weights={training['encoder_weights']}`),
decoder channels {arch['decoder_channels']}, 1 input channel, 3 output channels.

## Training data
Real annotated images in `../shared/data` (a 1% LIVECell sample, COCO polygons, plus 5 Kaggle
Sartorius images, RLE): the project's fixed split (`cellseg/splits.json`).
- train ({len(split['train'])} images): {', '.join(f'`{i}`' for i in split['train'])}
- validation ({len(split['val'])} images): {', '.join(f'`{i}`' for i in split['val'])}

Training: {training['epochs']} epochs x {training['steps_per_epoch']} steps, batch {training['batch_size']} of
{training['crop']}² native-resolution crops (flips, 90° rotations, ±30° rotation, 0.75–1.33 scale,
brightness/contrast, noise, blur), BCE+Dice (foreground, boundary with positive weight) + BCE (distance),
AdamW lr {training['lr']} with warm-up and cosine decay, seed {training['seed']}.
Checkpoint: epoch {training['best_epoch']} of {training['epochs']}, {training['train_minutes']} min of training on a 2-core CPU.

Command: `{training['command']}`

Export: `{export_command}` (ONNX opset 18; ONNX Runtime vs PyTorch max abs diff
{meta.get('parity_max_abs_diff', float('nan')):.1e} on real images).

## Metrics (validation split, `cellseg evaluate`, same inference path as the service)
"""
    if metrics:
        text += _metrics_table(metrics) + """

AP / AP50 / AP75: COCO segm AP with LIVECell's protocol (maxDets 100/500/2000, read at 2000).
mSA: mean over IoU 0.50–0.95 of TP/(TP+FP+FN) (Kaggle Sartorius metric). count_error: mean
relative error of the cell count. Only 6 validation images: treat per-type numbers as indicative;
see docs/METRICS.md (also for how the checkpoint and the post-processing defaults were chosen).
"""
    else:
        text += "Not evaluated at export time.\n"
    text += """
## Licence
The code is the project's. **The weights were trained on LIVECell data (Edlund et al., "LIVECell—A
large-scale dataset for label-free live cell segmentation", Nature Methods 2021), licensed
CC BY-NC 4.0 by Sartorius, and on Kaggle Sartorius competition images derived from it: the weights
inherit the non-commercial terms (CC BY-NC 4.0). Attribute LIVECell when you use them.**

## Limits
Trained on 15 images: expect lower accuracy on cell types absent from training (BV2, SH-SY5Y
from LIVECell; astrocytes and cortical neurons are represented by 1–2 Kaggle images each) and on
other microscopes or magnifications. Not for clinical use.
"""
    path.write_text(text)
