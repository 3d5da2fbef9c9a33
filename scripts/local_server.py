"""Start `bentoml serve` on a free local port with a given model, wait until it is ready, stop it.
Shared by the benchmarks and the tests that need a real server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, home: Path, env: dict[str, str] | None = None,
                 ready_timeout: float = 180, name: str | None = None, root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """(process, URL) of `bentoml serve service:CellSegmentation` with `model` registered in a
    BentoML store under `home` (as `name`, served as `name:latest`, when given); its log is
    `home/serve.log`. `root`: the checkout whose service runs (another revision's, to compare).
    Raises RuntimeError if it never gets ready."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    register = [sys.executable, "-m", "export", "register", "--model", str(model)]
    if name:
        register += ["--name", name]
        env["CELLSEG_MODEL_TAG"] = f"{name}:latest"
    subprocess.run(register, env=env, cwd=root, check=True, capture_output=True)
    port = free_port()
    with open(home / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:CellSegmentation", "--port",
                                 str(port), "--host", "127.0.0.1"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{(home / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"service not ready in {ready_timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
