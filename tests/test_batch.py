"""The batch job on real demo images: every output, bad files reported, resume redoes only what is missing.
With a fake network on synthetic images: failed writes (a full disk) and formats added later."""

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import roifile
from PIL import Image

from cellseg.cli import main


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


@pytest.mark.data
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
    victim_bytes = victim.read_bytes()
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert run(inputs, out) == 3
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert victim.read_bytes() == victim_bytes  # remade from the image's record, exactly
    assert {k: v for k, v in after.items() if k != victim.name} == before
    assert len(list(csv.DictReader(open(out / "cells.csv")))) == len(rows)


@pytest.mark.data
def test_missing_input_is_reported_not_fatal(tmp_path, demo_images):
    out = tmp_path / "out"
    assert main(["segment", str(demo_images[0]), str(tmp_path / "nope*.tif"), "--out", str(out), "--quiet"]) == 3
    assert len(list((out / "labels").glob("*.png"))) == 1


@pytest.mark.data
def test_rerun_with_other_settings_is_refused_unless_overwrite(inputs, tmp_path, capsys):
    """Issue 7.6: a re-run with --min-size 5000 into the same --out kept the old results."""
    out = tmp_path / "out"
    assert run(inputs, out) == 3
    before = json.loads((out / "records" / f"{sorted(p.stem for p in inputs.glob('*.png'))[0]}.json").read_text())
    job = json.loads((out / "job.json").read_text())
    assert len(job["model_sha256"]) == 64 and job["params"]["min_size"] > 0
    capsys.readouterr()
    assert run(inputs, out, "--min-size", "5000") == 2
    error = capsys.readouterr().err
    # issue 25: only the setting that differs, not both whole settings
    assert f"other settings (params.min_size: {job['params']['min_size']} then, 5000 now)" in error, error
    assert "fg_threshold" not in error
    assert run(inputs, out, "--min-size", "5000", "--overwrite") == 3
    assert json.loads((out / "job.json").read_text())["params"]["min_size"] == 5000
    after = json.loads((out / "records" / f"{before['name']}.json").read_text())
    assert after["count"] < before["count"] and all(c["area"] >= 5000 for c in after["cells"])


@pytest.mark.data
def test_outputs_inside_the_input_folder_are_never_inputs(inputs):
    out = inputs / "results"
    assert run(inputs, out) == 3
    first = {p.name for p in (out / "labels").glob("*.png")}
    assert run(inputs, out) == 3  # second run: its own label PNGs are not new inputs
    assert {p.name for p in (out / "labels").glob("*.png")} == first
    assert all("results" not in e["path"] for e in json.loads((out / "errors.json").read_text()))


@pytest.mark.data
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


def test_a_linked_image_keeps_its_own_name_not_its_targets(tmp_path):
    """A user's trial: records named inputs by their resolved path. In a DataLad or git-annex dataset
    every image is a link to a content-addressed file (.git/annex/objects/.../SHA256E-s…--….png), so
    outputs and records were named after that key. The link's own path and name are kept, the hidden
    .git folder is not searched, and two links to one content (two blank frames) are two images; a
    folder and a link to it are one input."""
    dataset = tmp_path / "dataset"
    store = dataset / ".git" / "annex" / "objects" / "Xk" / "SHA256E-s4096--0123abcd.png"
    store.mkdir(parents=True)
    key = store / "SHA256E-s4096--0123abcd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)).save(key)
    (dataset / "well_A1.png").symlink_to(key)
    (dataset / "well_A2.png").symlink_to(key)  # the same content, another image
    (dataset / "._well_A1.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork: not an image
    out = tmp_path / "out"
    assert run(dataset, out) == 0
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["well_A1.png", "well_A2.png"]
    record = json.loads((out / "records" / "well_A1.json").read_text())
    assert record["source"] == str(dataset / "well_A1.png")
    (tmp_path / "linked").symlink_to(dataset)
    assert main(["segment", str(dataset), str(tmp_path / "linked"), "--out", str(tmp_path / "both"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "both" / "labels").iterdir()) == ["well_A1.png", "well_A2.png"]


def test_a_file_that_is_not_an_onnx_model_is_named_not_onnx_runtimes_status(tmp_path, capsys):
    """A user's trial: a .txt given as the model answered "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF"."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    model = tmp_path / "notes.onnx"
    model.write_text("not a model")
    assert run(image, tmp_path / "out", "--model", str(model)) == 2
    err = capsys.readouterr().err
    assert f"{model} is not an ONNX model ONNX Runtime can load" in err and "ONNXRuntimeError" not in err


def test_concurrency_without_server_is_refused_not_ignored(tmp_path, capsys):
    """A user's trial: `--concurrency 8` on a local job was silently ignored; it names --server now,
    before any image is read, and a concurrency below 1 is a usage error."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    assert run(image, tmp_path / "out", "--concurrency", "8") == 2
    assert "--concurrency sets the requests in flight to a --server" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        run(image, tmp_path / "out", "--server", "http://127.0.0.1:1", "--concurrency", "0")
    assert exit_info.value.code == 2
    assert "0 is out of range: give a value at least 1" in capsys.readouterr().err


@pytest.mark.data
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
    from cellseg.batch import atomic_write

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "records" / "a.json", b"{}")
    assert list((tmp_path / "records").iterdir()) == []


def test_a_file_written_in_parts_is_replaced_only_when_complete(tmp_path, monkeypatch):
    """AtomicFile: an error of the block (not the file's) leaves the old file and no temp file; a
    failed write comes out as OutputWriteError naming the output file."""
    from cellseg.batch import AtomicFile, OutputWriteError

    target = tmp_path / "cells.csv"
    target.write_bytes(b"old")
    with pytest.raises(KeyError), AtomicFile(target) as fh:
        fh.write(b"new, half")
        raise KeyError("a record without cells")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv"]

    with AtomicFile(target) as fh:
        fh.write(b"new, ")
        fh.write(b"whole")
    assert target.read_bytes() == b"new, whole"

    with pytest.raises(OutputWriteError) as stopped, AtomicFile(target) as fh:
        os.close(fh._fh.fileno())  # the next write fails as on a vanished disk
        fh.write(b"x" * 10_000_000)
    assert stopped.value.filename == str(target) and target.read_bytes() == b"new, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv"]


