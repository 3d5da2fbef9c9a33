"""Memory and time of reading hostile annotation files (issue 27, items 1-7): each file is read by
`cellseg.annotations.scan_annotated` (what `cellseg evaluate --data` and fine-tuning do) in a fresh
process, which reports its peak resident memory and wall time, and how the read ended.

    python scripts/bench_hostile_annotations.py --json docs/bench_hostile_annotations.json

The files are the ones tests/test_annotations_hostile.py makes (the same generators), a few of them
larger than the tests can afford. Bound to hold: under 2 GB for any file under 1 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from test_annotations_hostile import SQUARE, coco_file, lying_zip, write_image  # noqa: E402

from bench_inference import command_line, publish_report  # noqa: E402
from cellseg.cpu import describe_cpu  # noqa: E402


def read_in_subprocess(path: Path, timeout: float = 600) -> dict:
    code = textwrap.dedent(f"""
        import json, resource, sys, time
        from cellseg.annotations import AnnotationError, scan_annotated
        t0 = time.perf_counter()
        try:
            scan = scan_annotated([{str(path)!r}])
            outcome = f"read: {{len(scan.samples)}} image(s), {{scan.samples[0].labels().max()}} cells"
        except AnnotationError as exc:
            outcome = "refused: " + str(exc).split(': ', 1)[-1][:160]
        print(json.dumps({{"outcome": outcome, "seconds": round(time.perf_counter() - t0, 2),
                          "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}}))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        return {"outcome": f"crashed ({run.returncode}): {run.stderr[-300:]}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def cases(folder: Path) -> dict[str, tuple[Path, int]]:
    """{case: (path to read, size of the hostile file in bytes)}."""
    made = {}

    def case(name: str) -> Path:
        sub = folder / name.replace(" ", "-")
        sub.mkdir()
        return sub

    path = coco_file(case("coco NaN vertex"), [{"segmentation": [[10.0, 10.0, float("nan"), 10.0, 40.0, 40.0]]}])
    made["COCO polygon with a NaN vertex"] = (path, path.stat().st_size)
    path = coco_file(case("coco giant rle"), [{"segmentation": {"size": [100000, 100000], "counts": [0, 10**10]}}])
    made["COCO RLE of 100000x100000 on a 128x128 image"] = (path, path.stat().st_size)
    size, frame = 4000, [0.0, 0.0, 4000.0, 0.0, 4000.0, 4000.0, 0.0, 4000.0]
    path = coco_file(case("coco 500 frames"), [{"segmentation": [frame]}] * 500, shape=(size, size))
    made["COCO, 500 full-frame polygons on 4000x4000"] = (path, path.stat().st_size)
    path = coco_file(case("coco 60 frames"), [{"segmentation": [frame]}] * 60 + [{"segmentation": [SQUARE]}],
                     shape=(size, size))
    made["COCO, 60 full-frame polygons + 1 cell on 4000x4000 (under the bound: read)"] = (path, path.stat().st_size)
    geo = case("geojson 400 frames")
    write_image(geo / "b.png", (size, size))
    rectangle = {"type": "Polygon", "coordinates": [[[0, 0], [size, 0], [size, size], [0, size], [0, 0]]]}
    (geo / "b.geojson").write_text(json.dumps([{"type": "Feature", "geometry": rectangle, "properties": {}}] * 400))
    made["GeoJSON, 400 full-frame rectangles on 4000x4000"] = (geo, (geo / "b.geojson").stat().st_size)
    roi = case("roi zip lying about its size")
    write_image(roi / "a.png", (64, 64))
    lying_zip(roi / "a_RoiSet.zip", "cell.roi", 2 * 2**30 - 2**24, 100)
    made["ROI zip entry declaring 100 bytes, inflating to 2 GB"] = (roi, (roi / "a_RoiSet.zip").stat().st_size)
    from roifile import ROI_TYPE, ImagejRoi, roiwrite

    many = case("roi million vertices")
    write_image(many / "a.png", (1000, 1000))
    angles = np.linspace(0, 2 * np.pi, 1_000_000, endpoint=False)
    radius = 450 + 40 * np.sin(angles * 200)
    roi_points = ImagejRoi.frompoints(np.column_stack([500 + radius * np.cos(angles),
                                                       500 + radius * np.sin(angles)]).astype(np.float32))
    roi_points.roitype = ROI_TYPE.POLYGON
    roiwrite(many / "a.roi", roi_points)
    made["ROI of 1,000,000 vertices on 1000x1000 (read)"] = (many / "a.png", (many / "a.roi").stat().st_size)
    import tifffile

    mask = case("mask label per pixel")
    write_image(mask / "a.png", (1024, 1024))
    tifffile.imwrite(mask / "a_masks.tif", np.arange(1, 1024 * 1024 + 1, dtype=np.uint32).reshape(1024, 1024))
    made["label mask, every pixel its own label (1024x1024)"] = (mask, (mask / "a_masks.tif").stat().st_size)
    deep = case("deep json")
    write_image(deep / "a.png", (64, 64))
    (deep / "a.geojson").write_text('{"type": "FeatureCollection", "features": ' + "[" * 200_000 + "]" * 200_000 + "}")
    made["GeoJSON nested 200,000 deep"] = (deep, (deep / "a.geojson").stat().st_size)
    return made


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cellseg-hostile-") as tmp:
        for name, (path, size) in cases(Path(tmp)).items():
            results[name] = {"file_bytes": size, **read_in_subprocess(path)}
            print(name, results[name], flush=True)
    publish_report({"machine": describe_cpu(), "command": command_line(), "bound": "under 2 GB for a file under 1 MB",
                    "cases": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
