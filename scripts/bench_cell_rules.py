"""What a fine-tuned model's cell rules (merge, filter) add to the post-processing time, per image,
side by side in one run: cells and their scores cut from the same maps (the network runs once per
image) as the service does (`Segmentation.from_maps(...).scores()`), with the model's parameters and
with its rules left out; median of `--repeats`.

    python scripts/bench_cell_rules.py runs/astro/model.onnx --per-type 2 --json docs/bench_cell_rules.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.data import default_data_root, load_split, subsample_per_type  # noqa: E402
from cellseg.inference import Segmentation, predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel  # noqa: E402
from cellseg.postprocess import maps_to_labels  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an ONNX model whose metadata carries cell rules (a fine-tune's model.onnx)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--per-type", type=int, default=2, help="validation images per cell type")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    model = OnnxModel(args.model)
    params = model.default_params
    if params.cell_merge is None and params.cell_filter is None:
        raise SystemExit(f"{args.model} carries no cell rules: give a fine-tune's model.onnx whose run kept some")
    plain = params.without_rules()
    samples = subsample_per_type(load_split(args.data, "val"), args.per_type)
    maps = predict_maps(model.predict, [s.image() for s in samples])  # without TTA: the step after it is the same
    rows = []
    for sample, probs in zip(samples, maps):
        row = {"image": sample.id, "cell_type": sample.cell_type, "pixels": int(probs[0].size),
               "without_rules_ms": median_ms(lambda probs=probs: Segmentation.from_maps(probs, plain).scores(), args.repeats),
               "with_rules_ms": median_ms(lambda probs=probs: Segmentation.from_maps(probs, params).scores(), args.repeats),
               "cells_without": int(maps_to_labels(probs, plain).max()), "cells_with": int(maps_to_labels(probs, params).max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"cpu": describe_cpu(), "model": str(args.model), "rules": {"merge": params.cell_merge is not None,
              "filter": params.cell_filter is not None}, "command": "python " + " ".join(sys.argv), "rows": rows,
              "median_without_ms": statistics.median(r["without_rules_ms"] for r in rows),
              "median_with_ms": statistics.median(r["with_rules_ms"] for r in rows)}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