def test_local_sessions_per_core():
    from cellseg.batch import local_sessions

    cpu = ["CPUExecutionProvider"]
    assert local_sessions(1, cpu) == (1, 1)
    assert local_sessions(2, cpu) == (2, 1)  # this machine: two 1-thread sessions
    assert local_sessions(8, cpu) == (4, 2)  # at most MAX_LOCAL_SESSIONS, the cores shared among them
    assert local_sessions(8, ["CUDAExecutionProvider", *cpu]) == (1, 8)
    assert local_sessions(2, cpu, images=1) == (1, 2)  # one (large) image: every core in its session
    assert local_sessions(8, cpu, images=3) == (3, 2)


def test_backends_keep_only_a_few_images_ahead_of_the_writer():
    """Results come in input order, and while the writer is busy no more than one image beyond those
    in progress is started: the server backend used to hand every image to its threads at once, so
    a slow disk let finished images' outputs pile up in memory."""
    import threading
    import time

    from cellseg.batch import _in_order

    started = []
    lock = threading.Lock()

    def work(item):
        with lock:
            started.append(item)
        return item * 10

    results = _in_order(list(range(50)), work, threads=4)
    assert next(results) == 0
    time.sleep(0.2)  # the writer is slow
    assert len(started) <= 4 + 1
    assert list(results) == [i * 10 for i in range(1, 50)]


