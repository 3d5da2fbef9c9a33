"""Time of the `report` endpoint (what the web page asks for: measurements, rendered views and every
download) per LIVECell image, taken apart by the service's own Server-Timing header, for one or more
checkouts of this project served side by side in one run: e.g. the revision before a change and now.

    git worktree add /tmp/before REV                       # any earlier revision
    python scripts/bench_report.py --checkout before=/tmp/before --checkout now=. --images 16 --rounds 3

Each checkout's service is started with its own code and the shipped model of this checkout, all
at once (idle services take no CPU: ONNX Runtime does not spin there), then every round sends the
images one at a time to each in turn, so that the machine's drift touches all alike. Reported: the
median over every request of each stage (queue, decode, network, cells, encode: the report itself,
i.e. measurements, views and downloads; total) and of the client's wall time, per checkout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import httpx  # noqa: E402
from bench_server import server_timing  # noqa: E402
from local_server import start_server, stop_server  # noqa: E402

from bench_inference import command_line, livecell_images, machine_description, publish_report  # noqa: E402
from cellseg.data import default_data_root  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402


def checkout_argument(text: str) -> tuple[str, Path]:
    name, _, folder = text.partition("=")
    if not folder or not (Path(folder) / "service.py").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=FOLDER, a checkout of this project")
    return name, Path(folder).resolve()


def report_once(client: httpx.Client, url: str, path: Path) -> dict[str, float]:
    with open(path, "rb") as fh:
        response = client.post(f"{url}/report", files={"image": (path.name, fh, "image/tiff")}, timeout=120)
    response.raise_for_status()
    return {**server_timing(response), "client": response.elapsed.total_seconds() * 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=checkout_argument, action="append",
                   help="NAME=FOLDER: a checkout of this project to serve (repeat; default: now=this one)")
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    checkouts = dict(args.checkout or [("now", ROOT)])
    paths = livecell_images(args.data, args.images)
    timings: dict[str, list[dict]] = {name: [] for name in checkouts}
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, folder in checkouts.items():
                home = Path(tmp) / name
                home.mkdir()
                servers[name] = start_server(args.model.resolve(), home, root=folder)
            with httpx.Client() as client:
                for _, url in servers.values():  # warm-up: first calls load and allocate
                    report_once(client, url, paths[0])
                for _ in range(args.rounds):
                    for name, (_, url) in servers.items():
                        timings[name] += [report_once(client, url, path) for path in paths]
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    stages = ("queue", "decode", "network", "cells", "encode", "total", "client")
    report = {
        "machine": machine_description(), "images": len(paths), "rounds": args.rounds, "image_size": "704x520",
        "median_ms": {name: {stage: round(statistics.median(t.get(stage, 0.0) for t in rows), 1) for stage in stages}
                      for name, rows in timings.items()},
        "checkouts": {name: str(folder) for name, folder in checkouts.items()},
        "command": command_line(),
    }
    publish_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
