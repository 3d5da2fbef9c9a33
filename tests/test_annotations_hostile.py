"""Issue 27, annotation readers: files that exhausted memory or time, or ended in tracebacks, now get
one clear error naming the file (or a correct result) within bounded memory and time.

Each hostile case runs `scan_annotated` in a subprocess capped at 2 GiB of memory (RLIMIT_AS on top
of what the interpreter and its libraries map at start) and 60 s, as `cellseg evaluate --data` would
read it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

roifile = pytest.importorskip("roifile")
from roifile import ROI_TYPE, ImagejRoi, roiwrite  # noqa: E402

MEMORY_CAP = 2 * 2**30


def scan(paths, cap: int = MEMORY_CAP, timeout: float = 60) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of reading `paths` in a subprocess whose memory may grow by `cap`."""
    code = textwrap.dedent(f"""
        import resource, sys
        from cellseg.annotations import AnnotationError, scan_annotated
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + {cap}, hard))
        try:
            scan = scan_annotated({[str(p) for p in paths]!r})
        except AnnotationError as exc:
            print(exc, file=sys.stderr)
            sys.exit(2)
        print(len(scan.samples), scan.samples[0].labels().max() if scan.samples else 0)
    """)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return run.returncode, run.stderr + run.stdout, time.monotonic() - t0


def one_line_error(result, *words):
    code, text, _ = result
    assert code == 2, text[-2000:]
    line = text.strip()
    assert "\n" not in line and "Traceback" not in line, line[-2000:]
    for word in words:
        assert word in line, line
    return line


def write_image(path, shape):
    Image.fromarray(np.zeros(shape, np.uint8)).save(path)


def coco_file(folder, annotations, shape=(128, 128), images=None):
    write_image(folder / "a.png", shape)
    dataset = {"images": images or [{"id": 1, "file_name": "a.png", "height": shape[0], "width": shape[1]}],
               "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, **a} for i, a in enumerate(annotations)],
               "categories": [{"id": 1, "name": "cell"}]}
    path = folder / "cells.json"
    path.write_text(json.dumps(dataset))
    return path


SQUARE = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]


@pytest.mark.parametrize("segmentation, says", [
    ([[10.0, 10.0, float("nan"), 10.0, 40.0, 40.0]], "finite"),
    ({"size": [100000, 100000], "counts": [0, 10**10]}, "RLE is of size [100000, 100000]"),
    ({"size": [64, 64], "counts": [0, 4096]}, "RLE is of size [64, 64]"),
    ({"size": [128, 128], "counts": [-5, 16389]}, "non-negative"),
    ({"size": [128, 128], "counts": "00000000000000000000ZZZ"}, "RLE"),
    (None, "no usable segmentation"), ("cells", "no usable segmentation"), ([], "no usable segmentation"),
    ([[]], "at least 6 numbers"), ([[1.0, 2.0, 3.0, 4.0]], "at least 6 numbers"), ([[1, 2, 3, 4, 5, 6, 7]], "even"),
])
def test_malformed_coco_segmentations_are_one_line_errors(tmp_path, segmentation, says):
    """Items 1, 2, 7, 16: NaN vertices and giant RLEs passed 6 GB; others gave tracebacks or were accepted."""
    annotation = {"bbox": [0, 0, 1, 1]} if segmentation is None else {"segmentation": segmentation}
    path = coco_file(tmp_path, [{"segmentation": [SQUARE]}, annotation])
    one_line_error(scan([path]), str(path), says)


def test_a_bbox_only_coco_annotation_is_a_one_line_error(tmp_path):
    path = coco_file(tmp_path, [{"bbox": [10, 10, 5, 5]}])
    one_line_error(scan([path]), str(path), "annotation 1", "no usable segmentation")


def test_coco_annotations_of_missing_images_and_paths_outside_the_folder_are_refused(tmp_path):
    path = coco_file(tmp_path, [{"segmentation": [SQUARE], "image_id": 7}])
    one_line_error(scan([path]), str(path), "image_id 7")
    for name in ("/etc/passwd", "../a.png"):
        path = coco_file(tmp_path, [{"segmentation": [SQUARE]}],
                         images=[{"id": 1, "file_name": name, "height": 128, "width": 128}])
        one_line_error(scan([path]), "no absolute path, no '..'")


def test_a_correct_coco_rle_in_both_forms_still_reads(tmp_path):
    from pycocotools import mask as mask_utils

    mask = np.zeros((128, 128), np.uint8, order="F")
    mask[20:50, 30:70] = 1
    compressed = mask_utils.encode(mask)
    flat = mask.ravel(order="F").astype(int)
    counts = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()  # runs, zeros first
    counts = ([0] if flat[0] else []) + counts
    path = coco_file(tmp_path, [{"segmentation": {"size": [128, 128], "counts": compressed["counts"].decode()}},
                                {"segmentation": {"size": [128, 128], "counts": counts}}])
    code, text, _ = scan([path])
    assert code == 0 and text.split() == ["1", "1"], text  # the same square twice: one cell, the other hidden


