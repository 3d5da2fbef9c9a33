"""A model's network maps as another x86 CPU computes them, under QEMU's user-mode emulator.

ONNX Runtime picks its int8 kernels by the CPU's features (CPUID), and without VNNI those kernels
can saturate: the same int8 file gives other maps on an AVX2-only CPU than on one with VNNI. To
measure that on any machine, `emulated_maps` runs the network inside `qemu-x86_64 -cpu <model>`
(Debian package `qemu-user`), which reports that CPU's features, so ONNX Runtime runs the very
kernels it would run there (integer results are exact, so the maps are those of a real such CPU; the
speed is not). QEMU's TCG emulates up to AVX2, not AVX-512: `Haswell-noTSX` stands for every x86 CPU
without VNNI. fp32 is left native: its maps differ across CPUs by ~1e-6, and it runs ~60x slower
emulated than int8 does.

Used by scripts/compare_int8.py (accuracy of each int8 recipe on an AVX2 CPU) and the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64"
AVX2_CPU = "Haswell-noTSX"  # AVX2 + FMA, no AVX-512, no VNNI: the CPUs whose int8 kernels saturate


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def emulated_maps(model: Path, images: Sequence[np.ndarray], cpu: str = AVX2_CPU, threads: int = 1,
                  timeout_s: float | None = None) -> list[np.ndarray]:
    """The network's (3, H, W) probability maps of raw (H, W) `images`, as 8-bit codes decoded back
    (the runtime's own path: cellseg.inference.predict_maps), computed by ONNX Runtime on an emulated
    `cpu`. Raises RuntimeError where QEMU is missing or the emulated run fails."""
    from cellseg.inference import decode_maps

    if not qemu_available():
        raise RuntimeError(f"{QEMU} not found: install Debian's qemu-user to emulate another CPU")
    with tempfile.TemporaryDirectory(prefix="cellseg-emulate-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "maps.npz"
        np.savez(inputs, *images)
        command = [QEMU, "-cpu", cpu, sys.executable, "-m", "cellseg.emulation", str(model), str(inputs),
                   str(outputs), str(threads)]
        # the project root on the path, so the emulated interpreter imports this very cellseg
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"emulated run on {cpu} failed ({done.returncode}): {done.stderr[-2000:]}")
        with np.load(outputs) as codes:
            return decode_maps([codes[f"arr_{i}"] for i in range(len(images))])


def _run_inside(model: str, inputs: str, outputs: str, threads: str) -> None:
    """Inside the emulator: every image through the network, one at a time, saved as 8-bit codes."""
    from cellseg.inference import encode_map, predict_maps
    from cellseg.onnx_model import OnnxModel

    network = OnnxModel(model, threads=int(threads), providers=["CPUExecutionProvider"])
    with np.load(inputs) as data:
        images = [data[f"arr_{i}"] for i in range(len(data.files))]
    codes = [encode_map(predict_maps(network.predict, [image], batch_size=1)[0]) for image in images]
    np.savez(outputs, *codes)


if __name__ == "__main__":
    _run_inside(*sys.argv[1:5])
