r"""Write docs/METRICS.md from `cellseg evaluate --json` outputs and the model's training history.

    python scripts/write_metrics_doc.py --val docs/eval_val.json --train docs/eval_train.json \
        --before docs/eval_val_before.json --tta docs/eval_val_tta.json --int8 docs/eval_val_int8.json \
        --int8-cpus docs/int8_comparison.json --encoders docs/encoder_comparison.json \
        --history models/livecell-unet.history.json \
        --fewshot-target docs/fewshot_astro_target.json \
        --fewshot docs/fewshot_astro_never_seen.json docs/fewshot_astro.json docs/fewshot_shsy5y.json \
        --notes docs/metrics_notes.md --out docs/METRICS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export.model_card import thresholds_only  # noqa: E402

COLS = ("n_images", "n_cells", "foreground_iou", "dice", "pixel_accuracy", "ap", "ap50", "ap75", "msa", "count_error")
EXTRA_COLS = ("n_predicted", "foreground_precision", "foreground_recall", "confluence_error")
# Issue 16's targets on the validation split: mSA per source, no cell type below mSA 0.10, and
# SH-SY5Y boundaries (AP75).
TARGETS = {"sartorius": {"msa": 0.22}, "livecell": {"msa": 0.28}}
TYPE_MSA_FLOOR = 0.10
TYPE_TARGETS = {"shsy5y": {"ap75": 0.10}}


def int8_cpus_text(report: dict, path: Path) -> str:
    """Each int8 recipe's validation figures on the machine that ran the comparison and on an emulated
    CPU without VNNI, against fp32, with its network time there (issue 24)."""
    fp32 = report["rows"]["fp32"]
    timing = report.get("timing") or {}
    lines = [f"| recipe | {report['machine']}: AP50 / mSA / fg IoU | emulated AVX2, no VNNI: AP50 / mSA / fg IoU | "
             f"network, one 704×520 image ({timing.get('machine', report['machine'])}) | within 0.01 on both |",
             "|---|---|---|---|---|",
             f"| fp32 | {fp32['ap50']:.4f} / {fp32['msa']:.4f} / {fp32['foreground_iou']:.4f} | the same (fp32 maps "
             f"differ by ~1e-6 across CPUs) | {fp32['network_1_image_ms']:.0f} ms | |"]
    for name, row in report["rows"].items():
        if name == "fp32":
            continue
        emulated = row.get("emulated_avx2")
        avx2 = (f"{emulated['ap50']:.4f} / {emulated['msa']:.4f} / {emulated['foreground_iou']:.4f}" if emulated
                else "not run: its AVX2 kernels ran over 45 CPU-minutes emulated")
        lines.append(f"| {name} | {row['ap50']:.4f} / {row['msa']:.4f} / {row['foreground_iou']:.4f} | {avx2} | "
                     f"{row['network_1_image_ms']:.0f} ms ({fp32['network_1_image_ms'] / row['network_1_image_ms']:.2f}× "
                     f"fp32) | {'**yes**' if row['qualifies'] else 'no'} |")
    table_text = "\n".join(lines)
    return f"""
## int8 across CPUs (issue 24)

Command: `python scripts/compare_int8.py --emulate --json {path}` (validation split, {report['images']} images,
the same post-processing; each recipe quantises the same fp32 file with the same 32 calibration images),
then `{timing.get('command', 'python scripts/compare_int8.py --retime')}` for the times, all files side by side
in alternating rounds on the idle machine. The emulated column runs each int8 file's network inside
`qemu-x86_64 -cpu Haswell-noTSX` (`cellseg/emulation.py`): ONNX Runtime there picks the int8 kernels of a
CPU without VNNI, whose integer results are exact, so the figures are that CPU's (not its speed); the maps
are post-processed and scored natively. The U8S8 file shipped before reproduces, to the digit, what a new
user measured on a real AVX2-only AMD EPYC (AP50 0.322, mSA 0.160).

{table_text}

