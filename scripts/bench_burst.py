"""The service under hostile bursts (issue 18, items 2, 3 and 7), against a server it starts itself.

    python scripts/bench_burst.py --json docs/bench_burst.json

1. Latency of a 704x520 LIVECell `segment` on a fresh server (median of 5), then after a burst of
   concurrent 4000x4000 `segment` calls, and again after 10 s idle: the service must not stay slow.
2. A burst of concurrent 4000x4000 `report` calls: every answer 200, or a documented 503 with
   Retry-After (never a 500), and the peak memory of the whole serve tree.
3. Concurrent ~94 MB uploads that fail to decode: the front's memory once idle again, against its
   idle memory before.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_memory import PeakSampler, big_test_image, process_rss, settle  # noqa: E402
from local_server import start_server, stop_server  # noqa: E402

from bench_inference import command_line, machine_description, publish_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402

MB = 2**20


def call(url: str, endpoint: str, data: bytes, name: str) -> tuple[int, float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/{endpoint}", files={"image": (name, data)}, timeout=900)
    seconds = time.perf_counter() - t0
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") and r.status_code != 200 else {}
    return r.status_code, seconds, {"retry_after": r.headers.get("retry-after"), **body}


def small_latency(url: str, tif: bytes, n: int = 5) -> float:
    return round(float(np.median([call(url, "segment", tif, "small.tif")[1] for _ in range(n)])), 3)


def burst(url: str, endpoint: str, data: bytes, clients: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda i: call(url, endpoint, data, f"big{i}.png"), range(clients)))
    statuses = [status for status, _, _ in answers]
    refusals = [body for status, _, body in answers if status != 200]
    return {"statuses": statuses, "seconds": round(time.perf_counter() - t0, 1),
            "slowest_answer_s": round(max(s for _, s, _ in answers), 1), "refusals": refusals[:3]}


def failed_uploads(url: str, pid: int, clients: int, size: int) -> dict:
    garbage = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    garbage = b"II*\x00" + garbage[4:]  # a TIFF signature, then nothing a decoder can read
    front = lambda: round(process_rss(pid).get("CellSegmentation", 0) / MB)  # noqa: E731
    before = front()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda i: call(url, "segment", garbage, f"bad{i}.tif")[0], range(clients)))
    settle(pid, 5)
    return {"statuses": statuses, "upload_mb": round(size / MB), "front_idle_before_mb": before,
            "front_idle_after_mb": front()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--big-clients", type=int, default=4, help="concurrent 4000x4000 calls per burst")
    p.add_argument("--report-clients", type=int, default=8)
    p.add_argument("--upload-clients", type=int, default=8)
    p.add_argument("--only", choices=["latency", "report", "uploads"], action="append")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    only = set(args.only or ["latency", "report", "uploads"])
    tif = sorted((args.data / "demo").glob("*.tif"))[0].read_bytes()
    big = big_test_image(args.data)
    result: dict = {}
    with tempfile.TemporaryDirectory() as home:
        proc, url = start_server(args.model, Path(home), {"CELLSEG_MAX_PIXELS": "16000000"})
        try:
            if "latency" in only:
                fresh = small_latency(url, tif)
                big_burst = burst(url, "segment", big, args.big_clients)
                result["latency"] = {"fresh_s": fresh, "burst": big_burst, "right_after_s": small_latency(url, tif)}
                time.sleep(10)
                result["latency"]["after_10s_idle_s"] = small_latency(url, tif)
            if "report" in only:
                with PeakSampler(proc.pid) as sampler:
                    result["report_burst"] = burst(url, "report", big, args.report_clients)
                result["report_burst"]["peak_mb"] = round(sampler.peak / MB)
                result["report_burst"]["peak_by_process_mb"] = {k: round(v / MB) for k, v in sampler.at_peak.items()}
            if "uploads" in only:
                result["failed_uploads"] = failed_uploads(url, proc.pid, args.upload_clients, 94_000_000)
            result["serve_log_tracebacks"] = (Path(home) / "serve.log").read_text().count("Traceback")
        finally:
            stop_server(proc)
    result["machine"] = machine_description()
    result["command"] = command_line()
    publish_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
