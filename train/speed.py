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
