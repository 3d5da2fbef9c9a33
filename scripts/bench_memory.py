"""Memory of the whole running service (every process of `bentoml serve`), idle and under load.

    python scripts/bench_memory.py                  # starts its own server on a free port
    python scripts/bench_memory.py --json docs/bench_memory.json

Measures the summed RSS of the serve process tree: idle; peak during one 704x520 LIVECell request;
peak while it refuses hostile TIFFs (scripts/hostile_tiffs.py, and a 500 KB one whose tile really
inflates to 512 MB: issue 18.1); steady and peak under 16 concurrent LIVECell clients; peak during
one 4000x4000 request; and after it, once the service is idle again (memory returned or kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from local_server import start_server, stop_server  # noqa: E402

from bench_inference import command_line, publish_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402


def service_processes(pid: int) -> dict[str, list[psutil.Process]]:
    """The `bentoml serve` process and its descendants, by a short role name (serve, UNet,
    CellSegmentation)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    roles: dict[str, list[psutil.Process]] = {}
    for proc in procs:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        role = next((name for name in ("UNet", "CellSegmentation") if name in cmdline.split("service:")[-1]
                     and "--worker" in cmdline), None) or ("serve" if proc.pid == pid else f"pid{proc.pid}")
        roles.setdefault(role, []).append(proc)
    return roles


def per_role(pid: int, measure: Callable[[psutil.Process], float]) -> dict[str, float]:
    """`measure` of the service's processes, summed by role (a process that has exited counts 0)."""
    out: dict[str, float] = {}
    for role, procs in service_processes(pid).items():
        for proc in procs:
            try:
                out[role] = out.get(role, 0) + measure(proc)
            except psutil.NoSuchProcess:
                pass
    return out


def process_rss(pid: int) -> dict[str, int]:
    """Resident memory (bytes) of a process and each of its descendants, by role."""
    return per_role(pid, lambda proc: proc.memory_info().rss)


def process_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system, seconds) used so far by the service's processes, by role."""
    return per_role(pid, lambda proc: sum(proc.cpu_times()[:2]))


def tree_rss(pid: int) -> int:
    """Summed resident memory of a process and all its descendants (bytes)."""
    return sum(process_rss(pid).values())


class PeakSampler:
    """Samples the tree's RSS every `interval` s in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak, self.samples, self.at_peak = pid, interval, 0, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            per_process = process_rss(self.pid)
            rss = sum(per_process.values())
            self.samples.append(rss)
            if rss > self.peak:
                self.peak, self.at_peak = rss, per_process
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def settle(pid: int, seconds: float = 5.0) -> int:
    time.sleep(seconds)
    return tree_rss(pid)


def post(url: str, data: bytes, name: str) -> httpx.Response:
    r = httpx.post(f"{url}/mask", files={"image": (name, data)}, timeout=600)
    r.raise_for_status()
    return r


def hostile_uploads() -> dict[str, bytes]:
    """Name -> TIFF whose header asks the decoder for far more than its image needs; one of them
    (500 KB) really inflates to its 512 MB tile, so a decoder that allocates it shows in the RSS."""
    from hostile_tiffs import hostile_tiffs, tile_bomb

    return {**hostile_tiffs(), "inflating_16384_tile": tile_bomb(16384, np.uint16, filled=True)}


def measure(url: str, pid: int, livecell_tif: bytes, big_png: bytes, clients: int = 16, rounds: int = 3,
            hostile: dict[str, bytes] | None = None) -> dict:
    mb = lambda b: round(b / 2**20)  # noqa: E731
    out: dict = {"idle_mb": mb(settle(pid, 2))}
    idle_by_process = {k: mb(v) for k, v in process_rss(pid).items()}
    with PeakSampler(pid) as s:
        post(url, livecell_tif, "one.tif")
    out["one_704x520_peak_mb"] = mb(s.peak)
    if hostile:
        with PeakSampler(pid) as s:
            statuses = {name: httpx.post(f"{url}/mask", files={"image": (f"{name}.tif", data)}, timeout=120).status_code
                        for name, data in hostile.items()}
        out.update({"hostile_tiffs_peak_mb": mb(s.peak), "hostile_tiffs_statuses": statuses})
    with PeakSampler(pid) as s, ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: post(url, livecell_tif, f"{i}.tif"), range(clients * rounds)))
    steady = sorted(s.samples)[len(s.samples) // 2] if s.samples else 0
    out.update({f"concurrent_{clients}_median_mb": mb(steady), f"concurrent_{clients}_peak_mb": mb(s.peak),
                f"concurrent_{clients}_peak_by_process_mb": {k: mb(v) for k, v in s.at_peak.items()}})
    out["idle_after_load_mb"] = mb(settle(pid))
    t0 = time.time()
    with PeakSampler(pid) as s:
        post(url, big_png, "big.png")
    out.update({"big_4000x4000_peak_mb": mb(s.peak), "big_4000x4000_seconds": round(time.time() - t0, 1)})
    out["idle_after_big_mb"] = mb(settle(pid))
    out["idle_after_big_by_process_mb"] = {k: mb(v) for k, v in process_rss(pid).items()}
    out["idle_by_process_mb"] = idle_by_process
    return out


def big_test_image(data_root: Path, side: int = 4000) -> bytes:
    """A 4000x4000 PNG tiled from a real LIVECell image (so the network sees real cells)."""
    import io

    from PIL import Image

    from cellseg.imageio import read_image

    tile = read_image(sorted((data_root / "demo").glob("*.tif"))[0]).astype(np.uint8)
    reps = (-(-side // tile.shape[0]), -(-side // tile.shape[1]))
    buffer = io.BytesIO()
    Image.fromarray(np.tile(tile, reps)[:side, :side]).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tif = sorted((args.data / "demo").glob("*.tif"))[0].read_bytes()
    big = big_test_image(args.data)
    with tempfile.TemporaryDirectory() as home:
        proc, url = start_server(args.model, Path(home), {"CELLSEG_MAX_PIXELS": "16000000"})
        try:
            result = measure(url, proc.pid, tif, big, clients=args.clients, hostile=hostile_uploads())
        finally:
            stop_server(proc)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "memory_gb": round(psutil.virtual_memory().total / 2**30)}
    result["command"] = command_line()
    publish_report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
