"""Load test of the running service with LIVECell-size images, next to in-process ONNX Runtime and
PyTorch eager on the same images in the same run.

    bentoml serve service:CellSegmentation --port 3000 &      # after `python -m export register`
    python scripts/bench_server.py --url http://localhost:3000 --requests 48

For each concurrency (1, 4, 16): latency p50/p95 and images/s of `segment` (JSON) requests, and
whether any request failed (a 503 would show here). Then the same images, one at a time,
end to end in-process (ONNX Runtime, then PyTorch eager), as images/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx  # noqa: E402

from bench_inference import livecell_images, machine_description, torch_predictor, write_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import segment_images  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def batch_sizes(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {kind: sum(float(v) for v in re.findall(
        rf'bentoml_service_adaptive_batch_size_{kind}\{{[^}}]*method_name="predict"[^}}]*\}} (\S+)', text))
        for kind in ("count", "sum")}
    return found["count"], found["sum"]


def load_test(url: str, payloads: list[tuple[str, bytes]], concurrency: int, requests: int) -> dict:
    def one(i: int):
        name, data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/segment", files={"image": (name, data, "image/tiff")}, timeout=300)
        return r.status_code, (time.perf_counter() - t0) * 1000

    count0, sum0 = batch_sizes(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    count1, sum1 = batch_sizes(url)
    latencies = [ms for status, ms in results if status == 200]
    return {"concurrency": concurrency, "requests": requests,
            "failed": sum(1 for status, _ in results if status != 200),
            "statuses": sorted({status for status, _ in results}),
            "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
            "images_per_s": round(len(latencies) / wall, 2),
            "mean_batch_size": round((sum1 - sum0) / max(count1 - count0, 1), 2)}


def in_process(predict, images, params) -> float:
    segment_images(predict, images[:1], params)  # warm-up
    t0 = time.perf_counter()
    for image in images:
        segment_images(predict, [image], params)
    return len(images) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://localhost:3000")
    p.add_argument("--model", type=Path, default=default_model_path(), help="for the in-process comparison")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=16, help="distinct LIVECell images to cycle through")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    paths = livecell_images(args.data, args.images)
    payloads = [(p.name, p.read_bytes()) for p in paths]
    warm = httpx.post(f"{args.url}/segment", files={"image": payloads[0]}, timeout=300)
    warm.raise_for_status()
    # compare with the variant the server runs (fp32 or int8), side by side
    precision = warm.json()["model"].get("precision", "fp32")
    model_path = args.model.with_suffix(".int8.onnx") if precision == "int8" else args.model
    levels = [load_test(args.url, payloads, int(c), args.requests) for c in args.concurrency.split(",")]
    for level in levels:
        print(json.dumps(level), flush=True)

    images = [read_image(p) for p in paths]
    model = OnnxModel(model_path)
    ort_ips = in_process(model.predict, images, model.default_params)
    torch_ips = in_process(torch_predictor(model, None, os.cpu_count() or 1), images, model.default_params)
    best_server = max(level["images_per_s"] for level in levels)
    c1 = next((level for level in levels if level["concurrency"] == 1), None)
    report = {"url": args.url, "machine": machine_description(), "precision": precision, "model": str(model_path),
              "images": len(images), "image_size": "704x520", "server": levels,
              "in_process_images_per_s": {"onnxruntime": round(ort_ips, 2), "pytorch_eager": round(torch_ips, 2)},
              "ratios": {"onnxruntime_vs_pytorch_eager": round(ort_ips / torch_ips, 2),
                         "best_server_vs_in_process_onnxruntime": round(best_server / ort_ips, 2),
                         "best_server_vs_pytorch_eager": round(best_server / torch_ips, 2),
                         # HTTP latency at concurrency 1 over the in-process end-to-end time per image
                         "http_p50_c1_vs_in_process_end_to_end": c1 and round(c1["p50_ms"] / (1000 / ort_ips), 2)}}
    print(json.dumps({k: report[k] for k in ("in_process_images_per_s", "ratios")}))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
