"""The cost of returning memory eagerly: the int8 network and the post-processing of one LIVECell
image, each setting in a fresh process, side by side in one run.

    python scripts/bench_allocator.py --json docs/bench_allocator.json

Settings: issue 7's (glibc mmap threshold 1 MiB, ONNX Runtime arena off) and today's (the front's
32 MiB threshold; the network's arena on and kept for LIVECell-size calls).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inference import write_report  # noqa: E402

SETTINGS = {"issue 7: mmap from 1 MiB, arena off": (1 << 20, False), "now: mmap from 32 MiB, arena kept": (32 << 20, True)}

CHILD = """
import json, statistics, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {scripts!r})
from cellseg.memory import configure_allocator
configure_allocator(mmap_threshold={threshold})
import onnxruntime as ort
from bench_inference import livecell_images
from cellseg.data import default_data_root
from cellseg.imageio import read_image
from cellseg.inference import predict_padded
from cellseg.onnx_model import OnnxModel
from cellseg.postprocess import maps_to_labels
from cellseg.preprocess import normalize
model = OnnxModel({model!r}, threads=2)
if not {arena}:  # issue 7's session: a fresh session with the arena off
    options = ort.SessionOptions(); options.enable_cpu_mem_arena = False; options.intra_op_num_threads = 2
    model.session = ort.InferenceSession({model!r}, options, providers=["CPUExecutionProvider"])
image = read_image(livecell_images(default_data_root(), 1)[0])
x = [normalize(image)]
probs = predict_padded(model.predict, x)[0]
def median_ms(fn, repeats={repeats}):
    fn(); times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)
print(json.dumps({{"network_ms": median_ms(lambda: predict_padded(model.predict, x)),
                  "post_processing_ms": median_ms(lambda: maps_to_labels(probs, model.default_params)),
                  "normalise_ms": median_ms(lambda: normalize(image))}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/livecell-unet.int8.onnx")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = {}
    for name, (threshold, arena) in SETTINGS.items():
        code = CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"), threshold=threshold, arena=arena,
                            model=str(ROOT / args.model), repeats=args.repeats)
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    report = {"model": args.model, "image": "first LIVECell image (704x520)", "results": results}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
