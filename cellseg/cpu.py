"""What the CPU at hand computes well: read once from /proc/cpuinfo, torch-free.

Which int8 kernels ONNX Runtime picks depends on the CPU, and so do int8 results, not only their
speed: without VNNI (AVX2, or AVX-512 without VNNI) x86 adds the products of uint8 x int8 pairs in
16-bit registers that saturate, so a model quantised for VNNI can give other maps there
(docs/METRICS.md, "int8 across CPUs"). Every figure the project reports names the CPU it came from
through `describe_cpu`.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first `name : value` of /proc/cpuinfo (None where there is no such file or field)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset((cpuinfo_field("flags") or "").split())


def int8_kernels(flags: frozenset[str] | set[str] | None = None) -> str:
    """The int8 instructions ONNX Runtime's x86 kernels can use here, in words: 'AMX', 'AVX-512 VNNI',
    'AVX-VNNI', 'AVX-512 without VNNI', 'AVX2 without VNNI' or 'no AVX2' (or the machine's
    architecture where it is not x86)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return platform.machine() or "unknown"
    if "amx_int8" in flags:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx512bw" in flags:
        return "AVX-512 without VNNI"
    if "avx2" in flags:
        return "AVX2 without VNNI"
    return "no AVX2"


def has_vnni(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether int8 products are summed in 32 bits (VNNI or AMX): no 16-bit saturation."""
    return int8_kernels(flags) in ("AMX", "AVX-512 VNNI", "AVX-VNNI")


@functools.cache
def describe_cpu() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AMX': the CPU model, its cores and its int8 kernels."""
    model = cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, {int8_kernels()}"
