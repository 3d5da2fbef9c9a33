"""Tracking quality and speed, written as JSON (docs/bench_tracking.json; figures in docs/METRICS.md
and docs/BENCHMARKS.md):

    python scripts/bench_tracking.py --json docs/bench_tracking.json
    python scripts/bench_tracking.py --skip-usiigaci --json runs/bench_tracking/ctc_only.json

1. CTC Fluo-N2DH-SIM+ 01 (exact tracking ground truth, 65 frames, 95 tracks, 28 divisions): each
   frame relabelled at random and independently, tracked (cellseg.tracking), written in the CTC RES
   layout and scored with py-ctcmetrics: TRA, DET, LNK, BC(0) (division F1, the division's frame
   exact) and BC(1).
2. Usiigaci T98G (37 real phase-contrast frames, 0.87 µm/px, 10.2 min apart): `cellseg segment
   --interval 10.2min --pixel-size 0.87 --track` end to end, compared with the source project's own
   tracks (its id masks turned into a CTC reference: a reference, not ground truth) by the same
   metrics; and seconds per frame for segmenting and for tracking.

Time is reported as wall seconds and as this process's CPU seconds: on a shared CPU the wall time
says more about the neighbours than about the code, so the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from PIL import Image  # noqa: E402

from cellseg import tracking  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402

CTC_GT = "tracking/ctc-fluo-n2dh-sim-01/GT"
USIIGACI = "timelapse/usiigaci-t98g"
METRICS = ["TRA", "DET", "LNK", "BC"]


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return describe_cpu()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                describe_cpu())


def relabelled(gt: Path, seed: int = 0) -> list[np.ndarray]:
    """The ground truth's frames, each renumbered at random on its own: ids carry no identity."""
    rng = np.random.default_rng(seed)
    frames = []
    for path in sorted((gt / "TRA").glob("man_track*.tif")):
        truth = tifffile.imread(path)
        ids = np.unique(truth)[1:]
        lookup = np.zeros(int(truth.max()) + 1, dtype=np.uint16)
        lookup[ids] = rng.permutation(len(ids)) + 1
        frames.append(lookup[truth])
    return frames


def score(res: Path, gt: Path) -> dict:
    from ctc_metrics.scripts.evaluate import evaluate_sequence

    scores = evaluate_sequence(str(res), str(gt), metrics=METRICS, threads=1)
    kept = ("TRA", "DET", "LNK", "BC(0)", "BC(1)", "gt_divisions", "tp_div(0)", "fp_div(0)", "fn_div(0)")
    return {k: round(float(scores[k]), 4) for k in kept if scores.get(k) is not None}


def gt_divisions(gt: Path) -> int:
    parents = [int(line.split()[3]) for line in (gt / "TRA" / "man_track.txt").read_text().splitlines()]
    return sum(1 for p in set(parents) if p and parents.count(p) >= 2)


def bench_ctc(data: Path, out: Path) -> dict:
    gt = data / CTC_GT
    frames = relabelled(gt)
    wall, cpu = time.perf_counter(), time.process_time()
    result = tracking.track_labels(frames)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    res = out / "ctc-sim01" / "RES"
    for name, data_bytes in tracking.ctc_files(result).items():
        (res / name).parent.mkdir(parents=True, exist_ok=True)
        (res / name).write_bytes(data_bytes)
    return {"data": str(gt), "frames": len(frames), "tracks_gt": len((gt / "TRA" / "man_track.txt").read_text().split("\n")) - 1,
            "tracks_found": len(result.spans()), "divisions_gt": gt_divisions(gt), "divisions_found": result.divisions(),
            "scores": score(res, gt), "track_seconds": round(wall, 2), "track_cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_frame": round(cpu / len(frames), 4), "tracker": tracking.settings()}


