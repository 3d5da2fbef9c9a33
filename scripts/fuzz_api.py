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

Then hand-made hostile multipart uploads (`hostile_multipart`: extra and nameless parts, 1,000
parts, long and Japanese file names, a charset, capitals) that must get answers below 500.

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


def hostile_multipart(image: bytes) -> dict[str, tuple[dict[str, str], bytes]]:
    """Uploads a schema-driven fuzzer does not write: odd multipart structure, names and headers
    (issue 18.5). Name -> (headers, body). Each must get an answer below 500."""
    def body(*parts: bytes, boundary: str = "fuzz") -> bytes:
        return b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts) + \
            b"--" + boundary.encode() + b"--\r\n"

    def file_part(name: str, filename: str, data: bytes) -> bytes:
        return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data

    image_part = file_part("image", "cells.tif", image)
    multipart = {"Content-Type": "multipart/form-data; boundary=fuzz"}
    return {
        "extra file part": (multipart, body(image_part, file_part("mask", "b.tif", image))),
        "parameter as a file": (multipart, body(image_part, file_part("min_size", "v.txt", b"20"))),
        "part without a name": (multipart, body(image_part, b"Content-Disposition: form-data\r\n\r\n7")),
        "1,000 parts": (multipart, body(image_part, *[b'Content-Disposition: form-data; name="x"\r\n\r\n1'] * 1000)),
        "300-byte file name": (multipart, body(file_part("image", "c" * 296 + ".tif", image))),
        "85-character Japanese file name": (multipart, body(file_part("image", "細胞画像" * 20 + "実験.tif", image))),
        "charset=cp037": ({"Content-Type": "multipart/form-data; boundary=fuzz; charset=cp037"}, body(image_part)),
        "media type in capitals": ({"Content-Type": "MULTIPART/FORM-DATA; boundary=fuzz"}, body(image_part)),
        "quoted boundary": ({"Content-Type": 'multipart/form-data; boundary="fuzz"'}, body(image_part)),
    }


def run_hostile(url: str, image: bytes, endpoints: tuple[str, ...] = ("segment", "report")) -> dict[str, int]:
    """Status per hostile upload and endpoint ("segment: extra file part" -> 400)."""
    import httpx

    statuses = {}
    for endpoint in endpoints:
        for name, (headers, content) in hostile_multipart(image).items():
            r = httpx.post(f"{url.rstrip('/')}/{endpoint}", headers=headers, content=content, timeout=300)
            statuses[f"{endpoint}: {name}"] = r.status_code
    return statuses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--max-examples", type=int, default=200, help="per operation, fuzzing phase")
    p.add_argument("--seed", type=int)
    args = p.parse_args()
    result = run(args.url, args.max_examples, args.seed)
    print(result.stdout[-20000:], result.stderr[-5000:], sep="\n")
    from cellseg.data import default_data_root

    demo = sorted((default_data_root() / "demo").glob("*.tif"))
    hostile = run_hostile(args.url, demo[0].read_bytes()) if demo else {}
    for name, status in hostile.items():
        print(f"{status}  {name}")
    server_errors = [name for name, status in hostile.items() if status >= 500]
    return result.returncode or (1 if server_errors else 0)


if __name__ == "__main__":
    sys.exit(main())