def test_each_network_call_holds_a_session_of_its_own():
    """Threads share the sessions: never two calls in one session at once, and every session used."""
    import threading
    import time

    from cellseg.batch import onnx_segmenter
    from cellseg.postprocess import PostprocessParams

    busy, used, overlaps = set(), set(), []
    lock = threading.Lock()

    class Session:
        def predict(self, batch):
            with lock:
                overlaps.append(id(self) in busy)
                busy.add(id(self))
                used.add(id(self))
            time.sleep(0.02)
            with lock:
                busy.discard(id(self))
            out = np.zeros((batch.shape[0], 3, *batch.shape[2:]), np.float32)
            out[:, 0, 8:24, 8:24] = out[:, 2, 8:24, 8:24] = 1  # one square cell
            return out

    segment = onnx_segmenter([Session(), Session()], PostprocessParams(), tta=False)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    threads = [threading.Thread(target=segment, args=(image, None)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 6 and not any(overlaps) and len(used) == 2


def synthetic_record(index: int, cells: int = 40, size: int = 256) -> dict:
    """A record as image_record makes it, of `cells` square cells (a frame of stack "s" for odd index)."""
    from cellseg.outputs import image_record
    from cellseg.pixelsize import PixelSize

    labels = np.zeros((size, size), np.int32)
    for cell in range(cells):
        y, x = divmod(cell, 16)
        labels[y * 16 + 1 : y * 16 + 12, x * 16 + 2 : x * 16 + 2 + 4 + (index + cell) % 9] = cell + 1
    frame = {"stack": "s", "frame": index, "time_s": None} if index % 2 else {}
    size_um = PixelSize(0.5, 0.5, "given") if index % 3 == 0 else None
    return image_record(labels.astype(np.float32), labels, np.linspace(0.5, 1, cells), f"im{index}",
                        f"/data/im{index}.tif", pixel_size=size_um) | frame


def test_aggregates_are_streamed_and_equal_the_documents_made_at_once(tmp_path):
    """cells.csv and the COCO file written a record at a time equal those made from the whole list,
    and a generator of records is read once: records are never all in memory together."""
    from cellseg.batch import write_aggregates
    from cellseg.outputs import cells_csv, coco_document
    from cellseg.summary import summary_csv, summary_row

    records = [synthetic_record(i) for i in range(6)] + [synthetic_record(6, cells=0)]
    rows = write_aggregates(tmp_path, iter(records), ("csv", "coco"))
    assert (tmp_path / "cells.csv").read_bytes() == cells_csv(records)
    assert json.loads((tmp_path / "instances.coco.json").read_text()) == coco_document(
        records, [f"labels/{r['name']}.png" for r in records])
    assert (tmp_path / "summary.csv").read_bytes() == summary_csv(map(summary_row, records))
    assert rows == [summary_row(r) for r in records]


def test_aggregates_of_a_long_job_take_the_memory_of_one_record(tmp_path):
    """A 38,400-image experiment's records took ~0.4 MB each as Python objects, 14 GB together, when
    the job loaded them all to write its tables."""
    import tracemalloc

    from cellseg.batch import write_aggregates

    one = synthetic_record(0, cells=200, size=512)
    encoded = json.dumps(one)
    tracemalloc.start()
    try:
        write_aggregates(tmp_path, (json.loads(encoded) | {"name": f"im{i}"} for i in range(150)), ("csv", "coco"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held_all = 150 * len(encoded)  # a lower bound of what the records take when all are loaded
    assert peak < held_all / 5, (peak, held_all)
    assert len(json.loads((tmp_path / "instances.coco.json").read_text())["annotations"]) == 150 * 200


# Jobs with a fake network (synthetic images, square cells, no model run): write failures and formats.

def fake_labels(shape: tuple[int, ...]) -> np.ndarray:
    """Three rectangular cells, whatever the image: what a network might find, in no time."""
    labels = np.zeros(shape[:2], dtype=np.int32)
    labels[2:12, 3:15] = 1
    labels[20:40, 30:52] = 2
    labels[45:60, 5:25] = 3
    return labels


@pytest.fixture
def network_calls(monkeypatch) -> list:
    """The local backend with the fake network in place of the model; the list collects one path per call."""
    import cellseg.batch
    import cellseg.onnx_model

    calls = []

    def fake_onnx_segmenter(model, params, tta):
        def segment(image, path):
            calls.append(path)
            labels = fake_labels(image.shape)
            return cellseg.batch.Result(labels, np.linspace(0.9, 0.7, labels.max()).astype(np.float32))
        return segment

    monkeypatch.setattr(cellseg.batch, "onnx_segmenter", fake_onnx_segmenter)
    monkeypatch.setattr(cellseg.onnx_model, "OnnxModel", lambda *args, **kwargs: None)
    return calls


@pytest.fixture
def small_inputs(tmp_path) -> Path:
    """Eight small synthetic 8-bit images."""
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


class FullDisk:
    """Writes fail at fsync, as on a full file system, once the files fsynced so far hold more than
    `free` bytes, or for every file whose name contains `failing_name`. The error is `error` (an errno)."""

    def __init__(self, monkeypatch, free: int | None = None, failing_name: str | None = None,
                 error: int = errno.ENOSPC):
        self.free, self.failing_name, self.error, self.used = free, failing_name, error, 0
        self.real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        self.used += os.fstat(fd).st_size
        if (self.free is not None and self.used > self.free) or (self.failing_name and self.failing_name in name):
            raise OSError(self.error, os.strerror(self.error))
        self.real_fsync(fd)


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_stops_the_job_cleanly_and_the_same_command_resumes(small_inputs, tmp_path, network_calls,
                                                                        monkeypatch, capsys):
    """Issue 18.8: a full disk failed every later image one by one, then ended in a traceback (exit 1)."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        FullDisk(patch, free=6_000)  # job.json and the first image or two fit
        assert run(small_inputs, out) == 4
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and str(out) in err
    assert "run the same command again to resume" in err
    assert "Traceback" not in err
    assert temp_files(out) == []
    done = sorted(p.stem for p in (out / "records").glob("*.json"))
    assert 0 < len(done) < 8
    assert len(network_calls) <= len(done) + 4  # stopped: no image started after the failure but those in flight
    for name in done:  # what was finished is whole and kept
        assert json.loads((out / "records" / f"{name}.json").read_text())["count"] == 3
        assert Image.open(out / "labels" / f"{name}.png").size == (80, 64)
    assert "errors.json" in err  # the disk stays full: said that it could not be written either

    network_calls.clear()
    assert run(small_inputs, out) == 0  # space again: the same command finishes the job
    assert len(network_calls) == 8 - len(done)
    assert len(list((out / "records").glob("*.json"))) == 8
    assert len(list(csv.DictReader(open(out / "cells.csv")))) == 8 * 3
    assert json.loads((out / "errors.json").read_text()) == []
    assert temp_files(out) == []


@pytest.mark.parametrize("error, advice", [(errno.ENOSPC, "free space"), (errno.EROFS, "writable")])
def test_a_failed_aggregate_write_is_reported_not_a_traceback(small_inputs, tmp_path, network_calls, monkeypatch,
                                                              capsys, error, advice):
    """Issue 18.8: the traceback came from write_aggregates. Every image is done: the re-run only rebuilds cells.csv."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        FullDisk(patch, failing_name="cells.csv", error=error)
        assert run(small_inputs, out) == 4
    err = capsys.readouterr().err
    assert f"{os.strerror(error).lower()} writing {out / 'cells.csv'}" in err and advice in err
    assert temp_files(out) == [] and not (out / "cells.csv").exists()
    assert json.loads((out / "errors.json").read_text()) == []  # best effort: here it could be written
    assert "errors.json lists the inputs that failed" in err
    network_calls.clear()
    assert run(small_inputs, out) == 0
    assert network_calls == []
    assert len(list(csv.DictReader(open(out / "cells.csv")))) == 8 * 3


def test_a_format_asked_for_later_comes_from_the_records_without_the_network(small_inputs, tmp_path, network_calls,
                                                                            capsys):
    """Issue 19.4: asking for a format later re-segmented every image ("4 segmented, 0 already done")."""
    import io
    import zipfile

    out = tmp_path / "out"
    assert run(small_inputs, out, "--formats", "labels,csv") == 0
    assert len(network_calls) == 8
    capsys.readouterr()
    assert run(small_inputs, out, "--formats", "labels,csv,rois") == 0
    assert len(network_calls) == 8  # not one more
    assert "0 segmented, 8 done before and given the missing formats" in capsys.readouterr().out
    for image in small_inputs.glob("*.png"):
        rois = zipfile.ZipFile(io.BytesIO((out / "rois" / f"{image.stem}.zip").read_bytes())).namelist()
        assert rois == ["cell-00001.roi", "cell-00002.roi", "cell-00003.roi"]

    # no label images the first time: the records alone give them, exactly, and the GeoJSON
    csv_only = tmp_path / "csv-only"
    assert run(small_inputs, csv_only, "--formats", "csv") == 0
    network_calls.clear()
    assert run(small_inputs, csv_only, "--formats", "csv,labels,geojson") == 0
    assert network_calls == []
    for image in small_inputs.glob("*.png"):
        labels = np.asarray(Image.open(csv_only / "labels" / f"{image.stem}.png"))
        np.testing.assert_array_equal(labels, fake_labels((64, 80)))
        assert len(json.loads((csv_only / "geojson" / f"{image.stem}.geojson").read_text())["features"]) == 3


def test_annotation_masks_beside_their_images_are_not_segmented(tmp_path, network_calls, capsys):
    """A folder laid out for fine-tuning (X.png + X_masks.png, README) gave "4 segmented" for 2 images:
    each mask was segmented as a micrograph, with rois/X_masks.zip and a summary.csv row of its own."""
    folder = tmp_path / "astro"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(folder / f"{name}.png")
        Image.fromarray(fake_labels((64, 80)).astype(np.uint16)).save(folder / f"{name}_masks.png")
    line = "2 segmented, 0 already done (skipped), 0 failed, 2 annotation masks (X_masks.*) not segmented; outputs in"
    for i, given in enumerate([folder, folder / "*.png"]):  # a folder, and a glob cellseg expands
        out = tmp_path / f"seg{i}"
        network_calls.clear()
        capsys.readouterr()
        assert run(given, out, "--formats", "labels,rois,geojson") == 0
        assert sorted(p.name for p in network_calls) == ["a.png", "b.png"]
        assert sorted(p.name for p in (out / "rois").iterdir()) == ["a.zip", "b.zip"]
        assert [row["image"] for row in csv.DictReader(open(out / "summary.csv"))] == ["a", "b"]
        assert line in capsys.readouterr().out

    # Named as files: a mask named with its image (as a shell's astro/*.png names both) is left out too;
    # a mask named on its own is what the user asked to segment.
    network_calls.clear()
    assert main(["segment", str(folder / "a.png"), str(folder / "a_masks.png"), "--out", str(tmp_path / "named"),
                 "--quiet"]) == 0
    assert [p.name for p in network_calls] == ["a.png"]
    assert "1 segmented, 0 already done (skipped), 0 failed, 1 annotation mask (X_masks.*) not segmented" in \
        capsys.readouterr().out
    network_calls.clear()
    assert main(["segment", str(folder / "b_masks.png"), "--out", str(tmp_path / "alone"), "--quiet"]) == 0
    assert [p.name for p in network_calls] == ["b_masks.png"]
    assert "not segmented" not in capsys.readouterr().out


def test_the_tables_keep_the_images_an_earlier_command_segmented_here(small_inputs, tmp_path, network_calls, capsys):
    """A user's trial: segmenting one more image (or a mistyped glob) into a finished folder rebuilt
    cells.csv, summary.csv and the COCO file from that command's inputs alone: 2064 cell rows fell to
    170, while every record stayed on disk. The tables cover the folder: nothing done there is lost."""
    out = tmp_path / "seg"
    assert run(small_inputs, out) == 0
    cells = list(csv.DictReader(open(out / "cells.csv")))
    images = [row["image"] for row in csv.DictReader(open(out / "summary.csv"))]
    annotations = len(json.loads((out / "instances.coco.json").read_text())["annotations"])
    assert len(images) == 8 and len(cells) > 8

    extra = tmp_path / "more"
    extra.mkdir()
    Image.fromarray(np.full((64, 80), 90, np.uint8)).save(extra / "late.png")
    capsys.readouterr()
    assert run(extra / "late.png", out) == 0  # one more image, the same settings
    assert "the tables also keep 8 images segmented here before" in capsys.readouterr().out
    assert sorted(row["image"] for row in csv.DictReader(open(out / "summary.csv"))) == sorted(images + ["late"])
    assert len(list(csv.DictReader(open(out / "cells.csv")))) > len(cells)
    coco = json.loads((out / "instances.coco.json").read_text())
    assert len(coco["images"]) == 9 and len(coco["annotations"]) > annotations

    assert run(tmp_path / "mistyped*.png", out) == 3  # matches nothing: the tables stay whole
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 9


def test_a_folder_without_images_is_reported_like_a_glob_that_matches_nothing(tmp_path, network_calls, capsys):
    """A user's trial: an empty folder, or one of .bmp files only, gave "0 segmented, 0 already done
    (skipped), 0 failed" and exit 0, as if the job had done its work."""
    empty, bmps, masks = tmp_path / "empty", tmp_path / "bmps", tmp_path / "masks"
    for folder in (empty, bmps, masks):
        folder.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(bmps / "a.bmp")
    Image.fromarray(fake_labels((64, 80)).astype(np.uint16)).save(masks / "a_masks.png")
    for folder, says in ((empty, "no image files in this folder"), (bmps, "no image files in this folder"),
                         (masks, "1 annotation masks (X_masks.*) left out")):
        out = tmp_path / f"seg-{folder.name}"
        assert run(folder, out) == 3
        errors = json.loads((out / "errors.json").read_text())
        assert [e["path"] for e in errors] == [str(folder)] and says in errors[0]["error"]
    assert network_calls == []


def test_ctrl_c_says_how_to_resume_and_the_same_command_does(small_inputs, tmp_path, network_calls, monkeypatch,
                                                             capsys):
    """A user's trial: Ctrl-C ended a job with a KeyboardInterrupt traceback and no word on resuming."""
    import cellseg.batch

    write = cellseg.batch.write_image_outputs
    written = []

    def interrupted_at_the_third(out, name, outputs):
        if len(written) == 2:
            raise KeyboardInterrupt
        write(out, name, outputs)
        written.append(name)

    monkeypatch.setattr(cellseg.batch, "write_image_outputs", interrupted_at_the_third)
    out = tmp_path / "seg"
    assert run(small_inputs, out) == 130
    error = capsys.readouterr().err
    assert "interrupted; the images finished so far are kept" in error and "Traceback" not in error
    assert sorted(p.stem for p in (out / "records").iterdir()) == sorted(written)
    monkeypatch.setattr(cellseg.batch, "write_image_outputs", write)
    assert run(small_inputs, out) == 0
    assert "6 segmented, 2 already done (skipped), 0 failed; outputs in" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 8


class FakeService:
    """A cellseg.client.Client whose service is not there: `segment` answers fake_labels and, as the
    real service does, the model and every parameter it used (its defaults with what was sent)."""

    defaults = {"fg_threshold": 0.5, "seed_threshold": 0.4, "min_size": 20}

    def __init__(self, url: str, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        pass

    def segment(self, image, fg_threshold=None, seed_threshold=None, min_size=None, tta=None):
        from cellseg.client import SegmentResult
        from cellseg.imageio import read_image
        from cellseg.instances import instances_from_labels

        height, width = (image if isinstance(image, np.ndarray) else read_image(image)).shape[:2]
        labels = fake_labels((height, width))
        sent = {"fg_threshold": fg_threshold, "seed_threshold": seed_threshold, "min_size": min_size}
        params = {**self.defaults, **{k: v for k, v in sent.items() if v is not None}, "tta": bool(tta)}
        cells = instances_from_labels(labels, np.full(labels.max(), 0.8))
        return SegmentResult.from_json({"width": width, "height": height, "count": len(cells), "confluence": 10.0,
                                        "cells": cells, "model": {"name": "fake", "sha256": "f" * 64},
                                        "params": params})


class DyingService(FakeService):
    """A service that stops answering after `answers` calls (the job's first call asks its settings)."""

    answers = 3
    calls = 0

    def segment(self, image, **params):
        from cellseg.client import ServiceUnreachable

        type(self).calls += 1
        if type(self).calls > self.answers:
            raise ServiceUnreachable("segment: the connection to the service failed (ConnectError: [Errno 111] "
                                     "Connection refused)")
        return super().segment(image, **params)


def test_a_service_that_dies_mid_job_stops_the_job_and_the_same_command_resumes(small_inputs, tmp_path,
                                                                               monkeypatch, capsys):
    """A user's trial: killing the server mid-job failed every image left, each as a bad input
    (20 'connection refused' lines in errors.json, exit 3: 'bad or missing files')."""
    import cellseg.client

    monkeypatch.setattr(cellseg.client, "Client", DyingService)
    DyingService.calls = 0
    out, url = tmp_path / "out", "http://cellseg.example:3000/"
    assert run(small_inputs, out, "--server", url, "--concurrency", "1") == 4
    error = capsys.readouterr().err
    assert "the service stopped answering" in error and "run the same command again to resume" in error
    assert json.loads((out / "errors.json").read_text()) == []  # no image is blamed for it
    done = len(list((out / "records").iterdir()))
    assert done == DyingService.answers - 1 and DyingService.calls <= DyingService.answers + 2  # stopped at once
    monkeypatch.setattr(cellseg.client, "Client", FakeService)
    assert run(small_inputs, out, "--server", url) == 0
    assert f"{8 - done} segmented, {done} already done (skipped), 0 failed" in capsys.readouterr().out


def test_the_client_says_when_nothing_answers_at_the_address():
    """ServiceUnreachable (what stops a batch job) for a refused connection, whether the service was
    never there or went away after the client connected; other failures stay CellsegError."""
    import http.server
    import threading

    from cellseg.client import Client, ServiceUnreachable

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client(f"http://127.0.0.1:{port}")  # it answers /readyz
    server.shutdown()
    server.server_close()  # then it goes away
    with pytest.raises(ServiceUnreachable, match="segment: the connection to the service failed .ConnectError"):
        client.segment(np.zeros((32, 32), np.uint8))
    client.close()
    with pytest.raises(ServiceUnreachable, match="cannot reach the cellseg service"):
        Client(f"http://127.0.0.1:{port}")


def test_a_server_job_records_the_parameters_the_server_used(small_inputs, tmp_path, monkeypatch, capsys):
    """Issue 19.4: job.json of a --server job held {"params": {}, "server": ...}: no parameters, no tta."""
    import cellseg.client

    monkeypatch.setattr(cellseg.client, "Client", FakeService)
    out, url = tmp_path / "out", "http://cellseg.example:3000/"
    assert run(small_inputs, out, "--server", url, "--tta", "--min-size", "30") == 0
    assert json.loads((out / "job.json").read_text()) == {
        "server": "http://cellseg.example:3000", "model_sha256": "f" * 64, "tta": True,
        "params": {"fg_threshold": 0.5, "seed_threshold": 0.4, "min_size": 30}, "pixel_size": None}
    assert run(small_inputs, out, "--server", url, "--tta", "--min-size", "30") == 0  # the same job: resumes
    capsys.readouterr()
    assert run(small_inputs, out, "--server", url, "--tta") == 2  # the server's min_size, 20, is another setting
    assert "other settings (params" in capsys.readouterr().err


def test_an_unwritable_out_stops_before_any_image(small_inputs, tmp_path, network_calls, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        FullDisk(patch, failing_name="job.json", error=errno.EACCES)
        assert run(small_inputs, out) == 4
    err = capsys.readouterr().err
    assert f"permission denied writing {out / 'job.json'}: make the output folder writable" in err
    assert network_calls == [] and temp_files(out) == []


def test_a_real_file_size_limit_in_a_subprocess(small_inputs, tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG, no root needed), in a separate process
    with the fake network: every per-image file fits the limit, the aggregate CSV does not."""
    import resource
    import signal
    import subprocess
    import sys

    for image in list(small_inputs.glob("*.png")):  # 16 images: the CSV is well over the size of a record
        shutil.copy(image, small_inputs / f"copy-{image.name}")
    out = tmp_path / "out"
    child = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_batch, cellseg.batch, cellseg.onnx_model
from cellseg.cli import main

def fake_onnx_segmenter(model, params, tta):
    return lambda image, path: cellseg.batch.Result(test_batch.fake_labels(image.shape), None)

cellseg.batch.onnx_segmenter = fake_onnx_segmenter
cellseg.onnx_model.OnnxModel = lambda *args, **kwargs: None
sys.exit(main(["segment", {str(small_inputs)!r}, "--out", {str(out)!r}, "--quiet", "--formats", "labels,csv",
               "--no-cell-rules"]))
"""  # --no-cell-rules: the fake network uses none, and their coefficients would make job.json outgrow the limit
    limit = 2_500  # bytes per file: a record is 1.6 kB, the CSV of 16 images 4 kB

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", child], preexec_fn=limit_file_size, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert f"writing {out / 'cells.csv'}" in done.stderr and "Traceback" not in done.stderr
    assert max(p.stat().st_size for p in (out / "records").glob("*.json")) < limit
    assert len(list((out / "records").glob("*.json"))) == 16
    assert temp_files(out) == [] and not (out / "cells.csv").exists()


@pytest.fixture
def calibrated_inputs(tmp_path) -> Path:
    """Two ImageJ TIFFs at 0.65 µm per pixel and one PNG without a pixel size."""
    import tifffile

    folder = tmp_path / "calibrated"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 255, (64, 80), dtype=np.uint8), imagej=True,
                         resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "micron"})
    Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(folder / "c.png")
    return folder


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))}


