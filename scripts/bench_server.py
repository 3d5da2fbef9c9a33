"""Load test of the running service with LIVECell-size images, next to in-process ONNX Runtime and
PyTorch eager on the same images in the same run.

    bentoml serve service:CellSegmentation --port 3000 &      # after `python -m export register`
    python scripts/bench_server.py --url http://localhost:3000 --requests 48

For each concurrency (1, 4, 16): latency p50/p95 and images/s of `segment` (JSON) requests, and
whether any request failed (a 503 would show here). Next to them, the same images one at a time, end
to end in-process (ONNX Runtime), in the same round; `--rounds` rounds alternate the two, and the
ratios use the medians. PyTorch eager runs once, at the end.

At concurrency 1 the latency is taken apart with the service's own account of each request (its
Server-Timing header: queue, decode, network, cells, encode, total) and the network alone in process in
the same round: what the call to the network process adds, and what lies outside the service
(HTTP and the client).

Each client thread keeps one connection open, as the Python SDK (`cellseg.client.Client`) and
browsers do. `--fresh-connections` opens a new HTTP client per request instead (`httpx.post`, as
this script did before), whose set-up (an SSL context, even for plain HTTP) costs the client about
20 ms of CPU per request, on the same cores as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import httpx  # noqa: E402
from bench_memory import process_cpu_seconds  # noqa: E402

from bench_inference import livecell_images, machine_description, torch_predictor, write_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.inference import predict_codes, segment_images  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402
from cellseg.preprocess import normalize  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def batch_sizes(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {kind: sum(float(v) for v in re.findall(
        rf'bentoml_service_adaptive_batch_size_{kind}\{{[^}}]*method_name="predict"[^}}]*\}} (\S+)', text))
        for kind in ("count", "sum")}
    return found["count"], found["sum"]


def load_test(url: str, payloads: list[tuple[str, bytes]], concurrency: int, requests: int,
              fresh_connections: bool = False, server_pid: int | None = None) -> dict:
    local = threading.local()  # one kept-alive client per thread

    def post(**kwargs) -> httpx.Response:
        if fresh_connections:
            return httpx.post(f"{url}/segment", timeout=300, **kwargs)
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        return local.client.post(f"{url}/segment", **kwargs)

    def one(i: int):
        name, data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        r = post(files={"image": (name, data, "image/tiff")})
        return r.status_code, (time.perf_counter() - t0) * 1000, server_timing(r)

    count0, sum0 = batch_sizes(url)
    cpu0 = process_cpu_seconds(server_pid) if server_pid else {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    cpu1 = process_cpu_seconds(server_pid) if server_pid else {}
    count1, sum1 = batch_sizes(url)
    latencies = [ms for status, ms, _ in results if status == 200]
    stages = [timing for status, _, timing in results if status == 200 and timing]
    return {"concurrency": concurrency, "requests": requests, "fresh_connections": fresh_connections,
            "failed": sum(1 for status, _, _ in results if status != 200),
            "statuses": sorted({status for status, _, _ in results}),
            "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
            "images_per_s": round(len(latencies) / wall, 2),
            # None where this URL's /metrics has no batch-size metric for predict (the network process's
            # metrics are not the front's on every BentoML setup): unknown, not 0
            "mean_batch_size": round((sum1 - sum0) / (count1 - count0), 2) if count1 > count0 else None,
            # the service's own account of each request (its Server-Timing header), median per stage
            "server_timing_p50_ms": medians(stages),
            # with --server-pid: CPU milliseconds each of the service's processes spent per request
            "cpu_ms_per_request": {role: round((cpu1[role] - cpu0.get(role, 0.0)) * 1000 / requests, 1)
                                   for role in cpu1} if server_pid else None}


def medians(dicts: list[dict | None], digits: int = 1) -> dict:
    """Per key of the first dict, the median of its known values over all of them (None where none is
    known; {} for no dicts)."""
    dicts = [d for d in dicts if d]
    out = {}
    for key in dicts[0] if dicts else ():
        known = [d[key] for d in dicts if d.get(key) is not None]
        out[key] = round(statistics.median(known), digits) if known else None
    return out


def server_timing(response: httpx.Response) -> dict[str, float]:
    """{stage: ms} from the service's Server-Timing header ({} where there is none)."""
    header = response.headers.get("server-timing", "")
    return {name: float(ms) for name, ms in re.findall(r"(\w+);dur=([\d.]+)", header)}


def in_process(predict, images, params) -> float:
    segment_images(predict, images[:1], params)  # warm-up
    t0 = time.perf_counter()
    for image in images:
        segment_images(predict, [image], params)
    return len(images) / (time.perf_counter() - t0)


