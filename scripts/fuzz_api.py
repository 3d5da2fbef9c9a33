"""Fuzz the running service with schemathesis, from its own served (unpatched) OpenAPI document.

    python scripts/fuzz_api.py --url http://127.0.0.1:3000 --max-examples 200

Every operation that takes an image (/segment, /mask, /overlay, /rois, /geojson, /report) gets schemathesis' generated junk,
a real image (PNG or TIFF, 8- or 16-bit, several sizes, cut from the real LIVECell demo image), so
that successful segmentations are exercised too, or a hostile TIFF (scripts/hostile_tiffs.py: tiles,
strips, JPEG frames or header arrays far larger than the image; it must be refused, 400 or 413,
without the decoder allocating what it declares), about a third each. The checks: no
server error (5xx), every status code documented, every response body, content type and header
conforming to the document. The service may refuse a schema-valid request (junk bytes are a valid
"binary string" but not an image), so schemathesis' positive-data-acceptance check is not run.

Used by tests/test_service.py with a bounded case count; this file is also the hooks module
(SCHEMATHESIS_HOOKS=fuzz_api, with scripts/ on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CHECKS = ("not_a_server_error,status_code_conformance,response_schema_conformance,"
          "content_type_conformance,response_headers_conformance")
OPERATIONS = "^/(segment|mask|overlay|rois|geojson|report)$"


def real_images(data_root: Path) -> list[bytes]:
    """Real uploads: crops of a LIVECell image as 8/16-bit PNG and TIFF at several sizes."""
    import tifffile
    from PIL import Image

    from cellseg.imageio import read_image

    demo = sorted((data_root / "demo").glob("*.tif"))
    if not demo:
        return []
    raw = read_image(demo[0]).astype(np.uint8)
    out = []
    for h, w in ((64, 64), (130, 200), (raw.shape[0], raw.shape[1])):
        crop = raw[:h, :w]
        for array in (crop, crop.astype(np.uint16) * 257):
            png, tif = io.BytesIO(), io.BytesIO()
            Image.fromarray(array).save(png, format="PNG")
            tifffile.imwrite(tif, array)
            out += [png.getvalue(), tif.getvalue()]
    return out


def hostile_images() -> list[bytes]:
    """TIFFs whose header asks the decoder for far more memory than the image needs (issue 18.1)."""
    from hostile_tiffs import hostile_tiffs

    return list(hostile_tiffs().values())


def _register_hooks() -> None:
    import schemathesis
    from hypothesis import strategies as st

    from cellseg.data import default_data_root

    upload_sets = [images for images in (real_images(default_data_root()), hostile_images()) if images]

    @schemathesis.hook
    def flatmap_body(ctx, body):
        if not isinstance(body, dict) or "image" not in body:
            return st.just(body)
        uploads = [st.sampled_from(images).map(lambda image: {**body, "image": image}) for images in upload_sets]
        return st.one_of(st.just(body), *uploads)


if os.environ.get("SCHEMATHESIS_HOOKS", "").endswith("fuzz_api"):
    _register_hooks()


def run(url: str, max_examples: int, seed: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_api",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url.rstrip('/')}/docs.json",
               "--checks", CHECKS, "--include-path-regex", OPERATIONS, "--max-examples", str(max_examples),
               "--no-color", "--request-timeout", "300"]
    if seed is not None:
        command += ["--seed", str(seed)]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--max-examples", type=int, default=200, help="per operation, fuzzing phase")
    p.add_argument("--seed", type=int)
    args = p.parse_args()
    result = run(args.url, args.max_examples, args.seed)
    print(result.stdout[-20000:], result.stderr[-5000:], sep="\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
