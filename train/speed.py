"""How a training step runs fast on the machine at hand: memory layout and autocast precision.

- channels_last: convolutions on NHWC tensors skip the layout conversions oneDNN and cuDNN
  otherwise make around every layer (0.99 vs 1.55 s per 8x256² step on an AVX-512 EPYC).
- bf16 autocast: on a GPU always; on a CPU only where it computes bf16 natively (AVX512-BF16 or
  AMX). Elsewhere bf16 is emulated and slower than fp32, so such a CPU stays in fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch

from cellseg.cpu import cpu_flags, cpuinfo_field

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def describe_device(device: str) -> str:
    """'cuda (NVIDIA H200)' or 'cpu (AMD EPYC, 2 cores)': what the model card says a run ran on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({cpuinfo_field('model name') or 'unknown CPU'}, {os.cpu_count()} cores)"


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & set(NATIVE_BF16_FLAGS))


def choose_precision(requested: str, device: str, flags: set[str] | None = None) -> str:
    """'bf16' or 'fp32' for `--precision auto|bf16|fp32` on `device`."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16(flags) else "fp32"


def autocast(device: str, precision: str):
    """Context for the forward pass and loss; fp32 is a no-op."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def to_layout(tensor_or_model, channels_last: bool):
    return tensor_or_model.to(memory_format=torch.channels_last) if channels_last else tensor_or_model


class ThreadChooser:
    """How many threads a training step should use on a CPU that other work may share.

    PyTorch's intra-op threads meet at a barrier after every operator, so one thread that shares its
    core with another process holds all of them back: on 2 cores with one of them busy, a 2-thread
    step ran about 5x slower than idle, far worse than the one free core accounts for (issue 29:
    160 steps instead of 821 in 15 minutes). Every `interval` seconds of training, the next steps
    alternate the candidate counts (all cores, one less, half), `probe_steps` each, and the fastest
    median step is kept until the next probe: the chooser follows load that comes and goes. Only a
    clear win (`MARGIN`) moves it off the current count, so an idle machine keeps all its cores.
    """

    MARGIN = 0.10  # a candidate must be this much faster per step than the current count

    def __init__(self, threads: int, interval: float = 120.0, probe_steps: int = 3, first_probe_at: int = 4,
                 set_threads=torch.set_num_threads):
        self.threads = threads
        self.candidates = sorted({threads, max(1, threads - 1), max(1, threads // 2)}, reverse=True)
        self.interval, self.probe_steps = interval, probe_steps
        self.set_threads = set_threads
        self.next_probe_step = first_probe_at  # after the first steps' one-off costs (kernel choice, allocation)
        self.next_probe_seconds: float | None = None
        self.plan: list[int] = []  # thread counts of the probe's remaining steps
        self.timings: dict[int, list[float]] = {}
        self.history: list[dict] = []  # one entry per probe: when, the medians, the choice
        self._running, self._probing = threads, False
        set_threads(threads)

    def before_step(self, step: int, train_seconds: float) -> None:
        """Set the thread count for the step about to run (a probe's, or the chosen one)."""
        if not self.plan and len(self.candidates) > 1 and self._probe_due(step, train_seconds):
            self.plan = [n for _ in range(self.probe_steps) for n in self.candidates]  # interleaved: drift hits all
            self.timings = {n: [] for n in self.candidates}
        self._running = self.plan.pop(0) if self.plan else self.threads
        self.set_threads(self._running)
        self._probing = bool(self.timings)

    def after_step(self, seconds: float, step: int, train_seconds: float) -> None:
        """Record the step's wall-clock seconds; at a probe's end, choose."""
        if not self._probing:
            return
        self.timings[self._running].append(seconds)
        if self.plan:
            return
        medians = {n: float(sorted(v)[len(v) // 2]) for n, v in self.timings.items()}
        fastest = min(medians, key=medians.get)
        if medians[fastest] < (1 - self.MARGIN) * medians[self.threads]:
            self.threads = fastest
        self.history.append({"step": step, "train_seconds": round(train_seconds, 1), "threads": self.threads,
                             "seconds_per_step": {str(n): round(s, 3) for n, s in medians.items()}})
        self.timings = {}
        self.next_probe_seconds = train_seconds + self.interval
        self.set_threads(self.threads)

    def _probe_due(self, step: int, train_seconds: float) -> bool:
        if self.next_probe_seconds is None:
            return step >= self.next_probe_step
        return train_seconds >= self.next_probe_seconds
