"""int8 recipes side by side, on the CPU at hand and on an emulated AVX2 CPU: validation accuracy
(same split and post-processing as fp32) and network time on one LIVECell image, in one run. Picks
the recipe the project ships: accurate on every x86 CPU, as fast as int8 gets.

    python scripts/compare_int8.py --emulate --json docs/int8_comparison.json

With --emulate, each int8 file's network also runs under `qemu-x86_64 -cpu Haswell-noTSX`
(cellseg/emulation.py): ONNX Runtime there takes the int8 kernels of a CPU without VNNI, whose
16-bit sums saturate, and the maps it returns are post-processed and scored here exactly like the
native ones. Emulation gives the results of such a CPU, not its speed (about 15 s per image).

A recipe qualifies when its AP50 and mSA are each within 0.01 of fp32 on every CPU measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench_inference import command_line, livecell_images, timeit, write_report  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.emulation import AVX2_CPU, emulated_maps  # noqa: E402
from cellseg.evaluate import evaluate_segmentations  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import Segmentation, predict_padded  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402
from cellseg.preprocess import normalize  # noqa: E402
from export.int8 import Int8Recipe, calibration_images, quantize  # noqa: E402

RECIPES = {
    "U8S8 (shipped before)": Int8Recipe(reduce_range=False),
    "U8S8, 7-bit weights (shipped)": Int8Recipe(),
    "U8U8": Int8Recipe(reduce_range=False, weights="uint8"),
    "S8S8": Int8Recipe(reduce_range=False, activations="int8"),
    "U8S8, stem+head fp32": Int8Recipe(reduce_range=False, keep_head_fp32=True),
}
TOLERANCE = 0.01
KEYS = ("ap50", "msa", "foreground_iou")


def summary(metrics: dict) -> dict:
    out = {k: round(metrics[k], 4) for k in KEYS}
    out["per_source"] = {s: {k: round(m[k], 4) for k in ("ap50", "msa")} for s, m in metrics["per_source"].items()}
    return out


def file_name(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") + ".onnx"


def retime(args) -> int:
    """Every row's network time on one LIVECell image again, all in one run, rounds alternating."""
    report = json.loads(args.json.read_text())
    one = [normalize(read_image(livecell_images(args.data, 1)[0]))]
    models = {name: OnnxModel(row.get("file") or args.model, threads=os.cpu_count()) for name, row in report["rows"].items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(timeit(lambda m=model: predict_padded(m.predict, one), args.repeats)["p50_ms"])
    for name, row in report["rows"].items():
        row["network_1_image_ms"] = round(statistics.median(times[name]), 1)
    report["timing"] = {"machine": describe_cpu(), "rounds": args.rounds, "repeats": args.repeats,
                        "command": command_line()}
    write_report(report, args.json)
    print(json.dumps({name: row["network_1_image_ms"] for name, row in report["rows"].items()}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.onnx"))
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--workdir", type=Path, default=Path("runs/int8"))
    p.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    p.add_argument("--reuse", action="store_true", help="keep int8 files already in --workdir (same recipe names)")
    p.add_argument("--emulate", action="store_true", help=f"also score each int8 file on an emulated {AVX2_CPU}")
    p.add_argument("--emulate-skip", nargs="*", default=[], metavar="RECIPE",
                   help="recipes not to emulate (reported as not run): S8S8's AVX2 kernels took over 45 CPU-minutes "
                        "emulated, against 8 for the others")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json (it is written after each row)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--retime", action="store_true",
                   help="only time every row's file again, side by side in --rounds alternating rounds (medians), "
                        "and update --json: figures from a run that shared the machine are not comparable")
    p.add_argument("--rounds", type=int, default=3)
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

    def measure_emulated(path: Path) -> dict:
        t0 = time.time()
        maps = emulated_maps(path, images, AVX2_CPU, threads=os.cpu_count() or 1)
        segs = [Segmentation.from_maps(m, params) for m in maps]
        return {**summary(evaluate_segmentations(samples, segs)), "emulation_s": round(time.time() - t0)}

    if args.retime:
        return retime(args)
    previous = json.loads(args.json.read_text()) if args.resume and args.json and args.json.is_file() else {}
    rows = previous.get("rows") or {"fp32": measure(fp32)}
    print("fp32", json.dumps(rows["fp32"]), flush=True)

    def report() -> dict:
        return {"machine": describe_cpu(), "emulated": f"qemu-x86_64 -cpu {AVX2_CPU} (AVX2, no VNNI)" if args.emulate
                else None, "model": str(args.model), "split": "val", "images": len(samples), "tolerance": TOLERANCE,
                "postprocess": params.to_dict(), "rows": rows}

    calibration: dict[int, list] = {}
    for name, recipe in RECIPES.items():
        if (args.only and name not in args.only) or name in rows:
            continue
        out = args.workdir / file_name(name)
        t0 = time.time()
        if not (args.reuse and out.is_file()):
            if recipe.calibration_images not in calibration:
                calibration[recipe.calibration_images] = calibration_images(args.data, recipe.calibration_images)
            quantize(args.model, out, calibration[recipe.calibration_images], recipe)
        row = {"recipe": recipe.to_dict(), "file": str(out), "quantize_s": round(time.time() - t0, 1),
               **measure(OnnxModel(out, threads=os.cpu_count()))}
        row["delta"] = {k: round(row[k] - rows["fp32"][k], 4) for k in ("ap50", "msa")}
        qualifies = all(abs(v) <= TOLERANCE for v in row["delta"].values())
        if args.emulate and name not in args.emulate_skip:
            emulated = measure_emulated(out)
            emulated["delta"] = {k: round(emulated[k] - rows["fp32"][k], 4) for k in ("ap50", "msa")}
            qualifies = qualifies and all(abs(v) <= TOLERANCE for v in emulated["delta"].values())
            row["emulated_avx2"] = emulated
        elif args.emulate:
            row["emulated_avx2"] = None  # not run (--emulate-skip): not shown to hold without VNNI
            qualifies = False
        row["qualifies"] = qualifies
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        write_report(report(), args.json)  # after each row: a stopped run keeps what it measured (--resume)
    write_report(report(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
