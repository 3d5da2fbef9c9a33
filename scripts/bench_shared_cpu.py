"""Training steps on a CPU that other work shares: seconds per step for each thread count, with 0..N
busy processes beside the run (each a pure-Python loop holding one core), side by side in one process.

What `train.speed.ThreadChooser` acts on: PyTorch's threads meet at a barrier after every operator,
so a thread that shares its core with a busy process holds the others back.

    python scripts/bench_shared_cpu.py --steps 4 --json docs/bench_shared_cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cellseg.cpu import describe_cpu  # noqa: E402
from train.loop import train_step  # noqa: E402
from train.model import DEFAULT_DECODER_CHANNELS, build_model  # noqa: E402
from train.speed import choose_precision, to_layout  # noqa: E402


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per thread count and load (alternated)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="fp32: what a CPU without native bf16 (the issue's AVX2 lab) trains in")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    precision = choose_precision(args.precision, "cpu")
    torch.manual_seed(0)
    model = to_layout(build_model("timm-tf_efficientnet_lite0", None, DEFAULT_DECODER_CHANNELS), True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = to_layout(torch.randn(8, 1, 256, 256), True)
    targets = (torch.rand(8, 3, 256, 256) > 0.5).float()
    counts = sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True)
    result = {"cpu": describe_cpu(), "cores": cores, "precision": precision, "batch": "8 x 256²",
              "command": "python " + " ".join(sys.argv), "loads": []}
    for busy in range(cores):
        stop = mp.Event()
        workers = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for w in workers:
            w.start()
        times: dict[int, list[float]] = {n: [] for n in counts}
        for n in counts:  # warm-up at each count: the first step after a change rebuilds the pool
            torch.set_num_threads(n)
            train_step(model, optimizer, images, targets, "cpu", precision, True)
        for _ in range(args.steps):
            for n in counts:
                torch.set_num_threads(n)
                started = time.perf_counter()
                train_step(model, optimizer, images, targets, "cpu", precision, True)
                times[n].append(time.perf_counter() - started)
        stop.set()
        for w in workers:
            w.join()
        row = {"busy_processes": busy, "seconds_per_step": {str(n): round(statistics.median(v), 3) for n, v in times.items()}}
        result["loads"].append(row)
        print(json.dumps(row), flush=True)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