def test_full_frame_shapes_are_bounded_in_memory_and_time(tmp_path):
    """Item 3: 500 full-frame polygons on a 4000x4000 image (75 KB of COCO) passed 6 GB."""
    size = 4000
    frame = [0.0, 0.0, float(size), 0.0, float(size), float(size), 0.0, float(size)]
    path = coco_file(tmp_path, [{"segmentation": [frame]}] * 500, shape=(size, size))
    assert path.stat().st_size < 1_000_000
    one_line_error(scan([path]), str(path), "times over")
    geo = tmp_path / "geo"
    geo.mkdir()
    write_image(geo / "b.png", (size, size))
    rectangle = {"type": "Polygon", "coordinates": [[[0, 0], [size, 0], [size, size], [0, size], [0, 0]]]}
    (geo / "b.geojson").write_text(json.dumps([{"type": "Feature", "geometry": rectangle, "properties": {}}] * 400))
    one_line_error(scan([geo]), "b.geojson", "times over")


def test_many_overlapping_shapes_under_the_bound_read_within_memory(tmp_path):
    """40 full-frame shapes plus small cells on 4000x4000: read one cell's pixels at a time."""
    size = 4000
    frame = [0.0, 0.0, float(size), 0.0, float(size), float(size), 0.0, float(size)]
    path = coco_file(tmp_path, [{"segmentation": [frame]}] * 40 + [{"segmentation": [SQUARE]}], shape=(size, size))
    code, text, seconds = scan([path], timeout=120)
    assert code == 0 and text.split() == ["1", "2"], text[-2000:]  # the square, and one frame over the rest