def test_pixel_sizes_from_metadata_and_given_reach_the_csv_records_and_job(calibrated_inputs, tmp_path, network_calls,
                                                                          capsys):
    """Issue 19: areas in µm². Without --pixel-size each image's metadata gives its size; --pixel-size
    overrides it for every image and is a setting of the job, like the model's parameters."""
    out = tmp_path / "out"
    assert run(calibrated_inputs, out, "--formats", "csv,geojson") == 0
    assert json.loads((out / "job.json").read_text())["pixel_size"] is None
    found = records(out)
    assert found["a"]["pixel_size"] == {"x_um": 0.65, "y_um": 0.65, "source": "ImageJ metadata"}
    assert found["c"]["pixel_size"] is None and "area_um2" not in found["c"]["cells"][0]
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert {r["image"]: (r["area_um2"] != "") for r in rows} == {"a": True, "b": True, "c": False}
    for row in rows:
        assert list(row)[:len(CSV_PIXEL_COLUMNS)] == CSV_PIXEL_COLUMNS  # the pixel columns as before
        if row["image"] != "c":
            assert float(row["area_um2"]) == pytest.approx(int(row["area"]) * 0.65**2, rel=1e-5)
            assert float(row["perimeter_um"]) == pytest.approx(float(row["perimeter"]) * 0.65, rel=1e-5)
            assert row["pixel_size_x_um"] == row["pixel_size_y_um"] == "0.65"
    measurements = json.loads((out / "geojson" / "a.geojson").read_text())["features"][0]["properties"]["measurements"]
    assert measurements["area_um2"] == pytest.approx(measurements["area"] * 0.65**2, rel=1e-5)

    # another size is another setting: refused, as any other change, until --overwrite
    capsys.readouterr()
    assert run(calibrated_inputs, out, "--formats", "csv,geojson", "--pixel-size", "0.5,0.25") == 2
    assert "other settings (pixel_size" in capsys.readouterr().err
    assert run(calibrated_inputs, out, "--formats", "csv,geojson", "--pixel-size", "0.5,0.25", "--overwrite") == 0
    assert json.loads((out / "job.json").read_text())["pixel_size"] == {
        "x_um": 0.5, "y_um": 0.25, "source": "given (--pixel-size)"}
    assert {r["pixel_size"]["source"] for r in records(out).values()} == {"given (--pixel-size)"}
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert all(float(r["area_um2"]) == pytest.approx(int(r["area"]) * 0.5 * 0.25) for r in rows)
    network_calls.clear()
    assert run(calibrated_inputs, out, "--formats", "csv,geojson", "--pixel-size", "0.5,0.25") == 0  # same: resumes
    assert network_calls == []


