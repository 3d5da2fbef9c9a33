"""Give freed memory back to the operating system (glibc), so a service's footprint after a large
request returns to its idle level instead of staying at the peak.

glibc keeps freed blocks in per-thread arenas for reuse; a server that once held a 16-megapixel
image's arrays keeps that memory reserved indefinitely. Limiting the number of arenas and trimming
after large work returns it. Elsewhere (macOS, musl) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)
M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
    _mallopt = _libc.mallopt
except (OSError, AttributeError):  # not glibc
    _malloc_trim = _mallopt = None


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (default 8 per core): fewer arenas, less memory stranded in them."""
    return bool(_mallopt and _mallopt(M_ARENA_MAX, count))


def release_memory() -> bool:
    """Return free heap memory to the OS (malloc_trim). Takes a few milliseconds."""
    return bool(_malloc_trim and _malloc_trim(0))
