"""Give freed memory back to the operating system (glibc), so a service's footprint after a large
request returns to its idle level instead of staying at the peak.

glibc serves big blocks with mmap (returned to the system when freed) only above a threshold that it
raises by itself, up to 32 MB, each time such a block is freed; after one 16-megapixel request, the
arrays of later requests come from the heap and stay reserved there. It also keeps freed blocks in
up to 8 arenas per core. Fixing the mmap threshold, capping the arenas and trimming after work keeps
the footprint near idle. Elsewhere (macOS, musl) these are no-ops.

The threshold is a trade: every mmap'd block is fresh memory that the kernel must fault in and zero
on first touch. At 1 MiB, every LIVECell-size array pays that, and post-processing takes about 1.2x as
long (scripts/bench_allocator.py);
at 32 MiB (HEAP_UP_TO), arrays up to a 2-megapixel float32 map are reused from the heap, trimmed once
the service has been idle for a second (trimming after every request made the next one fault the same
pages in again), while a 16-megapixel request's maps still come from mmap and go straight back. The
network process uses 1 MiB (MMAP_FROM_1MIB): ONNX Runtime's arena holds its working memory in large
blocks and gives them back with munmap when it shrinks after a big call (cellseg.onnx_model).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


HEAP_UP_TO = 32 << 20
MMAP_FROM_1MIB = 1 << 20


def configure_allocator(arenas: int = 2, mmap_threshold: int = HEAP_UP_TO) -> bool:
    """Cap glibc's malloc arenas, and serve every block over `mmap_threshold` bytes (image-sized
    arrays) with mmap, so that freeing it returns it to the system at once."""
    return bool(_mallopt and _mallopt(M_ARENA_MAX, arenas) and _mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def release_memory() -> bool:
    """Return free heap memory to the OS (malloc_trim). Takes a few milliseconds."""
    return bool(_malloc_trim and _malloc_trim(0))


def release_idle_memory() -> bool:
    """Once a service is idle: collect unreachable reference cycles, then return free memory.

    A failed decode keeps its input alive in a cycle (the exception's traceback holds the decoder's
    frame, which holds the exception and the bytes), and only Python's cyclic collector frees it. That
    collector runs after enough new objects, not bytes, so a quiet service kept eight failed 90 MB
    uploads (720 MB) indefinitely. A full collection takes milliseconds, paid only when idle."""
    gc.collect()
    return release_memory()