CSV_PIXEL_COLUMNS = ["image", "cell_id", "area", "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_width",
                     "bbox_height", "perimeter", "eccentricity", "major_axis_length", "minor_axis_length", "solidity",
                     "orientation", "mean_intensity", "score"]


def test_a_job_of_an_earlier_version_resumes_and_a_bad_pixel_size_is_a_usage_error(small_inputs, tmp_path,
                                                                                   network_calls, capsys):
    out = tmp_path / "out"
    assert run(small_inputs, out) == 0
    job = json.loads((out / "job.json").read_text())
    del job["pixel_size"]  # written before pixel sizes existed: it read none, as a job without --pixel-size
    (out / "job.json").write_text(json.dumps(job))
    network_calls.clear()
    assert run(small_inputs, out) == 0 and network_calls == []
    for bad in ("0", "-1", "abc", "1,2,3", "nan"):
        with pytest.raises(SystemExit) as exit_:
            run(small_inputs, out, "--pixel-size", bad)
        assert exit_.value.code == 2
        assert "argument --pixel-size: pixel" in capsys.readouterr().err


# Time-lapse stacks (issue 19): frames are images of their own; summary.csv and growth plots.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_stack(path: Path, frames: int = 5, **kwargs) -> Path:
    """A synthetic 16-bit time-lapse, 64x80 per frame, each frame a different brightness."""
    import tifffile

    tifffile.imwrite(path, np.stack([np.full((64, 80), 100 * (i + 1), np.uint16) for i in range(frames)]), **kwargs)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_stack_is_segmented_frame_by_frame_and_resumes_mid_stack(small_inputs, tmp_path, network_calls):
    """Issue 19: a multi-page TIFF was refused. Now each frame is an image named <stem>_t0003 with every
    output of its own; summary.csv has a row per image and frame, and the stack a growth plot."""
    write_stack(small_inputs / "well.tif", frames=5, imagej=True, metadata={"axes": "TYX", "finterval": 1800})
    out = tmp_path / "out"
    assert run(small_inputs, out, "--formats", "labels,csv,coco,rois") == 0
    frames = [f"well_t{i:04d}" for i in range(5)]
    for page, name in enumerate(frames):
        assert Image.open(out / "labels" / f"{name}.png").size == (80, 64)
        rois = roifile.roiread(out / "rois" / f"{name}.zip")  # on its frame in Fiji, names unique in the stack
        assert {roi.position for roi in rois} == {page + 1} and rois[0].name == f"t{page:04d}-cell-00001"
    record = json.loads((out / "records" / "well_t0003.json").read_text())
    assert (record["stack"], record["frame"], record["time_s"], record["count"]) == ("well", 3, 5400.0, 3)
    assert record["source"].endswith("well.tif")
    assert {row["image"] for row in read_csv(out / "cells.csv")} == {f"img{i}" for i in range(8)} | set(frames)
    coco = json.loads((out / "instances.coco.json").read_text())
    assert [image.get("frame") for image in coco["images"] if image["file_name"] == "well.tif"] == [0, 1, 2, 3, 4]

    summary = read_csv(out / "summary.csv")
    assert list(summary[0]) == ["image", "frame", "time_s", "count", "confluence_pct", "median_area_px",
                                "median_area_um2", "plate", "well", "field", "time_h"]
    singles = [row for row in summary if row["frame"] == ""]
    stack = [row for row in summary if row["image"] == "well"]
    assert len(singles) == 8 and len(summary) == 8 + 5
    assert [row["frame"] for row in stack] == ["0", "1", "2", "3", "4"]
    assert [float(row["time_s"]) for row in stack] == [0, 1800, 3600, 5400, 7200]
    # fake_labels: cells of 120, 440 and 300 px in a 64x80 image
    assert stack[0]["count"] == "3" and float(stack[0]["median_area_px"]) == 300
    assert float(stack[0]["confluence_pct"]) == pytest.approx(100 * 860 / (64 * 80), abs=1e-3)
    assert stack[0]["median_area_um2"] == "" and singles[0]["time_s"] == ""  # no pixel size, no interval: empty
    plot = (out / "plots" / "well_growth.png").read_bytes()
    assert plot.startswith(PNG_SIGNATURE) and Image.open(out / "plots" / "well_growth.png").size[0] >= 600
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["well_growth.png"]  # plots for stacks only

    # a killed job: frame 2's record is gone, so only frame 2 is segmented again
    (out / "records" / "well_t0002.json").unlink()
    network_calls.clear()
    assert run(small_inputs, out, "--formats", "labels,csv,coco,rois") == 0
    assert len(network_calls) == 1 and isinstance(network_calls[0], np.ndarray)  # a frame's own pixels
    assert network_calls[0].dtype == np.uint16 and network_calls[0].max() == 300  # frame 2: 3 x 100
    assert read_csv(out / "summary.csv") == summary
    network_calls.clear()
    assert run(small_inputs, out, "--formats", "labels,csv,coco,rois") == 0  # all done: nothing to segment
    assert network_calls == []
    # a record from before records said `page`: its ROI set, made again from it, still sits on its frame
    record_file = out / "records" / "well_t0003.json"
    record_file.write_text(json.dumps({k: v for k, v in json.loads(record_file.read_text()).items() if k != "page"}))
    (out / "rois" / "well_t0003.zip").unlink()
    assert run(small_inputs, out, "--formats", "labels,csv,coco,rois") == 0 and network_calls == []
    assert {roi.position for roi in roifile.roiread(out / "rois" / "well_t0003.zip")} == {4}


