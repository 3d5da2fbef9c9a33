"""Give freed memory back to the operating system (glibc), so a service's footprint after a large
request returns to its idle level instead of staying at the peak.

glibc serves big blocks with mmap (returned to the system when freed) only above a threshold that it
raises by itself, up to 32 MB, each time such a block is freed; after one 16-megapixel request, the
arrays of later requests come from the heap and stay reserved there. It also keeps freed blocks in
up to 8 arenas per core. Fixing the mmap threshold at 1 MiB, capping the arenas and trimming after
work keeps the footprint near idle. Elsewhere (macOS, musl) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)
M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
    _mallopt = _libc.mallopt
except (OSError, AttributeError):  # not glibc
    _malloc_trim = _mallopt = None


def configure_allocator(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Cap glibc's malloc arenas, and serve every block over `mmap_threshold` bytes (image-sized
    arrays) with mmap, so that freeing it returns it to the system at once."""
    return bool(_mallopt and _mallopt(M_ARENA_MAX, arenas) and _mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def release_memory() -> bool:
    """Return free heap memory to the OS (malloc_trim). Takes a few milliseconds."""
    return bool(_malloc_trim and _malloc_trim(0))