def reference_as_ctc(reference: Path, target: Path) -> int:
    """The source project's id masks as a CTC TRA folder: each particle's frames split at gaps into
    tracks of their own (CTC tracks are unbroken), none with a parent (its tracker reports none)."""
    masks = sorted((reference / "id_masks").glob("id_masks_*.png"))
    tra = target / "TRA"
    tra.mkdir(parents=True, exist_ok=True)
    spans: dict[int, list[list[int]]] = {}
    frames = [np.asarray(Image.open(p)).astype(np.int64) for p in masks]
    for t, ids in enumerate(frames):
        for particle in np.unique(ids)[1:]:
            runs = spans.setdefault(int(particle), [])
            if runs and runs[-1][1] == t - 1:
                runs[-1][1] = t
            else:
                runs.append([t, t])
    label_of, lines, next_label = {}, [], 1
    for particle, runs in spans.items():
        for first, last in runs:
            for t in range(first, last + 1):
                label_of[(t, particle)] = next_label
            lines.append(f"{next_label} {first} {last} 0")
            next_label += 1
    for t, ids in enumerate(frames):
        out = np.zeros(ids.shape, dtype=np.uint16)
        for particle in np.unique(ids)[1:]:
            out[ids == particle] = label_of[(t, int(particle))]
        tifffile.imwrite(tra / f"man_track{t:03d}.tif", out)
    (tra / "man_track.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


def bench_usiigaci(data: Path, out: Path) -> dict:
    from cellseg.cli import main

    frames = sorted((data / USIIGACI / "frames").glob("*.tif"))
    job = out / "usiigaci"
    wall, cpu = time.perf_counter(), time.process_time()
    status = main(["segment", str(data / USIIGACI / "frames"), "--out", str(job), "--interval", "10.2min",
                   "--pixel-size", "0.87", "--formats", "labels,csv", "--quiet", "--overwrite"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from cellseg.timelapse_cli import track_segmented

    track_segmented(job, quiet=True)  # what --track runs after segmenting, timed apart (tracking.json)
    series = next((job / "tracks").glob("*"))
    summary = json.loads((series / "tracking.json").read_text())
    reference = out / "usiigaci-reference"
    reference_tracks = reference_as_ctc(data / USIIGACI / "reference", reference)
    doubling = (job / "doubling.csv").read_text().splitlines()
    counts = [int(line.split(",")[3]) for line in (job / "summary.csv").read_text().splitlines()[1:]]
    return {"data": str(data / USIIGACI), "frames": len(frames), "segment_status": status,
            "segment_seconds": round(wall, 1), "segment_cpu_seconds": round(cpu, 1),
            "segment_seconds_per_frame": round(wall / len(frames), 3),
            "segment_cpu_seconds_per_frame": round(cpu / len(frames), 3),
            "track_seconds": summary["seconds"], "track_cpu_seconds": summary["cpu_seconds"],
            "track_cpu_seconds_per_frame": round(summary["cpu_seconds"] / len(frames), 4),
            "tracks_found": summary["tracks"], "divisions_found": summary["divisions"],
            "reference_tracks": reference_tracks, "cells_per_frame": round(sum(counts) / len(counts), 1),
            "reference_cells_per_frame": reference_cells_per_frame(data / USIIGACI / "reference"),
            "agreement_with_reference": score(series / "ctc", reference),
            "reference_masks_tracked": track_reference_masks(data / USIIGACI / "reference", out, reference),
            "doubling_csv": doubling}


def reference_cells_per_frame(reference: Path) -> float:
    counts = [len(np.unique(np.asarray(Image.open(p)))) - 1 for p in sorted((reference / "masks").glob("*.png"))]
    return round(sum(counts) / len(counts), 1)


def track_reference_masks(reference: Path, out: Path, reference_ctc: Path) -> dict:
    """The tracker alone on the source project's own masks (so segmentation plays no part), scored
    against that project's tracks of the same masks."""
    frames = [np.asarray(Image.open(p)).astype(np.int32) for p in sorted((reference / "masks").glob("*.png"))]
    wall, cpu = time.perf_counter(), time.process_time()
    result = tracking.track_labels(frames)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    res = out / "usiigaci-reference-masks-tracked"
    res.mkdir(parents=True, exist_ok=True)
    for name, data_bytes in tracking.ctc_files(result).items():
        (res / name).write_bytes(data_bytes)
    return {"tracks_found": len(result.spans()), "divisions_found": result.divisions(),
            "track_seconds": round(wall, 2), "track_cpu_seconds": round(cpu, 2),
            "agreement_with_reference": score(res, reference_ctc)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_tracking"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--skip-usiigaci", action="store_true", help="only the CTC ground truth (no segmentation)")
    args = parser.parse_args()
    result = {"cpu": lscpu_model(), "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0],
              "command": " ".join(["python", *sys.argv])}
    result["ctc_sim01"] = bench_ctc(args.data, args.out)
    if not args.skip_usiigaci:
        result["usiigaci"] = bench_usiigaci(args.data, args.out)
    result["load_after"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
