"""The model card written next to the shipped ONNX file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cellseg.onnx_model import sha256_file

METRIC_ROWS = ("foreground_iou", "dice", "pixel_accuracy", "ap", "ap50", "ap75", "msa", "count_error",
               "confluence_error")


def _metrics_table(metrics: dict) -> str:
    cols = ("n_images", "n_cells", *METRIC_ROWS)
    lines = ["| group | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def row(name, m):
        def cell(value) -> str:
            return "–" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}"

        return f"| {name} | " + " | ".join(cell(m.get(c)) for c in cols) + " |"  # older files lack newer metrics

    lines.append(row("**all**", metrics))
    for name, m in metrics.get("per_source", {}).items():
        lines.append(row(f"[{name}]", m))
    for name, m in metrics.get("per_cell_type", {}).items():
        lines.append(row(name, m))
    return "\n".join(lines)


def _sources_text(ids: list[str]) -> str:
    """What the images of a run's split are, counted from their ids."""
    livecell = sum(i.startswith("livecell:") for i in ids)
    parts = [f"{livecell} LIVECell images (COCO polygons)"] if livecell else []
    if len(ids) - livecell:
        parts.append(f"{len(ids) - livecell} Kaggle Sartorius images (RLE; astrocytes, cortical neurons, SH-SY5Y, "
                     "from the same microscope)")
    return " and ".join(parts) or "no images"


def _livecell_text(train_ids: list[str]) -> str:
    types = {i.split(":")[2].split("_")[0] for i in train_ids if i.startswith("livecell:")}
    count = sum(i.startswith("livecell:") for i in train_ids)
    return f"{count} training image{'s' * (count != 1)} of {len(types)} cell type{'s' * (len(types) != 1)}"


def _short_run_text(training: dict) -> str:
    """A run limited by --max-images (a check, not real training) says so where its data is described."""
    if "--max-images" not in training.get("command", ""):
        return ""
    return ("\n**A short run** (`--max-images`, for checking the pipeline, not for real training): the images "
            "and figures below are its own.")


def _composition(ids: list[str]) -> str:
    """'11 LIVECell (BT474 3, ...), 456 Sartorius (cort 299, ...)' from split ids."""
    def kind(i: str) -> tuple[str, str]:
        if i.startswith("livecell:"):
            return "LIVECell", i.split(":")[2].split("_")[0]
        return "Sartorius", "?"
    by_source = Counter(kind(i)[0] for i in ids)
    types = Counter(kind(i) for i in ids if kind(i)[0] == "LIVECell")
    livecell = ", ".join(f"{t} {n}" for (_, t), n in sorted(types.items()))
    parts = []
    if by_source["LIVECell"]:
        parts.append(f"{by_source['LIVECell']} LIVECell ({livecell})")
    if by_source["Sartorius"]:
        parts.append(f"{by_source['Sartorius']} Kaggle-Sartorius")
    return ", ".join(parts)


def _encoder_text(training: dict) -> str:
    source = training.get("encoder_weights_source")
    if training.get("init_weights"):
        start = f", whose encoder started from ImageNet weights `{source['name']}`" if source else ""
        return (f"warm-started from every weight of `{training['init_weights']}` (sha256 "
                f"`{training.get('init_weights_sha256') or '?'}`: the previously shipped model of the same "
                f"architecture{start}; docs/METRICS.md says how it was trained)")
    if not source:
        return "trained from random initialisation (`encoder_weights=None`)"
    return (f"initialised from ImageNet weights `{source['name']}`: {source.get('origin')} "
            f"(installed from the package index as `{source.get('pip', '?')}`, sha256 `{source.get('sha256', '?')}`, "
            f"licence {source.get('licence')}); the RGB stem summed to 1 channel as smp does")


def _precision_text(training: dict) -> str:
    return f" with {training['precision']} autocast" if training.get("precision") == "bf16" else ""


def _data_text(training: dict) -> str:
    if "packed" not in str(training.get("data") or ""):
        return ""
    return ("\nThe images travelled to that machine as JPEG copies (`scripts/pack_data.py`, masks exact); every "
            "figure below is measured on the original images.")


def _sampling_text(training: dict) -> str:
    if training.get("balance") == "source-type":
        return "with equal shares per source, then per cell type"
    return "uniformly over images"


