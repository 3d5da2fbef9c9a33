"""Where the time goes after the network, stage by stage, on LIVECell images (one run), and
optionally against an older post-processing module in the same run.

    python scripts/bench_postprocess.py --images 4 --repeats 10 --json docs/bench_postprocess.json
    git show 37c31a9:cellseg/postprocess.py > runs/postprocess_before.py
    python scripts/bench_postprocess.py --before runs/postprocess_before.py --compare-val --json docs/bench_postprocess.json

--compare-val also runs both versions on the validation split's 8-bit maps: how many images and
pixels differ, the cell counts, and AP50/mSA of each.

Stages: percentile normalisation; the 8-bit rounding of the maps; core score and its smoothing;
labelling the cores (and dropping small ones); the seeded watershed; the boundary merge; orphans,
small cells and relabelling; per-cell scores; COCO RLE records (`segment`'s JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from bench_inference import livecell_images, machine_description, publish_report, timeit  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import Segmentation, decode_maps, encode_maps, predict_padded  # noqa: E402
from cellseg.instances import instances_from_labels  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402
from cellseg.postprocess import (  # noqa: E402
    core_score,
    finish_labels,
    maps_to_labels,
    merge_weak_borders,
    seed_cores,
    seeded_watershed,
)
from cellseg.preprocess import normalize  # noqa: E402


def stages(image: np.ndarray, raw_maps: np.ndarray, params) -> dict[str, float]:
    """Milliseconds of each of maps_to_labels' stages (the same functions, in its order), with
    normalisation before them and the service's per-cell work after."""
    times: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        times[name] = (time.perf_counter() - t0) * 1000
        return out

    timed("normalise", normalize, image)
    probs = timed("8-bit maps", lambda: decode_maps(encode_maps([raw_maps]))[0])
    foreground = probs[0] > params.fg_threshold
    score = timed("core score + smoothing", core_score, probs, params.seed_sigma)
    cores = timed("label cores", seed_cores, score, foreground, params)
    labels = timed("watershed", seeded_watershed, -probs[2], cores, foreground)
    labels = timed("boundary merge", merge_weak_borders, labels, probs[1], params.merge_threshold)
    labels = timed("orphans, small cells, relabel", finish_labels, labels, foreground, params.min_size)
    scores = timed("scores", lambda: Segmentation(labels, probs).scores())
    timed("RLE records (segment JSON)", instances_from_labels, labels, scores)
    return times


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("postprocess_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["postprocess_before"] = module
    spec.loader.exec_module(module)
    return module


def compare_on_validation(model: OnnxModel, before, params, data: Path) -> dict:
    from cellseg.data import load_split
    from cellseg.evaluate import evaluate_segmentations
    from cellseg.inference import predict_maps

    samples = load_split(data, "val")
    maps = predict_maps(model.predict, [s.image() for s in samples])
    now = [maps_to_labels(m, params) for m in maps]
    old = [before.maps_to_labels(m, params) for m in maps]
    differing = [float(np.mean(a != b)) for a, b in zip(now, old)]

    def scores(labels):
        metrics = evaluate_segmentations(samples, [Segmentation(lab, m) for lab, m in zip(labels, maps)])
        return {k: round(metrics[k], 4) for k in ("ap50", "msa")}

    return {"images": len(samples), "images_differing": sum(d > 0 for d in differing),
            "pixel_fraction_differing_mean": round(float(np.mean(differing)), 7),
            "pixel_fraction_differing_max": round(max(differing), 7),
            "cells_now": sum(int(lab.max()) for lab in now), "cells_before": sum(int(lab.max()) for lab in old),
            "now": scores(now), "before": scores(old)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.int8.onnx"))
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--before", type=Path, help="an older cellseg/postprocess.py to time in the same run")
    p.add_argument("--compare-val", action="store_true", help="with --before: both versions on the validation split")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    model = OnnxModel(args.model, threads=os.cpu_count())
    params = model.default_params
    images = [read_image(path) for path in livecell_images(args.data, args.images)]
    maps = [predict_padded(model.predict, [normalize(im)])[0] for im in images]
    per_stage: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for image, raw_maps in zip(images, maps):
            for name, ms in stages(image, raw_maps, params).items():
                per_stage.setdefault(name, []).append(ms)
    stage_ms = {name: round(statistics.median(v), 2) for name, v in per_stage.items()}
    rounded = [decode_maps(encode_maps([m]))[0] for m in maps]
    whole = {"maps_to_labels (now)": timeit(lambda: [maps_to_labels(m, params) for m in rounded],
                                            args.repeats)["p50_ms"] / len(maps)}
    if args.before:
        before = load_module(args.before)
        whole["maps_to_labels (before)"] = timeit(lambda: [before.maps_to_labels(m, params) for m in rounded],
                                                  args.repeats)["p50_ms"] / len(maps)
        same = all(np.array_equal(before.maps_to_labels(m, params), maps_to_labels(m, params)) for m in rounded)
        whole["identical_labels"] = same
        if args.compare_val:
            whole["validation"] = compare_on_validation(model, before, params, args.data)
    report = {"machine": machine_description(), "model": str(args.model), "images": len(images),
              "repeats": args.repeats, "stage_ms_median": stage_ms, "per_image_ms": whole}
    publish_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
