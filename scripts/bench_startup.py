"""Service startup, with and without the precision check: seconds from `bentoml serve` to /readyz 200.

    python scripts/bench_startup.py --rounds 3 --json docs/bench_startup.json

The model is registered once; each round starts the service with CELLSEG_PRECISION=fp32 (no check:
fp32 asked for) and with the default (auto: fp32 and int8 run on the reference images, and timed),
alternately, and reads the check's own time from the network process's startup line.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from local_server import ROOT, free_port, stop_server  # noqa: E402

from bench_inference import command_line, publish_report  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402
from cellseg.onnx_model import default_model_path  # noqa: E402


def time_to_ready(env: dict, log: Path, timeout: float = 180) -> float:
    port = free_port()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:CellSegmentation", "--port", str(port),
                                 "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.1)
        raise RuntimeError(f"not ready in {timeout} s")
    finally:
        stop_server(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cellseg-startup-") as tmp:
        home = Path(tmp)
        env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
        subprocess.run([sys.executable, "-m", "export", "register", "--model", str(args.model)], env=env, cwd=ROOT,
                       check=True, capture_output=True)
        seconds: dict[str, list[float]] = {"fp32 (no check)": [], "auto (with the check)": []}
        check_s, served = [], None
        for _ in range(args.rounds):
            for name, precision in (("fp32 (no check)", "fp32"), ("auto (with the check)", "auto")):
                log = home / "serve.log"
                seconds[name].append(round(time_to_ready({**env, "CELLSEG_PRECISION": precision}, log), 2))
                found = re.search(r"serving (\w+) \((.*)\), on .* loaded and checked in ([\d.]+) s", log.read_text())
                if precision == "auto" and found:
                    served = f"{found.group(1)}: {found.group(2)}"
                    check_s.append(float(found.group(3)))
            print(seconds, flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {"machine": describe_cpu(), "command": command_line(), "model": str(args.model), "rounds": args.rounds,
              "seconds_to_ready": seconds, "median_s": medians,
              "check_adds_s": round(medians["auto (with the check)"] - medians["fp32 (no check)"], 2),
              "network_process_load_and_check_s": check_s, "served": served}
    publish_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