def test_job_json_is_the_same_with_stacks(small_inputs, tmp_path, network_calls):
    """Stacks change what is segmented, not the settings: a folder of stacks resumes like any other."""
    plain = tmp_path / "plain"
    assert run(small_inputs, plain) == 0
    write_stack(small_inputs / "well.tif")
    with_stack = tmp_path / "with-stack"
    assert run(small_inputs, with_stack) == 0
    assert json.loads((with_stack / "job.json").read_text()) == json.loads((plain / "job.json").read_text())
    assert run(small_inputs, plain) == 0  # a stack added to the inputs of a finished job: only it is done
    assert len(list((plain / "records").glob("well_t*.json"))) == 5


def test_stacks_that_are_not_time_lapses_are_reported_once(small_inputs, tmp_path, network_calls, capsys):
    write_stack(small_inputs / "zstack.tif", frames=4, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    assert run(small_inputs, out) == 3
    errors = json.loads((out / "errors.json").read_text())
    assert len(errors) == 1 and errors[0]["path"].endswith("zstack.tif")
    assert "ImageJ stack of 4 Z-slices: cellseg takes time-lapse stacks" in errors[0]["error"]
    assert "zstack.tif: ImageJ stack of 4 Z-slices" in capsys.readouterr().err
    assert len(network_calls) == 8 and not (out / "plots").exists()


def test_output_names_of_stacks_never_collide_with_other_inputs(tmp_path):
    from cellseg.batch import frame_name, output_names

    assert frame_name("well", 3, 24) == "well_t0003" and frame_name("well", 12345, 20000) == "well_t12345"
    stack, clash, other = tmp_path / "a" / "well.tif", tmp_path / "b" / "well_t0001.png", tmp_path / "c.png"
    names = output_names([stack, clash, other], {stack: 3})
    assert names[other] == "c"
    assert names[stack].startswith("well-") and names[clash].startswith("well_t0001-")  # a path hash each
    assert output_names([stack, other], {stack: 3}) == {stack: "well", other: "c"}


def test_summary_csv_gives_um2_from_the_records_pixel_size():
    """The pixel size comes from the record (`pixel_size`, set where a file states it): the median cell
    area in µm² is written where it is known, and left empty elsewhere."""
    from cellseg.summary import SUMMARY_FIELDS, summary_csv, summary_row

    cells = [{"area": a} for a in (100, 300, 200, 400)]
    records = [
        {"name": "a", "count": 4, "confluence": 12.5, "cells": cells,
         "pixel_size": {"x_um": 0.5, "y_um": 0.25, "source": "tiff"}},
        {"name": "well_t0001", "stack": "well", "frame": 1, "time_s": 0.0, "count": 0, "confluence": 0.0, "cells": [],
         "pixel_size": {"x_um": 0.5, "y_um": 0.5, "source": "tiff"}},
        {"name": "b", "count": 4, "confluence": 3.0, "cells": cells, "pixel_size": None},
    ]
    rows = list(csv.DictReader(summary_csv(map(summary_row, records)).decode().splitlines()))
    assert list(rows[0]) == SUMMARY_FIELDS
    unplaced = {"plate": "", "well": "", "field": ""}  # no well in these names
    assert rows[0] == {"image": "a", "frame": "", "time_s": "", "count": "4", "confluence_pct": "12.5",
                       "median_area_px": "250.0", "median_area_um2": "31.25", "time_h": ""} | unplaced
    assert rows[1] == {"image": "well", "frame": "1", "time_s": "0.0", "count": "0", "confluence_pct": "0.0",
                       "median_area_px": "", "median_area_um2": "", "time_h": "0.0"} | unplaced  # no cells: no median
    assert rows[2]["median_area_um2"] == "" and rows[2]["median_area_px"] == "250.0"


@pytest.mark.parametrize("kind", ["imagej", "ome"])
def test_frames_of_a_calibrated_stack_carry_its_pixel_size(kind, tmp_path, network_calls):
    """Units and stacks together: every frame's record has the stack's pixel size, read from the
    stack's own metadata (ImageJ resolution + unit, OME PhysicalSizeX/Y), so cells.csv has µm columns
    and summary.csv's median_area_um2 is median_area_px x x_um x y_um; --pixel-size overrides it
    for every frame."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    if kind == "imagej":  # pixels 0.5 µm wide and 0.25 µm tall: x and y must not be mixed up
        write_stack(inputs / "well.tif", frames=3, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                    metadata={"axes": "TYX", "unit": "micron", "finterval": 600})
        source = "ImageJ metadata"
    else:
        write_stack(inputs / "well.tif", frames=3, ome=True,
                    metadata={"axes": "TYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 250,
                              "PhysicalSizeYUnit": "nm", "TimeIncrement": 600, "TimeIncrementUnit": "s"})
        source = "OME-TIFF metadata"
    out = tmp_path / "out"
    assert run(inputs, out) == 0
    assert json.loads((out / "job.json").read_text())["pixel_size"] is None
    found = records(out)
    assert sorted(found) == ["well_t0000", "well_t0001", "well_t0002"]
    for name, record in found.items():
        assert record["pixel_size"] == {"x_um": 0.5, "y_um": 0.25, "source": source}, name
        assert record["stack"] == "well" and record["time_s"] == 600.0 * record["frame"]
        assert all(cell["area_um2"] == pytest.approx(cell["area"] * 0.125) for cell in record["cells"])
    cells = read_csv(out / "cells.csv")
    assert len(cells) == 9 and all(row["pixel_size_x_um"] == "0.5" and row["pixel_size_y_um"] == "0.25"
                                   for row in cells)
    summary = read_csv(out / "summary.csv")
    assert [(row["image"], row["frame"]) for row in summary] == [("well", "0"), ("well", "1"), ("well", "2")]
    for row in summary:
        assert float(row["median_area_px"]) == 300  # fake_labels: cells of 120, 440 and 300 px
        assert float(row["median_area_um2"]) == pytest.approx(float(row["median_area_px"]) * 0.5 * 0.25)

    given = tmp_path / "given"
    assert run(inputs, given, "--pixel-size", "0.2") == 0
    assert json.loads((given / "job.json").read_text())["pixel_size"] == {
        "x_um": 0.2, "y_um": 0.2, "source": "given (--pixel-size)"}
    found = records(given)
    assert len(found) == 3 and all(record["pixel_size"] == {"x_um": 0.2, "y_um": 0.2, "source": "given (--pixel-size)"}
                                   for record in found.values())
    assert [float(row["median_area_um2"]) for row in read_csv(given / "summary.csv")] == [
        pytest.approx(300 * 0.2 * 0.2)] * 3


def test_a_server_job_sends_each_frame_as_an_image_of_its_own(tmp_path, monkeypatch):
    import cellseg.client

    sent = []

    class RecordingService(FakeService):
        def segment(self, image, **kwargs):
            sent.append(image)
            return super().segment(image, **kwargs)

    monkeypatch.setattr(cellseg.client, "Client", RecordingService)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_stack(inputs / "well.tif", frames=5, ome=True, metadata={"axes": "TYX", "TimeIncrement": 2, "TimeIncrementUnit": "h"})
    out = tmp_path / "out"
    assert run(inputs, out, "--server", "http://cellseg.example:3000", "--min-size", "30", "--concurrency", "2") == 0
    frames = sent[1:]  # the first request asked the server for its settings
    assert len(frames) == 5 and all(isinstance(image, np.ndarray) and image.shape == (64, 80) for image in frames)
    assert sorted(int(image.max()) for image in frames) == [100, 200, 300, 400, 500]
    assert {image.dtype for image in frames} == {np.dtype(np.uint16)}  # the file's own pixels, not float32
    assert [float(row["time_s"]) for row in read_csv(out / "summary.csv")] == [0, 7200, 14400, 21600, 28800]
    assert (out / "plots" / "well_growth.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.data
def test_a_time_lapse_of_real_images_beside_single_images(tmp_path, demo_images, served_model):
    """A 3-frame ImageJ time-lapse made of LIVECell demo images, in one job with a single image: each
    frame's labels are the model's on that frame alone, summary.csv and the growth plot follow the
    records, and a job that lost a frame's record redoes that frame only."""
    import tifffile

    from cellseg.imageio import decode_image, read_image

    frames = [decode_image(p.read_bytes()) for p in demo_images[:3]]
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "well.tif", np.stack(frames), imagej=True, metadata={"axes": "TYX", "finterval": 3600})
    shutil.copy(demo_images[3], inputs / demo_images[3].name)
    out = tmp_path / "out"
    assert run(inputs, out) == 0
    names = [f"well_t{i:04d}" for i in range(3)]
    for name, frame in zip(names, frames):
        labels = np.asarray(Image.open(out / "labels" / f"{name}.png"))
        np.testing.assert_array_equal(labels, served_model.segment([read_image(frame)])[0].labels)
    records = {name: json.loads((out / "records" / f"{name}.json").read_text()) for name in names}
    summary = read_csv(out / "summary.csv")
    assert [(row["image"], row["frame"], row["time_s"]) for row in summary] == [
        (demo_images[3].stem, "", ""), ("well", "0", "0.0"), ("well", "1", "3600.0"), ("well", "2", "7200.0")]
    for row, name in zip(summary[1:], names):
        assert int(row["count"]) == records[name]["count"] > 0
        assert float(row["confluence_pct"]) == records[name]["confluence"]
        assert float(row["median_area_px"]) == np.median([cell["area"] for cell in records[name]["cells"]])
    plot = out / "plots" / "well_growth.png"
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and Image.open(plot).size == (800, 550)

    (out / "records" / "well_t0001.json").unlink()  # as if the job had been killed while writing frame 1
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert run(inputs, out) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert [name for name in before if after[name] != before[name]] == ["well_t0001.png"]
    assert json.loads((out / "records" / "well_t0001.json").read_text()) == records["well_t0001"]
    assert read_csv(out / "summary.csv") == summary


