"""The batch job on real demo images: every output, bad files reported, resume redoes only what is missing."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cellseg.cli import main

pytestmark = pytest.mark.data


@pytest.fixture
def inputs(tmp_path, demo_images):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in demo_images:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated PNG
    (folder / "notes.txt").write_text("not an image and not picked up from a folder")
    return folder


def run(inputs, out, *extra):
    return main(["segment", str(inputs), "--out", str(out), "--quiet", *extra])


def test_batch_job_writes_everything_and_resumes(inputs, tmp_path, demo_images, onnx_model):
    out = tmp_path / "out"
    assert run(inputs, out) == 3  # some inputs failed
    names = sorted(p.stem for p in demo_images)
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == names
    errors = json.loads((out / "errors.json").read_text())
    assert [e["path"].endswith("broken.png") for e in errors] == [True]

    # label PNGs are 16-bit and equal local inference
    from cellseg.imageio import read_image

    first = demo_images[0]
    labels = np.asarray(Image.open(out / "labels" / f"{first.stem}.png"))
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, onnx_model.segment([read_image(first)])[0].labels)

    rows = list(csv.DictReader(open(out / "cells.csv")))
    coco = json.loads((out / "instances.coco.json").read_text())
    assert len(rows) == len(coco["annotations"]) > 0
    assert {"perimeter", "eccentricity", "centroid_x", "bbox_width", "mean_intensity"} <= set(rows[0])
    assert len(coco["images"]) == len(names)

    # resume: delete one output; only that image is redone, nothing is lost or duplicated
    victim = out / "labels" / f"{names[1]}.png"
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert run(inputs, out) == 3
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert victim.name in after
    assert {k: v for k, v in after.items() if k != victim.name} == before
    assert len(list(csv.DictReader(open(out / "cells.csv")))) == len(rows)


def test_missing_input_is_reported_not_fatal(tmp_path, demo_images):
    out = tmp_path / "out"
    assert main(["segment", str(demo_images[0]), str(tmp_path / "nope*.tif"), "--out", str(out), "--quiet"]) == 3
    assert len(list((out / "labels").glob("*.png"))) == 1
