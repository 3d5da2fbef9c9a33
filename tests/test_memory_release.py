"""Memory a failed request leaves behind goes back once the service is idle (issue 18.7)."""

import gc
import tracemalloc

import numpy as np
import pytest

from cellseg.imageio import ImageError, decode_image
from cellseg.memory import release_idle_memory


def test_a_failed_decode_keeps_its_upload_only_until_the_idle_release():
    """Eight failed 90 MB uploads left the front at +720 MB through idle: each failed decode's bytes
    stay referenced from a cycle (exception -> traceback -> decoder frame -> exception) that only the
    cyclic collector frees, and a quiet service rarely runs it."""
    garbage = b"II*\x00" + np.random.default_rng(0).integers(0, 256, 30_000_000, dtype=np.uint8).tobytes()
    gc.collect()
    gc.disable()  # as in a quiet service: no collection happens by itself during the test
    tracemalloc.start()
    try:
        upload = bytearray(garbage)  # a fresh copy, allocated while tracing
        with pytest.raises(ImageError):
            decode_image(upload)
        del upload
        kept, _ = tracemalloc.get_traced_memory()
        release_idle_memory()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert after < 5_000_000, f"{after:,} bytes still held after the idle release ({kept:,} before it)"