@pytest.mark.data
def test_a_job_names_its_precision_and_why_and_fp32_can_be_forced(tmp_path, demo_images, model_path, capsys):
    """Issue 24: job.json and the terminal say which file and precision ran and why; --precision fp32
    forces fp32 (another file, so another setting); the check's timings are not compared on resume."""
    from cellseg.onnx_model import sha256_file
    from cellseg.variants import choose_for_model

    image, out = demo_images[0], tmp_path / "auto"
    assert run(image, out) == 0
    job = json.loads((out / "job.json").read_text())
    here = choose_for_model(model_path)
    assert job["model_sha256"] == sha256_file(here.path) and job["precision"]["precision"] == here.precision
    assert job["precision"]["reason"] == here.reason and job["precision"]["cpu"] == here.cpu
    assert f"model {here.path}: {here.precision} (" in capsys.readouterr().err
    job["precision"]["check"] = {"fp32_ms": 1.0}  # another run's check: timings differ, the job is the same
    (out / "job.json").write_text(json.dumps(job))
    assert run(image, out) == 0

    forced = tmp_path / "fp32"
    assert run(image, forced, "--precision", "fp32") == 0
    job = json.loads((forced / "job.json").read_text())
    assert job["model_sha256"] == sha256_file(model_path) and job["precision"]["reason"] == "fp32 asked for"
    if here.precision == "int8":  # fp32 into the int8 job's folder: other results, refused
        capsys.readouterr()
        assert run(image, out, "--precision", "fp32") == 2 and "model_sha256" in capsys.readouterr().err