Without VNNI, x86 int8 kernels add pairs of uint8 × int8 products in 16-bit registers: with 8-bit
weights a pair reaches 2 × 255 × 127 = 64,770 and saturates at 32,767. With 7-bit weights (at most 64 in
magnitude) a pair stays within 32,640, so every sum is exact and the int8 file gives the same maps
with and without VNNI: its row's two columns are identical, and it runs the same kernels as the U8S8
file, at the same speed. U8U8 is as accurate everywhere but 3× slower than fp32 here (no VNNI kernel
for it); S8S8 is slower than fp32 here (a user measured it accurate on an AVX2 EPYC, 0.453 / 0.206);
keeping the first and last convolutions in fp32 holds on AVX2 too, within 0.01, but its maps still
differ between the two CPUs (the other layers' sums still saturate there). The 7-bit file ships;
the runtime still checks int8 against fp32 on each CPU that loads it (README, "Which precision
answers").
"""


def targets_text(val: dict) -> str:
    lines = ["| target | measured | |", "|---|---|---|"]

    def add(name: str, key: str, target: float, got: float) -> None:
        lines.append(f"| {name} {key} ≥ {target} | {got:.3f} | {'met' if got >= target else '**missed**'} |")

    for source, wanted in TARGETS.items():
        for key, target in wanted.items():
            add(source, key, target, val["per_source"][source][key])
    for cell_type, m in val["per_cell_type"].items():
        add(cell_type, "msa", TYPE_MSA_FLOOR, m["msa"])
    for cell_type, wanted in TYPE_TARGETS.items():
        for key, target in wanted.items():
            add(cell_type, key, target, val["per_cell_type"][cell_type][key])
    return "\n".join(lines)


def rules_text(postprocess: dict) -> str:
    """The cell rules a model's post-processing carries, named with their cutoffs (coefficients stay in
    the model's metadata)."""
    named = [f"{what} (cutoff {postprocess[key]['cutoff']})" for key, what in
             (("cell_merge", "cell merge"), ("cell_filter", "cell filter")) if postprocess.get(key)]
    return f", then the {' and '.join(named)} (\"Cell rules in the shipped model\" below)" if named else ""


def before_after(before: dict, after: dict, label_after: str = "shipped") -> str:
    keys = ("foreground_iou", "ap50", "msa", "count_error", "confluence_error")
    lines = ["| group | " + " | ".join(f"{k} before → {label_after}" for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]

    def row(name, b, a):
        return f"| {name} | " + " | ".join(f"{b[k]:.3f} → **{a[k]:.3f}**" for k in keys) + " |"

    lines.append(row("**all**", before, after))
    for group in ("per_source", "per_cell_type"):
        for name in after[group]:
            if name in before[group]:
                lines.append(row(f"[{name}]" if group == "per_source" else name, before[group][name], after[group][name]))
    return "\n".join(lines)


def encoder_table(runs: dict) -> str:
    lines = ["| encoder (start) | steps | train min | val score | LIVECell AP50 / mSA | Sartorius AP50 / mSA |",
             "|---|---|---|---|---|---|"]
    for name, history in runs.items():
        h = history[-1]
        src = h["val_per_source"]
        lines.append(f"| {name} | {h['step']} | {h['train_seconds'] / 60:.1f} | {h['val']['score']:.3f} | "
                     f"{src['livecell']['ap50']:.3f} / {src['livecell']['msa']:.3f} | "
                     f"{src['sartorius']['ap50']:.3f} / {src['sartorius']['msa']:.3f} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    cols = COLS + tuple(c for c in EXTRA_COLS if c in result)

    lines = ["| group | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def row(name, m):
        return f"| {name} | " + " | ".join(str(m[c]) if isinstance(m[c], int) else f"{m[c]:.3f}" for c in cols) + " |"

    lines.append(row("**all**", result))
    lines += [row(f"[{k}]", v) for k, v in result["per_source"].items()]
    lines += [row(k, v) for k, v in result["per_cell_type"].items()]
    return "\n".join(lines)


def per_image(result: dict) -> str:
    lines = ["| image | cell type | true | predicted | fg IoU | fg precision | fg recall | mSA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["per_image"]:
        lines.append(f"| `{r['id']}` | {r['cell_type']} | {r['n_true']} | {r['n_pred']} | "
                     f"{r['foreground_iou']:.3f} | {r.get('foreground_precision', float('nan')):.3f} | "
                     f"{r.get('foreground_recall', float('nan')):.3f} | {r['msa']:.3f} |")
    return "\n".join(lines)


def curve(history: list[dict]) -> str:
    types = sorted(history[-1].get("val_per_cell_type", {}))
    lines = ["| epoch | step | train min | loss | val AP50 | val mSA | LIVECell AP50 / mSA | Sartorius AP50 / mSA | "
             + " | ".join(f"{t} mSA" for t in types) + " |", "|" + "---|" * (8 + len(types))]
    for h in history:
        v, src, per_type = h["val"], h.get("val_per_source", {}), h.get("val_per_cell_type", {})
        pair = {name: f"{m['ap50']:.3f} / {m['msa']:.3f}" for name, m in src.items()}
        lines.append(f"| {h['epoch']} | {h['step']} | {h['train_seconds'] / 60:.1f} | {h['loss']['total']:.3f} | "
                     f"{v['ap50']:.3f} | {v['msa']:.3f} | {pair.get('livecell', '–')} | {pair.get('sartorius', '–')} | "
                     + " | ".join(f"{per_type[t]['msa']:.3f}" if t in per_type else "–" for t in types) + " |")
    return "\n".join(lines)


def fewshot_table(result: dict) -> str:
    """One scripts/fewshot.py output as a table: a row per k, with the verdict the tool printed where
    the run held images back (issue 29)."""
    b = result["before"]
    verdicts = any("verdict" in run for run in result["runs"])
    filters = any(run.get("cell_filter") for run in result["runs"])  # since the cell rules (issue 29)
    merges = any(run.get("cell_merge") for run in result["runs"])
    head = "| k images | minutes in all (steps, steps/min) | AP50 before → after (int8) | mSA before → after (int8) | " \
           "AP75 | count error |" + (" thresholds |" if verdicts else "") + (" cell merge |" if merges else "") + \
           (" cell filter |" if filters else "") + (" verdict printed |" if verdicts else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in result["runs"]:
        a, q = run["after_fp32"], run["after_int8"]
        rate = f", {run['steps_per_minute']:.0f}/min" if run.get("steps_per_minute") else ""
        row = (f"| {run['k']} | {run['minutes_total']} ({run.get('steps', '?')}{rate}) | "
               f"{b['ap50']:.3f} → **{a['ap50']:.3f}** ({q['ap50']:.3f}) | "
               f"{b['msa']:.3f} → **{a['msa']:.3f}** ({q['msa']:.3f}) | {a['ap75']:.3f} | "
               f"{b['count_error']:.2f} → {a['count_error']:.2f} |")
        if verdicts:
            changed = (run.get("thresholds") or {}).get("changed")
            row += f" {'changed' if changed else 'kept the base' if changed is False else '?'} |"
        for field, present in (("cell_merge", merges), ("cell_filter", filters)):
            chosen = run.get(field) or {}
            if present:
                row += f" {rule_outcome(chosen)} |"
        if verdicts:
            row += f" {run.get('verdict', '–').removeprefix('VERDICT: ')} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def rule_outcome(chosen: dict) -> str:
    """A fine-tune's decision on one cell rule (train.finetune.pick_rule), in a table cell."""
    reason = chosen.get("reason", "")
    if chosen.get("kept"):
        return f"kept (cutoff {chosen.get('cutoff')})"
    if "dropped" in reason:
        return "base's dropped"
    return "base's" if "the base's stays" in reason else "none"


def fewshot_section(paths: list[Path], target: Path | None) -> str:
    """Fine-tuning on a lab's own images: the issue 15 target run and the few-shot curves
    (scripts/fewshot.py), before and after on other images of the same type."""
    text = """
## Fine-tuning on a lab's own images

`python -m train finetune` on k images of one cell type, written as a lab would hand them over
(`X.png` + `X_masks.png`); measured on other images of that type (each table says whether the base
model trained on them: if it did, its "before" is flattering, and how many of the k the run held back
for its own verdict). Thresholds, and since issue 29 the cell rules (merge, filter): each model's own.
Analysis in the notes below.
"""
    runs = ([("target", target)] if target else []) + [("curve", path) for path in paths]
    for kind, path in runs:
        result = json.loads(path.read_text())
        # the record's file names the section: the notes cite records by file, and many sections
        # share a type, a base and a test set
        title = f"{'Target run (issue 15)' if kind == 'target' else 'Few-shot curve'} (`{path.name}`)"
        seen = result.get("test_images_the_base_trained_on")
        base = "the shipped model" if Path(result["base_model"]).name == "livecell-unet.onnx" else \
            f"`{result['base_model']}`"
        held = result.get("hold_out", "0")
        recipe = f"; finetune options `{result['finetune_args']}`" if result.get("finetune_args") else ""
        trained_seen = {run.get("train_images_the_base_trained_on") for run in result["runs"]} - {None}
        if trained_seen:
            recipe += ("; the base never saw the fine-tuning images either" if trained_seen == {0} else
                       "; the base trained on the fine-tuning images")
        text += f"""
### {title}: {result['type']}, base {base}, measured on {len(result['test_images'])} other images ({
    "unknown whether the base trained on them" if seen is None else
    f"the base trained on {seen} of them" if seen else "none of which the base ever saw"})

Command: `{result['command']}` ({result['machine']}); held back: {
    "none" if held == "0" else "finetune's default (one in five, at least one from three)" if held == "auto" else held}{recipe}

{fewshot_table(result)}"""
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val", type=Path, required=True)
    p.add_argument("--train", type=Path)
    p.add_argument("--history", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/METRICS.md"))
    p.add_argument("--notes", type=Path, help="markdown appended at the end (analysis)")
    p.add_argument("--before", type=Path, help="evaluation of the previously shipped model on the same split")
    p.add_argument("--tta", type=Path, help="evaluation with test-time augmentation")
    p.add_argument("--int8", type=Path, help="evaluation of the int8 variant")
    p.add_argument("--int8-cpus", type=Path, help="scripts/compare_int8.py --emulate output (int8 recipes across CPUs)")
    p.add_argument("--encoders", type=Path, help="JSON {encoder: history} of the same-budget encoder comparison")
    p.add_argument("--fewshot", type=Path, nargs="*", default=[], help="scripts/fewshot.py outputs (curves)")
    p.add_argument("--fewshot-target", type=Path, help="scripts/fewshot.py output of the issue 15 target run")
    args = p.parse_args()
    val = json.loads(args.val.read_text())
    history = json.loads(args.history.read_text())
    post = val["postprocess"]
    text = f"""# Accuracy of the shipped model

Model: `models/{Path(val['model']).name}` (sha256 `{val['model_sha256']}`).
Post-processing: `{thresholds_only(post)}`{rules_text(post)}.
All numbers come from `cellseg evaluate`, i.e. the same inference path as the service and batch jobs
(whole-image percentile normalisation, ONNX Runtime, seeded watershed), at native resolution.

## Validation split ({val['n_images']} images, never trained on, never used to tune)

Command: `cellseg evaluate --model models/livecell-unet.onnx --split val --json {args.val}`

{targets_text(val)}

{table(val)}
"""
    if args.before:
        before = json.loads(args.before.read_text())
        text += f"""
## Before and after, same validation split

Before: the previously shipped model, the same network and thresholds without the cell rules
(`git show c61d4c6:models/livecell-unet.onnx > runs/previous-model.onnx`; the rules and why they
were kept: "Cell rules in the shipped model" below),
`cellseg evaluate --model runs/previous-model.onnx --split val --json {args.before}`.

{before_after(before, val)}
"""
    for path, label, option in ((args.tta, "with TTA", "--tta"),
                                (args.int8, "int8", "--model models/livecell-unet.int8.onnx")):
        if path:
            other = json.loads(path.read_text())
            text += f"""
## {label} (same split, same post-processing)

Command: `cellseg evaluate {option} --split val --json {path}`

{before_after(val, other, label)}
"""
    if args.int8_cpus:
        text += int8_cpus_text(json.loads(args.int8_cpus.read_text()), args.int8_cpus)
    if args.encoders:
        text += f"""
## Encoder comparison (same budget, same data, sampling, seed and validation)

From `{args.encoders}` (the comparison runs' histories; commands in the notes below). "score" is the
mean over sources of (AP50 + mSA) / 2 with training-time post-processing defaults.

{encoder_table(json.loads(args.encoders.read_text()))}
"""
    text += f"""
Per image:

{per_image(val)}
"""
    if args.train:
        train = json.loads(args.train.read_text())
        text += f"""
## Training images (at most {train.get('per_type') or 'all'} per cell type; the gap to validation shows over- or under-fitting)

Command: `cellseg evaluate --model models/livecell-unet.onnx --split train --per-type {train.get('per_type')} --json {args.train}`

{table(train)}
"""
    text += f"""
## Learning curve (validation after every epoch, from the checkpoint's history)

From `{args.history}` (written by `python -m export`). Validation here used the post-processing
defaults of training time (`PostprocessParams()`), so it differs from the final table's.

{curve(history)}

Metric definitions: `cellseg/evaluate.py` (COCO AP/AP50/AP75 with pycocotools, maxDets 100/500/2000,
read at 2000 detections; mSA = mean over IoU 0.50..0.95 of TP/(TP+FP+FN) per image; count_error =
mean |predicted - true| / true cell count; confluence_error = mean |predicted - true| / true area covered
by cells; foreground IoU / Dice / pixel accuracy per image, averaged).
"""
    if args.fewshot or args.fewshot_target:
        text += fewshot_section(args.fewshot, args.fewshot_target)
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
