r"""Small requests under a burst of large ones, and large ones whose client hung up (issue 27, item 10).

    git worktree add /tmp/before-fairness REV          # the revision before the change
    python scripts/bench_fairness.py --checkout before=/tmp/before-fairness --checkout now=. \
        --json docs/bench_fairness.json

Each checkout's service runs alone (one after the other, each with this checkout's shipped model and
16 MP images allowed):
- alone: a 256x256 `segment` (a crop of a LIVECell image) on the idle service, median of 5;
- burst: `--big` concurrent 4000x4000 `segment` requests (a LIVECell image tiled), and meanwhile one
  client sending the small request back to back: its latencies (p50, p99, max) and statuses;
- abandoned: `--big` 4000x4000 requests whose client hangs up after 2 s, then the small request
  back to back for 30 s: its latencies; the old service kept computing the abandoned images.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_memory import big_test_image  # noqa: E402
from bench_report import checkout_argument  # noqa: E402
from local_server import start_server, stop_server  # noqa: E402

from bench_inference import command_line, publish_report  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.imageio import read_image  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402


def small_image(data_root: Path) -> bytes:
    tile = read_image(sorted((data_root / "demo").glob("*.tif"))[0]).astype(np.uint8)[:256, :256]
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, data: bytes, name: str, timeout: float = 600) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        status = httpx.post(f"{url}/segment", files={"image": (name, data)}, timeout=timeout).status_code
    except httpx.TimeoutException:
        status = 0  # this client hung up
    return status, time.perf_counter() - t0


def small_while(url: str, small: bytes, running) -> list[tuple[int, float]]:
    """The small request back to back while `running()` holds."""
    answers = []
    while running():
        answers.append(post(url, small, "small.png"))
    return answers


def latencies(answers: list[tuple[int, float]]) -> dict:
    seconds = sorted(s for _, s in answers)
    if not seconds:
        return {"requests": 0}
    return {"requests": len(seconds), "p50_s": round(statistics.median(seconds), 2),
            "p99_s": round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 2),
            "max_s": round(seconds[-1], 2), "statuses": sorted({status for status, _ in answers})}


def measure(url: str, small: bytes, big: bytes, clients: int) -> dict:
    alone = round(statistics.median(post(url, small, "small.png")[1] for _ in range(5)), 3)
    done = threading.Event()
    with ThreadPoolExecutor(clients + 1) as pool:
        smalls = pool.submit(small_while, url, small, lambda: not done.is_set())
        t0 = time.perf_counter()
        bigs = list(pool.map(lambda i: post(url, big, f"big{i}.png"), range(clients)))
        burst_s = time.perf_counter() - t0
        done.set()
        burst = latencies(smalls.result())
    burst.update({"big_statuses": sorted(s for s, _ in bigs), "big_last_answer_s": round(burst_s, 1)})
    with ThreadPoolExecutor(clients) as pool:  # clients that hang up after 2 s
        list(pool.map(lambda i: post(url, big, f"gone{i}.png", timeout=2), range(clients)))
    until = time.perf_counter() + 30
    abandoned = latencies(small_while(url, small, lambda: time.perf_counter() < until))
    time.sleep(5)
    return {"small_alone_s": alone, "burst": burst, "after_abandoned": abandoned}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=checkout_argument, action="append", required=True, metavar="NAME=FOLDER")
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--big", type=int, default=4, help="concurrent 4000x4000 requests")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    small, big = small_image(args.data), big_test_image(args.data)
    results = {}
    for name, folder in args.checkout:
        with tempfile.TemporaryDirectory(prefix=f"cellseg-fair-{name}-") as home:
            proc, url = start_server(args.model.resolve(), Path(home), {"CELLSEG_MAX_PIXELS": "16000000"}, root=folder)
            try:
                results[name] = measure(url, small, big, args.big)
            finally:
                stop_server(proc)
        print(name, results[name], flush=True)
    publish_report({"machine": describe_cpu(), "command": command_line(), "big_clients": args.big,
                    "small": "256x256 PNG, segment", "big": "4000x4000 PNG (a LIVECell image tiled), segment",
                    "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