def network_only_ms(predict, images) -> float:
    """Median time of the network alone (padding and 8-bit codes included), in process, per image."""
    inputs = [normalize(image) for image in images]
    predict_codes(predict, inputs[:1])  # warm-up
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        predict_codes(predict, [x])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://localhost:3000")
    p.add_argument("--model", type=Path, default=default_model_path(), help="for the in-process comparison")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=16, help="distinct LIVECell images to cycle through")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="in-process run + every level, repeated; medians are reported")
    p.add_argument("--fresh-connections", action="store_true",
                   help="a new HTTP client per request (the previous version of this benchmark)")
    p.add_argument("--server-pid", type=int, help="the `bentoml serve` process: report the CPU time that each of "
                                                    "its processes spends per request")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    paths = livecell_images(args.data, args.images)
    payloads = [(p.name, p.read_bytes()) for p in paths]
    warm = httpx.post(f"{args.url}/segment", files={"image": payloads[0]}, timeout=300)
    warm.raise_for_status()
    # compare with the variant the server runs (fp32 or int8), side by side
    precision = warm.json()["model"].get("precision", "fp32")
    model_path = args.model.with_suffix(".int8.onnx") if precision == "int8" else args.model
    images = [read_image(p) for p in paths]
    model = OnnxModel(model_path)
    # Rounds alternate the in-process run and the server levels, so that a slow spell of a shared
    # machine affects both sides; the ratios use the median of each over the rounds.
    rounds = []
    for round_index in range(args.rounds):
        ort_ips = in_process(model.predict, images, model.default_params)
        network_ms = network_only_ms(model.predict, images)
        levels = [load_test(args.url, payloads, int(c), args.requests, args.fresh_connections, args.server_pid)
                  for c in args.concurrency.split(",")]
        rounds.append({"in_process_onnxruntime_images_per_s": round(ort_ips, 2),
                       "in_process_network_only_ms": round(network_ms, 1), "server": levels})
        print(json.dumps({"round": round_index + 1, **rounds[-1]}), flush=True)
    torch_ips = in_process(torch_predictor(model, None, os.cpu_count() or 1), images, model.default_params)

    ort_ips = statistics.median(r["in_process_onnxruntime_images_per_s"] for r in rounds)
    levels = []
    for i, level in enumerate(rounds[0]["server"]):
        same = [r["server"][i] for r in rounds]  # this level in every round
        levels.append({"concurrency": level["concurrency"], "requests": level["requests"] * len(rounds),
                       "fresh_connections": args.fresh_connections, "failed": sum(s["failed"] for s in same),
                       **medians([{key: s[key] for key in ("p50_ms", "p95_ms", "images_per_s", "mean_batch_size")}
                                  for s in same], digits=2),
                       "cpu_ms_per_request": medians([s["cpu_ms_per_request"] for s in same]) or None})
    best_server = max(level["images_per_s"] for level in levels)
    c1 = next((level for level in levels if level["concurrency"] == 1), None)
    network_ms = statistics.median(r["in_process_network_only_ms"] for r in rounds)
    c1_stages = c1 and [r["server"][levels.index(c1)]["server_timing_p50_ms"] for r in rounds]
    if c1_stages and all(c1_stages):
        # Concurrency 1, medians over the rounds: the client's latency taken apart with the service's
        # own stage times, and its network stage set against the same network in process.
        stages = medians(c1_stages)
        c1["breakdown_ms"] = {**stages, "network_in_process": round(network_ms, 1),
                              "network_call_overhead": round(stages["network"] - network_ms, 1),
                              "outside_the_service": round(c1["p50_ms"] - stages["total"], 1)}
    report = {"url": args.url, "machine": machine_description(), "precision": precision, "model": str(model_path),
              "images": len(images), "image_size": "704x520", "rounds": len(rounds),
              "server_median_over_rounds": levels, "per_round": rounds,
              "in_process_images_per_s": {"onnxruntime": round(ort_ips, 2), "pytorch_eager": round(torch_ips, 2)},
              "in_process_end_to_end_ms": round(1000 / ort_ips, 1), "in_process_network_only_ms": round(network_ms, 1),
              "ratios": {"onnxruntime_vs_pytorch_eager": round(ort_ips / torch_ips, 2),
                         "best_server_vs_in_process_onnxruntime": round(best_server / ort_ips, 2),
                         "best_server_vs_pytorch_eager": round(best_server / torch_ips, 2),
                         # HTTP latency at concurrency 1 over the in-process end-to-end time per image
                         "http_p50_c1_vs_in_process_end_to_end": c1 and round(c1["p50_ms"] / (1000 / ort_ips), 2)}}
    for level in levels:
        print(json.dumps(level))
    print(json.dumps({k: report[k] for k in ("in_process_images_per_s", "ratios")}))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