def _int8_text(int8: dict | None, fp32_metrics: dict | None) -> str:
    if not int8:
        return ""
    recipe = int8.get("recipe") or {}
    how = ", ".join(f"{k} {v}" for k, v in recipe.items()) if recipe else "static QDQ"
    text = (f"\n## int8 variant\n`{int8['file']}` — {int8['mb']} MB, static QDQ quantisation ({how}; "
            f"`python -m export int8`, recipe chosen in docs/int8_comparison.json: the one as accurate on CPUs "
            f"without VNNI as with it), sha256 `{int8['sha256']}`.\n")
    if int8.get("metrics") and fp32_metrics:
        q = int8["metrics"]
        compared = ", ".join(f"{k} {q[k]:.4f} (fp32 {fp32_metrics[k]:.4f})" for k in ("foreground_iou", "ap50", "msa"))
        text += f"Validation, same split and post-processing: {compared}.\n"
        from cellseg.variants import INT8_TOLERANCE, default_precision

        measured = f" on {q['cpu']}" if q.get("cpu") else ""
        if recipe.get("reduce_range"):
            text += ("Its 7-bit weights keep the int8 kernels' 16-bit sums of CPUs without VNNI (AVX2, AVX-512 without "
                     "VNNI) from saturating, so it gives the same cells there as with VNNI or AMX: with this recipe, "
                     "the shipped model's validation figures on an emulated AVX2 CPU were its native ones to the last "
                     "digit (docs/METRICS.md, \"int8 across CPUs\"); each CPU's own check, below, confirms it for "
                     "this file.\n")
        if default_precision(fp32_metrics, q) == "int8":
            text += (f"Its AP50 and mSA are each within {INT8_TOLERANCE} of fp32's{measured}, so int8 **may** answer "
                     "by default; each machine that loads it runs int8 only where, on its own CPU, int8's cells agree "
                     "with fp32's on the reference images and it is faster (`cellseg/precision.py`), and says which "
                     "precision answers and why. `CELLSEG_PRECISION=fp32|int8` forces one.\n")
        else:
            text += f"**fp32 answers by default**: int8 is not within {INT8_TOLERANCE} AP50 and mSA of fp32{measured}.\n"
        text += f"\n{_metrics_table(q)}\n"
    return text


def replace_int8_section(card: Path, int8: dict, fp32_metrics: dict) -> None:
    """Rewrite the '## int8 variant' section of a model card (after `python -m export int8`), up to the next section."""
    text = card.read_text()
    start = text.index("\n## int8 variant\n")
    end = text.index("\n## ", start + 1)
    card.write_text(text[:start] + _int8_text(int8, fp32_metrics) + text[end:])


