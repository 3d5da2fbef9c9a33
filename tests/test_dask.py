"""Batch jobs on a real Dask LocalCluster: same outputs as the local run, and a killed worker loses nothing."""

import csv
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cellseg.cli import main
from cellseg.onnx_model import sha256_file

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture
def inputs(tmp_path, demo_images):
    folder = tmp_path / "in"
    folder.mkdir()
    for copy in range(3):  # 12 images: enough for work to be in flight when a worker dies
        for p in demo_images:
            shutil.copy(p, folder / f"{p.stem}-{copy}{p.suffix}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder


def rows(out):
    with open(out / "cells.csv") as fh:
        return list(csv.DictReader(fh))


def test_dask_outputs_equal_the_local_run(inputs, tmp_path):
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert main(["segment", str(inputs), "--out", str(local), "--quiet"]) == 3
    assert main(["segment", str(inputs), "--out", str(dask), "--dask", "local:2", "--quiet"]) == 3
    names = sorted(p.name for p in (local / "labels").glob("*.png"))
    assert len(names) == 12 and names == sorted(p.name for p in (dask / "labels").glob("*.png"))
    for name in names:  # label images byte for byte
        assert (local / "labels" / name).read_bytes() == (dask / "labels" / name).read_bytes(), name
    assert rows(local) == rows(dask)  # the CSV row for row
    assert [e["path"].endswith("broken.png") for e in json.loads((dask / "errors.json").read_text())] == [True]
    assert json.loads((dask / "job.json").read_text()) == json.loads((local / "job.json").read_text())


def test_a_killed_worker_loses_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        codes = []
        job = threading.Thread(target=lambda: codes.append(
            main(["segment", str(inputs), "--out", str(out), "--dask", cluster.scheduler_address, "--quiet"])))
        job.start()
        deadline = time.time() + 120
        while not list((out / "labels").glob("*.png")) and time.time() < deadline:
            time.sleep(0.2)
        pids = client.run(os.getpid)
        os.kill(next(iter(pids.values())), signal.SIGKILL)  # mid-job: Dask re-runs its tasks elsewhere
        job.join(timeout=300)
    assert codes == [3]
    failed = json.loads((out / "errors.json").read_text())
    assert all(e["path"].endswith("broken.png") for e in failed), failed
    labels = sorted((out / "labels").glob("*.png"))
    assert len(labels) == 12 and all(Image.open(p).size == (704, 520) for p in labels)
    # nothing duplicated: one CSV block per image, and a re-run has nothing left to do
    assert len({r["image"] for r in rows(out)}) == 12
    assert main(["segment", str(inputs), "--out", str(out), "--quiet"]) == 3
    assert sorted((out / "labels").glob("*.png")) == labels


def test_bad_cluster_specs_are_usage_errors(inputs, tmp_path, capsys):
    assert main(["segment", str(inputs), "--out", str(tmp_path / "a"), "--dask", "local:0", "--quiet"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["segment", str(inputs), "--out", str(tmp_path / "b"), "--dask", "local",
                 "--server", "http://127.0.0.1:1", "--quiet"]) == 2


def test_a_given_pixel_size_reaches_the_workers_records(tmp_path, monkeypatch):
    """Issue 19: --pixel-size travels with each task; a worker's record carries it (no cluster needed)."""
    import cellseg.dask_backend
    from cellseg.batch import Item, Result
    from cellseg.pixelsize import parse_pixel_size

    def fake_segmenter(*args):
        def segment(image, path):
            labels = np.zeros(image.shape, np.int32)
            labels[4:14, 4:24] = 1
            return Result(labels, np.array([0.9], np.float32))
        return segment

    monkeypatch.setattr(cellseg.dask_backend, "_worker_segmenter", fake_segmenter)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    size = parse_pixel_size("0.5,0.25")
    _, outputs = cellseg.dask_backend._task(Item(image, "a"), "model.onnx", "0" * 64, {}, False, {"precision": "fp32"},
                                            ("geojson",), size)
    record = json.loads(outputs.record_json)
    assert record["pixel_size"] == {"x_um": 0.5, "y_um": 0.25, "source": "given (--pixel-size)"}
    assert record["cells"][0]["area_um2"] == 200 * 0.125


def test_a_time_lapse_on_dask_equals_the_local_run(tmp_path, demo_images):
    """One task per frame, each reading only its frame: the same files as a local run."""
    import tifffile

    from cellseg.imageio import decode_image

    stack = tmp_path / "well.tif"
    tifffile.imwrite(stack, np.stack([decode_image(p.read_bytes()) for p in demo_images[:3]]), imagej=True,
                     metadata={"axes": "TYX", "finterval": 600})
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert main(["segment", str(stack), "--out", str(local), "--quiet"]) == 0
    assert main(["segment", str(stack), "--out", str(dask), "--dask", "local:1", "--quiet"]) == 0
    names = sorted(p.name for p in (local / "labels").glob("*.png"))
    assert names == ["well_t0000.png", "well_t0001.png", "well_t0002.png"]
    for name in names:
        assert (local / "labels" / name).read_bytes() == (dask / "labels" / name).read_bytes(), name
    assert (local / "summary.csv").read_bytes() == (dask / "summary.csv").read_bytes()
    assert (dask / "plots" / "well_growth.png").is_file()


def test_local_workers_keep_glibcs_adaptive_allocator(monkeypatch):
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
    threshold: every image-sized array was mapped and page-faulted afresh (250 instead of 185 ms of
    CPU per LIVECell-size image). `--dask local` starts its workers without it."""
    from cellseg.dask_backend import connect

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    client, cluster = connect("local:1")
    try:
        environ = next(iter(client.run(lambda: dict(os.environ)).values()))
    finally:
        client.close()
        cluster.close()
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert environ.get("OMP_NUM_THREADS") == "1"  # Dask's other settings stay


def test_a_worker_whose_cpu_gets_other_cells_from_int8_refuses_its_images(tmp_path, model_path):
    """A cluster's machines may differ: where the job chose int8 automatically, each worker checks it
    on its own CPU, and one where int8 disagrees with fp32 refuses (the image lands in errors.json)
    rather than mixing results; a forced int8 is not second-guessed."""
    from test_precision import broken_int8

    from cellseg import dask_backend
    from cellseg.batch import Item

    shutil.copy(model_path, tmp_path / "m.onnx")
    int8 = broken_int8(model_path.with_suffix(".int8.onnx"), tmp_path / "m.int8.onnx")
    with pytest.raises(dask_backend.WorkerPrecisionError, match="on this worker .* int8 disagrees.*--precision fp32"):
        dask_backend.check_worker_precision(str(int8), {"precision": "int8", "requested": "auto"}, 1)
    dask_backend.check_worker_precision(str(int8), {"precision": "int8", "requested": "int8"}, 1)
    dask_backend.check_worker_precision(str(tmp_path / "m.onnx"), {"precision": "fp32", "requested": "auto"}, 1)

    class Worker:
        state = type("State", (), {"nthreads": 1})()

    import distributed

    original = distributed.get_worker
    distributed.get_worker = lambda: Worker
    try:
        item = Item(tmp_path / "a.png", "a")
        _, outcome = dask_backend._task(item, str(int8), sha256_file(int8), {}, False,
                                        {"precision": "int8", "requested": "auto"}, ("labels",))
    finally:
        distributed.get_worker = original
    assert isinstance(outcome, dask_backend.WorkerPrecisionError)