def lying_zip(path, entry: str, zeros: int, declared: int) -> None:
    """A zip whose entry inflates to `zeros` zero bytes but whose headers declare `declared` bytes."""
    chunk = bytes(16 * 2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(entry, "w", force_zip64=False) as fh:
        for _ in range(zeros // len(chunk)):
            fh.write(chunk)
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(signature)
        raw[at + offset : at + offset + 4] = struct.pack("<I", declared)
    path.write_bytes(bytes(raw))


def test_a_roi_zip_entry_that_lies_about_its_size_is_read_bounded(tmp_path):
    """Item 4: an entry declaring 100 bytes that inflates to 2 GB took 2.2 GB: zipfile's read() of a
    whole entry inflates everything the compressed bytes hold before cutting to the declared size."""
    write_image(tmp_path / "a.png", (64, 64))
    lying_zip(tmp_path / "a_RoiSet.zip", "cell.roi", 640 * 2**20, 100)
    assert (tmp_path / "a_RoiSet.zip").stat().st_size < 1_000_000
    line = one_line_error(scan([tmp_path], cap=512 * 2**20), "a_RoiSet.zip")
    assert "MemoryError" not in line and "CRC" in line  # read as far as declared, then found damaged


def test_a_roi_of_many_vertices_fills_in_time_proportional_to_its_edges(tmp_path):
    """Item 5: 20,000 vertices over 1000x1000 took 72 s; a 1,000,000-vertex ROI about an hour."""
    write_image(tmp_path / "a.png", (1000, 1000))
    angles = np.linspace(0, 2 * np.pi, 400_000, endpoint=False)
    radius = 450 + 40 * np.sin(angles * 200)  # a wavy circle: every vertex matters
    points = np.column_stack([500 + radius * np.cos(angles), 500 + radius * np.sin(angles)])
    roi = ImagejRoi.frompoints(points.astype(np.float32))
    roi.roitype = ROI_TYPE.POLYGON
    roiwrite(tmp_path / "a.roi", roi)
    code, text, seconds = scan([tmp_path / "a.png"])
    assert code == 0 and text.split() == ["1", "1"], text[-2000:]
    assert seconds < 30
    # the scanline fill equals point-in-polygon by pixel centres (matplotlib's Path), here on 2,000 vertices
    from matplotlib.path import Path as MplPath

    from cellseg.annotations import fill_rings

    few = points[::200]
    mask = fill_rings([few])(0, 0, (1000, 1000))
    rows, cols = np.mgrid[:1000, :1000]
    inside = MplPath(few).contains_points(np.column_stack([cols.ravel() + 0.5, rows.ravel() + 0.5])).reshape(1000, 1000)
    assert (mask != inside).sum() <= 4  # at most centres lying exactly on an edge differ


def test_a_mask_with_a_label_per_pixel_is_refused(tmp_path):
    """Item 6: 1,048,576 one-pixel cells were read, then evaluation passed 6 GB."""
    import tifffile

    write_image(tmp_path / "a.png", (1024, 1024))
    tifffile.imwrite(tmp_path / "a_masks.tif", np.arange(1, 1024 * 1024 + 1, dtype=np.uint32).reshape(1024, 1024))
    one_line_error(scan([tmp_path]), "a_masks.tif", "1,048,576 cells")


@pytest.mark.parametrize("text", ['{"type": "FeatureCollection", "features": ' + "[" * 200_000 + "]" * 200_000 + "}",
                                  None])
def test_json_nested_too_deeply_is_a_one_line_error(tmp_path, text):
    write_image(tmp_path / "a.png", (64, 64))
    if text is None:  # COCO
        (tmp_path / "cells.json").write_text('{"images": [], "annotations": ' + "[" * 200_000 + "]" * 200_000 + "}")
        one_line_error(scan([tmp_path / "cells.json"]), "nested too deeply")
    else:
        (tmp_path / "a.geojson").write_text(text)
        one_line_error(scan([tmp_path]), "a.geojson", "nested too deeply")


@pytest.mark.parametrize("value", ["Infinity", "1e400", "-1e30"])
def test_geojson_coordinates_that_are_not_finite_sane_numbers_are_refused(tmp_path, value):
    write_image(tmp_path / "a.png", (64, 64))
    ring = f"[[0, 0], [{value}, 0], [10, 10], [0, 0]]"
    (tmp_path / "a.geojson").write_text('[{"type": "Feature", "properties": {}, "geometry": '
                                        f'{{"type": "Polygon", "coordinates": [{ring}]}}}}]')
    one_line_error(scan([tmp_path]), "a.geojson", "finite numbers")


@pytest.mark.parametrize("value", [np.inf, 1e30])
def test_roi_vertices_that_are_not_finite_sane_numbers_are_refused(tmp_path, value):
    write_image(tmp_path / "a.png", (64, 64))
    roi = ImagejRoi.frompoints(np.array([[1, 1], [value, 1], [30, 30]], dtype=np.float32))
    roi.roitype = ROI_TYPE.POLYGON
    roi.name = "evil\x1b[31mname\nnext"
    roiwrite(tmp_path / "a.roi", roi)
    line = one_line_error(scan([tmp_path / "a.png"]), "a.roi", "finite numbers")
    assert "\x1b" not in line and "evil\\x1b[31mname\\nnext" in line  # escapes shown, not obeyed


def test_label_masks_that_are_jpeg_bytes_or_complex_values_are_refused(tmp_path):
    """Item 16: JPEG bytes named _masks.png and complex-valued TIFF masks were silently accepted."""
    import tifffile

    write_image(tmp_path / "a.png", (64, 64))
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 10:20] = 1
    Image.fromarray(labels).save(tmp_path / "a_masks.png", format="JPEG")
    one_line_error(scan([tmp_path]), "a_masks.png", "not a PNG or TIFF")
    (tmp_path / "a_masks.png").unlink()
    tifffile.imwrite(tmp_path / "a_masks.tif", labels.astype(np.complex64))
    one_line_error(scan([tmp_path]), "a_masks.tif", "complex64")


@pytest.mark.parametrize("problem", ["missing png", "huge", "not a number"])
def test_kaggle_rows_with_a_missing_png_or_an_impossible_size_are_one_line_errors(tmp_path, problem, capsys):
    """Item 7: a Kaggle CSV whose PNG is missing, or whose size is 100000², gave a traceback or ran out
    of memory in `cellseg evaluate --data`."""
    from cellseg.cli import main

    (tmp_path / "train").mkdir()
    size = {"huge": ("100000", "100000"), "not a number": ("x", "1")}.get(problem, ("64", "64"))
    if problem != "missing png":
        write_image(tmp_path / "train" / "a1.png", (64, 64))
    (tmp_path / "train.csv").write_text(f"id,annotation,width,height,cell_type\na1,1 5,{size[1]},{size[0]},astro\n")
    assert main(["evaluate", "--data", str(tmp_path), "--split", "all", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "train.csv" in error and "a1" in error, error


def test_empty_polygons_are_not_cells_and_coco_sizes_must_be_whole_numbers(tmp_path):
    """Item 7: an empty GeoJSON polygon was 'wholly outside the image (x 0..0)'; a COCO image height
    of "abc" gave "invalid literal for int()" without naming the file."""
    write_image(tmp_path / "a.png", (64, 64))
    square = [[[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]]
    features = [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": c}}
                for c in ([], square)]
    (tmp_path / "a.geojson").write_text(json.dumps(features))
    code, text, _ = scan([tmp_path])
    assert code == 0 and text.split() == ["1", "1"], text
    coco = tmp_path / "coco"
    coco.mkdir()
    path = coco_file(coco, [{"segmentation": [SQUARE]}],
                     images=[{"id": 1, "file_name": "a.png", "height": "abc", "width": 128}])
    one_line_error(scan([path]), str(path), "not a whole number")