def write_model_card(path: Path, onnx_path: Path, meta: dict, sha256: str, export_command: str,
                     int8: dict | None = None) -> None:
    training, arch, metrics = meta["training"], meta["architecture"], meta["metrics"]
    split = meta["data_split"]
    text = f"""# Model card: {meta['name']}

`{onnx_path.name}` — {onnx_path.stat().st_size / 1e6:.1f} MB, fp32, sha256 `{sha256}`.
`{onnx_path.with_suffix('.safetensors').name}` — the same weights for PyTorch (the TorchScript of the
bioimage.io package, `python -m export bioimageio`, is traced from them and checked against the ONNX file).

## What it does
Instance segmentation of cells in label-free phase-contrast microscopy (LIVECell-style, ~0.6 µm/px,
704x520 tiles; larger images are tiled). Input: one grayscale image, normalised per image
({meta['normalization']['method']} {meta['normalization']['low']}–{meta['normalization']['high']} → 0–1),
shape (N, 1, H, W) with H, W multiples of {meta['input']['size_divisor']} (dynamic batch/height/width; other sizes run
but give other maps near the edges: pad by reflection first, as `cellseg.preprocess.pad_to` does).
Output: (N, 3, H, W) sigmoid probabilities, channels `{', '.join(meta['output_channels'])}`:
cell foreground, inner {meta['boundary_width']}-px cell boundary, and per-cell normalised distance to the edge.
`cellseg.postprocess` turns them into a label image with a seeded watershed; its defaults
(stored in the ONNX metadata under `cellseg`): `{thresholds_only(meta['postprocess'])}`.{_model_rules_text(meta)}

## Architecture
`smp.Unet`, encoder `{arch['encoder']}` {_encoder_text(training)},
decoder channels {arch['decoder_channels']}, 1 input channel, 3 output channels.

## Training data
Real annotated images in `../shared/data`: {_sources_text(split['train'] + split['val'])},
in the project's fixed split (`cellseg/splits.json`, made by `scripts/make_split.py`).{_short_run_text(training)}
- train: {len(split['train'])} images — {_composition(split['train'])}
- validation: {len(split['val'])} images — {_composition(split['val'])}: {', '.join(f'`{i}`' for i in split['val'])}

Training: {training['epochs']} epochs x {training['steps_per_epoch']} steps, batch {training['batch_size']} of
{training['crop']}² native-resolution crops (flips, 90° rotations, ±30° rotation, 0.75–1.33 scale,
brightness/contrast, noise, blur), drawn {_sampling_text(training)};
BCE+Dice (foreground, boundary with positive weight) + BCE (distance),
AdamW lr {training['lr']} with warm-up and cosine decay, seed {training['seed']}.
Checkpoint: epoch {training['best_epoch']} of {training['epochs']}, {training['train_minutes']} min of training on
{training.get('device') or 'a 2-core CPU'}{_precision_text(training)}.{_data_text(training)}

Command: `{training['command']}`

Export: `{export_command}` (ONNX opset 18; ONNX Runtime vs PyTorch max abs diff
{meta.get('parity_max_abs_diff', float('nan')):.1e} on real images).

## Metrics (validation split, `cellseg evaluate`, same inference path as the service)
"""
    if metrics:
        text += _metrics_table(metrics) + """

AP / AP50 / AP75: COCO segm AP with LIVECell's protocol (maxDets 100/500/2000, read at 2000).
mSA: mean over IoU 0.50–0.95 of TP/(TP+FP+FN) (Kaggle Sartorius metric). count_error: mean
relative error of the cell count; confluence_error: of the area covered by cells. Per-type numbers
rest on 1 (LIVECell) to 11 (Sartorius) images; see docs/METRICS.md (also for how the encoder, the
checkpoint and the post-processing defaults were chosen).
"""
    else:
        text += "Not evaluated at export time.\n"
    text += _int8_text(int8, metrics)
    text += """
## Licence
The code is the project's. **The weights were trained on LIVECell data (Edlund et al., "LIVECell—A
large-scale dataset for label-free live cell segmentation", Nature Methods 2021), licensed
CC BY-NC 4.0 by Sartorius, and on Kaggle Sartorius competition images derived from it: the weights
inherit the non-commercial terms (CC BY-NC 4.0). Attribute LIVECell when you use them.**
""" + (f"The encoder's starting weights ({training['encoder_weights_source']['name']}) are licensed "
       f"{training['encoder_weights_source'].get('licence')}.\n" if training.get("encoder_weights_source") else "") + f"""
## Limits
LIVECell is represented by {_livecell_text(split['train'])} (the full LIVECell download has 5,239):
expect lower accuracy on LIVECell cell types absent from training and on other microscopes or
magnifications. Not for clinical use.
"""
    path.write_text(text)


def _here_text(here: dict | None) -> str:
    """Which precision the runtime's check picked on the CPU that fine-tuned (cellseg/precision.py);
    every machine that loads the model checks again on its own CPU."""
    if not here:
        return ""
    return (f"\n- On the CPU it was fine-tuned on ({here['cpu']}), **{here['precision']}** answers: {here['reason']}. "
            "Every machine that loads the model checks int8 again on its own CPU.")


def _training_text(training: dict, minutes_total: float) -> str:
    if not training.get("trained", True):
        return (f"None (`--no-train`): the base model's network weights, with the thresholds and TTA above picked "
                f"for these images; {minutes_total} min in all with measuring and export.")
    return (f"{training['steps']} steps of {training['batch_size']} x {training['crop']}² crops in "
            f"{training['train_minutes']} min ({training.get('steps_per_minute', '?')} a minute; the whole run's budget "
            f"{training['minutes']} min) on {training['device']}, precision {training['precision']}, peak learning rate "
            f"{training['lr']}, seed {training['seed']}; {minutes_total} min in all with measuring and export.")


def thresholds_only(postprocess: dict) -> dict:
    """The thresholds without the cell rules' coefficients (those stay in the metadata)."""
    return {k: v for k, v in postprocess.items() if k not in ("cell_filter", "cell_merge")}


