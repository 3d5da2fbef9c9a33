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


def test_batch_job_writes_everything_and_resumes(inputs, tmp_path, demo_images, served_model):
    out = tmp_path / "out"
    assert run(inputs, out) == 3  # some inputs failed
    names = sorted(p.stem for p in demo_images)
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == names
    errors = json.loads((out / "errors.json").read_text())
    assert [e["path"].endswith("broken.png") for e in errors] == [True]

    # label PNGs are 16-bit and equal local inference with the model the service runs by default
    from cellseg.imageio import read_image

    first = demo_images[0]
    labels = np.asarray(Image.open(out / "labels" / f"{first.stem}.png"))
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, served_model.segment([read_image(first)])[0].labels)
    assert json.loads((out / "job.json").read_text())["model_sha256"] == served_model.sha256

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


def test_rerun_with_other_settings_is_refused_unless_overwrite(inputs, tmp_path, capsys):
    """Issue 7.6: a re-run with --min-size 5000 into the same --out kept the old results."""
    out = tmp_path / "out"
    assert run(inputs, out) == 3
    before = json.loads((out / "records" / f"{sorted(p.stem for p in inputs.glob('*.png'))[0]}.json").read_text())
    job = json.loads((out / "job.json").read_text())
    assert len(job["model_sha256"]) == 64 and job["params"]["min_size"] > 0
    capsys.readouterr()
    assert run(inputs, out, "--min-size", "5000") == 2
    assert "other settings (params" in capsys.readouterr().err
    assert run(inputs, out, "--min-size", "5000", "--overwrite") == 3
    assert json.loads((out / "job.json").read_text())["params"]["min_size"] == 5000
    after = json.loads((out / "records" / f"{before['name']}.json").read_text())
    assert after["count"] < before["count"] and all(c["area"] >= 5000 for c in after["cells"])


def test_outputs_inside_the_input_folder_are_never_inputs(inputs):
    out = inputs / "results"
    assert run(inputs, out) == 3
    first = {p.name for p in (out / "labels").glob("*.png")}
    assert run(inputs, out) == 3  # second run: its own label PNGs are not new inputs
    assert {p.name for p in (out / "labels").glob("*.png")} == first
    assert all("results" not in e["path"] for e in json.loads((out / "errors.json").read_text()))


def test_unusable_out_and_unreachable_server_fail_fast_with_exit_2(inputs, tmp_path, capsys):
    """Issues 7.7 and 7.8: both were found late, with a traceback and exit 1."""
    import time

    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert run(inputs, blocker / "out") == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    start = time.monotonic()
    assert run(inputs, tmp_path / "remote", "--server", "http://127.0.0.1:1") == 2
    assert "cannot reach the cellseg service" in capsys.readouterr().err
    assert time.monotonic() - start < 15


def test_lab_formats_from_the_batch_job(inputs, tmp_path, demo_images):
    """ImageJ ROI sets and QuPath GeoJSON next to the label images; adding a format later redoes only that."""
    import io
    import zipfile

    out = tmp_path / "out"
    assert run(inputs, out) == 3
    assert not (out / "rois").exists()
    assert run(inputs, out, "--formats", "labels,csv,coco,rois,geojson") == 3
    for p in demo_images:
        labels = np.asarray(Image.open(out / "labels" / f"{p.stem}.png"))
        rois = zipfile.ZipFile(io.BytesIO((out / "rois" / f"{p.stem}.zip").read_bytes())).namelist()
        features = json.loads((out / "geojson" / f"{p.stem}.geojson").read_text())["features"]
        assert len(rois) == len(features) == labels.max()
        assert features[0]["properties"]["objectType"] == "detection"
    assert run(inputs, out, "--formats", "rois,nonsense") == 2


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """A full disk (ENOSPC at fsync) used to leave `.name.pid.tmp` files behind in every folder."""
    import errno
    import os

    from cellseg.batch import atomic_write

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "records" / "a.json", b"{}")
    assert list((tmp_path / "records").iterdir()) == []