def test_a_records_count_is_its_cells_when_label_ids_have_gaps():
    """Corrected labels (a cell erased in napari) or tracked labels (track ids) skip numbers: the count
    and summary.csv say how many cells there are, not the highest id (they said 500 for 2 cells)."""
    from cellseg.outputs import image_record
    from cellseg.summary import summary_row

    labels = np.zeros((40, 40), np.int32)
    labels[2:10, 2:10], labels[20:30, 20:30] = 7, 500
    record = image_record(labels.astype(np.float32), labels, None, "gaps", "gaps.png")
    assert record["count"] == len(record["cells"]) == 2
    assert summary_row(record)["count"] == 2


def test_errors_json_is_in_path_order_whatever_order_the_backend_finished_in(tmp_path):
    """A user's trial: a Dask job listed failures in completion order, a local one by name; the README
    promises the same outputs from both."""
    from cellseg.batch import write_errors

    failed = [{"path": "b.png", "error": "x"}, {"path": "a.tif", "frame": 2, "error": "y"},
              {"path": "a.tif", "frame": 0, "error": "z"}]
    write_errors(tmp_path, failed)
    written = json.loads((tmp_path / "errors.json").read_text())
    assert [(e["path"], e.get("frame")) for e in written] == [("a.tif", 0), ("a.tif", 2), ("b.png", None)]


def test_the_client_refuses_a_folder_with_the_command_for_one(tmp_path):
    """A user's trial: client.segment("more_images") on a folder said 'no such image file'."""
    from cellseg.client import Client

    with pytest.raises(IsADirectoryError, match="is a folder: segment takes one image.*cellseg segment"):
        Client._upload(tmp_path)


def test_a_second_job_into_the_same_folder_waits_its_turn(small_inputs, tmp_path, network_calls, capsys):
    """A user's trial: two `cellseg segment ... --out same` at once both segmented every image and
    raced for the tables. While one job holds the folder, another is refused (exit 2) before any image."""
    fcntl = pytest.importorskip("fcntl")
    import os

    out = tmp_path / "seg"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)  # what a running job holds
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert run(small_inputs, out) == 2
        assert "another job is writing into" in capsys.readouterr().err and network_calls == []
    finally:
        os.close(holder)
    assert run(small_inputs, out) == 0 and len(network_calls) == 8
    assert run(small_inputs, out) == 0  # the lock went with the job that held it