def _model_rules_text(meta: dict) -> str:
    """The shipped model's cell rules (`python -m export cell-rules`): what they do and why each was kept."""
    rules = meta.get("cell_rules")
    if not rules:
        return ""
    return (f"\nThen the cell rules (`cellseg.cell_merge`, `cellseg.cell_filter`; coefficients in the same metadata), "
            f"fitted on {len(rules['fitted_on'])} training images (at most {_per_type(rules['command'])} per cell "
            "type) and confirmed on "
            f"{len(rules['held_back'])} other training images with `{rules['command']}`:\n"
            + _cell_rules_text(rules)
            + ("With the filter, each cell's `score` is its P(annotated)." if meta["postprocess"].get("cell_filter") else ""))


def _per_type(command: str) -> int:
    """The --per-type of an `export cell-rules` command (its default, 8, where it gives none)."""
    import re

    found = re.search(r"--per-type[ =](\d+)", command)
    return int(found.group(1)) if found else 8


def _cell_rules_text(results: dict) -> str:
    """What the lab's annotations taught about its cells (train/cell_rules.py), one line per rule."""
    return "".join(f"Cells: {results[field]['reason']}.\n" for field in ("cell_merge", "cell_filter") if results.get(field))


def _tta_text(tta: bool) -> str:
    if not tta:
        return ("Runs without test-time augmentation, as its base does (`finetune --tta` makes a model that runs "
                "with it).")
    return ("Runs with test-time augmentation by default (4 mirrorings averaged, about 4x the network time): its "
            "thresholds were picked and its figures above measured that way, and every runtime (service, "
            "`cellseg segment`, napari) applies it unless a request says `tta=false` (`--no-tta`).")


def write_finetune_card(path: Path, results: dict, fp32: Path, int8: Path) -> None:
    """The card of a model fine-tuned on a lab's images: before/after on the images held back, how
    long it trained, the thresholds picked and the command, so the lab can judge and repeat it."""
    tta = results.get("tta", False)
    with_tta = " (TTA)" if tta else ""
    training = results["training"]
    trained = training.get("trained", True)
    kind = "fine-tuned" if trained else "adapted"  # --no-train: the base's network, post-processing picked here
    origin, used_for = ("Fine-tuned", "trained on") if trained else ("Adapted", "thresholds and rules picked on")
    how = "" if trained else " --no-train (the base's network weights; thresholds and cell rules picked for these images)"
    rows = [("base model, its thresholds", results["before"]), (f"{kind}, fp32{with_tta}", results["after"]["fp32"]),
            (f"{kind}, int8{with_tta}", results["after"]["int8"])]
    table = "| model | AP50 | AP75 | mSA | foreground IoU | count error |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {name} | {m.get('ap50', float('nan')):.3f} | {m.get('ap75', float('nan')):.3f} | "
        f"{m.get('msa', float('nan')):.3f} | {m.get('foreground_iou', float('nan')):.3f} | "
        f"{m.get('count_error', float('nan')):.2f} |" for name, m in rows)
    held = results["held_back"]
    here = _here_text(results.get("precision_here"))
    verdict = results.get("verdict")
    lead = f"**{verdict['line']}**\n\n" if verdict else ""
    text = f"""# Model card: {results['name']}

{lead}{origin} from `{Path(results['base']).name}` (sha256 `{results['base_sha256']}`) on a lab's own annotated
images with `python -m train finetune`{how}.

- `{fp32.name}`: fp32 ONNX, sha256 `{sha256_file(fp32)}`; thresholds and provenance in its metadata (`cellseg`).
- `{int8.name}`: int8 (static QDQ, calibrated on the training images), sha256 `{sha256_file(int8)}`;
  it loses {results['int8_loss']['ap50']:+.3f} AP50 and {results['int8_loss']['msa']:+.3f} mSA against fp32 on the images
  below.{here}

## Data
- {used_for} {len(results['images'])} images: {', '.join(f'`{i}`' for i in results['images'])}
- measured on {f"{len(held)} held-back images: " + ', '.join(f'`{i}`' for i in held) if held else
               "the training images (fewer than three images: none could be held back, so the figures are optimistic)"}

## Before and after ({'held-back' if held else 'training'} images, `cellseg.evaluate`)
{table}

Thresholds: {results.get('thresholds', {}).get('reason', 'picked on the training images')}:
`{thresholds_only(results['postprocess'])}`
(the base model's: `{thresholds_only(results['base_postprocess'])}`).
{_cell_rules_text(results)}{_tta_text(tta)}

## Training
{_training_text(training, results['minutes_total'])}

Command: `{training['command']}`

## Licence
Derived from weights trained on LIVECell (CC BY-NC 4.0, Sartorius) and the Kaggle Sartorius images:
the weights are for non-commercial use only, as the base model's.
"""
    path.write_text(text)
