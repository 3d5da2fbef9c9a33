"""Issue 26: the napari plugin's widget, driven in a real napari viewer under Xvfb (pytest-xvfb starts
it; Qt's offscreen platform crashes napari's GL probe). It must find the cells `cellseg segment` finds,
re-threshold without the network, measure in µm from the layer's scale, save corrections as training
examples the fine-tuning reads, and fine-tune and switch models from the widget."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari plugin's tests need napari (pip install -r requirements.txt)")
pytest.importorskip("pytestqt", reason="the napari plugin's tests need pytest-qt")
if not os.environ.get("DISPLAY"):  # Qt would abort the whole test run without one
    pytest.skip("no X display: install Xvfb (apt-get install xvfb; .ci/run does) for pytest-xvfb to start one",
                allow_module_level=True)

from cellseg.inference import decode_maps  # noqa: E402
from cellseg.napari_plugin import engine  # noqa: E402
from cellseg.postprocess import maps_to_labels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT_ENV = "CELLSEG_NAPARI_SCREENSHOT"  # where to write the README's screenshot (docs/images/...)


@pytest.fixture
def viewer_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("cellseg", "Segment cells")
    yield viewer, widget
    if widget.worker is not None:
        widget.cancel()


def wait_idle(qtbot, widget, timeout_s: float = 180) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout_s * 1000))
    assert "failed" not in widget.status.text(), widget.status.text()


@pytest.fixture(scope="module")
def livecell_tif(data_root) -> Path:
    path = data_root / "demo" / "A172_Phase_A7_1_00d00h00m_1.tif"
    if not path.is_file():
        pytest.skip(f"LIVECell demo image not found: {path}")
    return path


@pytest.fixture(scope="module")
def t98g_frames(data_root) -> np.ndarray:
    """Three real phase-contrast frames of the T98G time-lapse, cropped to 320x320 (fast on 2 cores)."""
    from cellseg.imageio import read_image

    frames = sorted((data_root / "timelapse" / "usiigaci-t98g" / "frames").glob("*"))[:3]
    if len(frames) < 3:
        pytest.skip("the T98G time-lapse is not in the data folder")
    return np.stack([read_image(path)[:320, :320].astype(np.uint16) for path in frames])


def test_the_widget_docks_from_the_manifest(viewer_widget):
    viewer, widget = viewer_widget
    assert type(widget).__name__ == "CellsegWidget"
    assert widget.image_choice.value is None  # no image yet: Segment says what to do instead of failing
    widget.segment()
    assert widget.worker is None and not widget.busy


@pytest.mark.data
def test_segmenting_a_livecell_image_finds_the_cells_cellseg_segment_finds(viewer_widget, qtbot, livecell_tif, tmp_path):
    import tifffile

    from cellseg.cli import main as cellseg_main
    from cellseg.imageio import read_image

    viewer, widget = viewer_widget
    viewer.add_image(tifffile.imread(livecell_tif), name="A172")
    widget.segment()
    wait_idle(qtbot, widget)
    assert cellseg_main(["segment", str(livecell_tif), "--out", str(tmp_path / "job"), "--formats", "labels"]) == 0
    expected = read_image(tmp_path / "job" / "labels" / f"{livecell_tif.stem}.png").astype(np.int32)
    labels = widget.labels_layer.data
    assert expected.max() > 20 and np.array_equal(labels, expected)
    assert widget.outlines_layer.contour > 0 and widget.outlines_layer.data is labels  # outlines follow corrections
    assert widget.table.rowCount() == expected.max()
    assert widget.summary.text().startswith(f"{expected.max()} cells")
    if os.environ.get(SCREENSHOT_ENV):  # the README's picture, from this very run
        viewer.window._qt_window.resize(1500, 950)
        qtbot.wait(300)
        viewer.reset_view()
        viewer.screenshot(os.environ[SCREENSHOT_ENV], canvas_only=False)


@pytest.mark.data
def test_a_time_lapse_gets_labels_per_frame_and_measurements_per_frame(viewer_widget, qtbot, t98g_frames):
    viewer, widget = viewer_widget
    layer = viewer.add_image(t98g_frames, name="t98g")
    viewer.dims.set_current_step(0, 1)
    widget.segment()  # "current frame": only frame 1
    wait_idle(qtbot, widget)
    labels = widget.labels_layer.data
    assert labels.shape == t98g_frames.shape and labels[1].max() > 0 and labels[0].max() == labels[2].max() == 0
    widget.scope.setCurrentText("all frames")
    widget.segment()
    wait_idle(qtbot, widget)
    model = engine.load_model(engine.ModelChoice())
    for frame in range(3):
        expected = model.segment(t98g_frames[frame].astype(np.float32), model.default_params)
        assert np.array_equal(widget.labels_layer.data[frame], expected.labels), frame
    assert [widget.records[f]["name"] for f in range(3)] == ["t98g_t0000", "t98g_t0001", "t98g_t0002"]
    viewer.dims.set_current_step(0, 2)  # the table follows the frame shown
    assert widget.table.rowCount() == widget.records[2]["count"] == widget.labels_layer.data[2].max()
    assert layer is widget.source


@pytest.mark.data
def test_new_thresholds_apply_to_the_cached_maps_without_the_network(viewer_widget, qtbot, livecell_tif):
    import tifffile

    viewer, widget = viewer_widget
    viewer.add_image(tifffile.imread(livecell_tif), name="A172")
    widget.segment()
    wait_idle(qtbot, widget)
    calls = []
    predict = widget.model.model.predict
    widget.model.model.predict = lambda batch: calls.append(batch.shape) or predict(batch)
    before = widget.labels_layer.data.copy()
    widget.fg_threshold.setValue(0.85)
    widget.seed_threshold.setValue(0.6)
    widget.rethreshold()
    wait_idle(qtbot, widget)
    assert calls == []  # the network did not run
    params = widget.model.default_params.with_overrides(fg_threshold=0.85, seed_threshold=0.6)
    expected = maps_to_labels(decode_maps([widget.results[None].codes])[0], params)
    assert np.array_equal(widget.labels_layer.data, expected) and not np.array_equal(before, expected)
    assert widget.table.rowCount() == expected.max()


@pytest.mark.data
def test_measurements_are_in_micrometres_from_the_layer_scale_and_export_as_cellseg_csv(viewer_widget, qtbot,
                                                                                          livecell_tif, tmp_path):
    import tifffile

    viewer, widget = viewer_widget
    viewer.add_image(tifffile.imread(livecell_tif), name="A172", scale=(0.5, 0.5))
    widget.segment()
    wait_idle(qtbot, widget)
    record = widget.records[None]
    assert record["pixel_size"]["x_um"] == 0.5 and "layer scale" in record["pixel_size"]["source"]
    cell = record["cells"][0]
    assert cell["area_um2"] == pytest.approx(cell["area"] * 0.25)
    assert cell["perimeter_um"] == pytest.approx(cell["perimeter"] * 0.5, rel=1e-5)
    assert widget.table.item(0, 2).text() == f"{cell['area_um2']:g}"  # the table's µm² column
    assert widget.labels_layer.scale[-1] == 0.5  # labels lie on the image
    cells_csv, summary_csv = widget.export_csv(tmp_path / "A172_cells.csv")
    rows = list(csv.DictReader(cells_csv.open()))
    assert len(rows) == record["count"] and float(rows[0]["area_um2"]) == cell["area_um2"]
    assert rows[0]["pixel_size_x_um"] == "0.5"
    summary = list(csv.DictReader(summary_csv.open()))
    assert summary[0]["count"] == str(record["count"]) and float(summary[0]["confluence_pct"]) == record["confluence"]
    widget.table.selectRow(3)  # a row selects its cell in the labels layer
    assert widget.labels_layer.selected_label == record["cells"][3]["cell_id"]
    assert widget.labels_layer.show_selected_label


@pytest.mark.data
def test_a_painted_correction_is_saved_as_a_training_example_exactly(viewer_widget, qtbot, t98g_frames, tmp_path):
    from cellseg.annotations import read_annotated
    from cellseg.imageio import read_image
    from cellseg.targets import relabel_sequential

    viewer, widget = viewer_widget
    viewer.add_image(t98g_frames, name="t98g")
    viewer.dims.set_current_step(0, 2)
    widget.segment()
    wait_idle(qtbot, widget)
    layer = widget.labels_layer
    erased = int(layer.data[2][layer.data[2] > 0][0])
    layer.data[2][layer.data[2] == erased] = 0  # erase a cell, paint a new one, as napari's tools do
    new = int(layer.data[2].max()) + 1
    layer.paint((2, 40, 40), new, refresh=True)
    corrected = layer.data[2].copy()
    assert erased not in corrected and new in corrected
    widget.examples_folder.setText(str(tmp_path / "examples"))
    image_path, mask_path = widget.save_example()
    assert mask_path.name == "t98g_t0002_masks.png"
    samples = read_annotated([tmp_path / "examples"])
    assert len(samples) == 1
    assert np.array_equal(samples[0].labels(), relabel_sequential(corrected))  # the same cells, numbered 1..N
    assert np.array_equal(read_image(mask_path).astype(np.int32), relabel_sequential(corrected))
    assert np.array_equal(samples[0].image(), t98g_frames[2].astype(np.float32))
    widget.measure()  # measurements follow the correction
    ids = [cell["cell_id"] for cell in widget.records[2]["cells"]]
    assert erased not in ids and new in ids


@pytest.mark.slow
@pytest.mark.data
def test_fine_tuning_from_the_widget_gives_a_verdict_and_a_model_it_then_segments_with(viewer_widget, qtbot, data_root,
                                                                                       tmp_path):
    """Two corrected images (their true cells standing in for a biologist's corrections), a short
    fine-tune in its worker, its verdict, then "Use this model" and segmenting again with it."""
    from cellseg.data import load_split

    viewer, widget = viewer_widget
    widget.examples_folder.setText(str(tmp_path / "examples"))
    widget.runs_folder.setText(str(tmp_path / "runs"))
    samples = [s for s in load_split(data_root, "val") if s.source == "livecell"][:2]
    for sample in samples:
        image = np.clip(sample.image()[:256, :256], 0, 255).astype(np.uint8)
        viewer.add_image(image, name=sample.id.split(":")[-1].removesuffix(".tif"))
        widget.image_choice.value = viewer.layers[-1]
        widget.segment()
        wait_idle(qtbot, widget)
        widget.labels_layer.data[:] = sample.labels()[:256, :256]  # the "corrections"
        assert widget.save_example() is not None
    widget.minutes.setValue(0.3)
    widget.start_finetune()
    assert widget.busy
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    run = widget.finetune
    assert run.returncode in (0, 5), "\n".join(run.lines[-30:])
    assert widget.verdict.text().startswith("VERDICT: ") and run.verdict in widget.verdict.text()
    assert (run.out / "model.onnx").is_file() and widget.use_button.isEnabled()
    widget.use_finetuned()
    widget.segment()
    wait_idle(qtbot, widget)
    assert widget.model_choice == engine.ModelChoice(engine.FILE, str(run.out / "model.onnx"))
    assert "model" in widget.model_status.text() and widget.labels_layer is not None


def test_the_panel_can_fine_tune_without_training_the_network(viewer_widget, tmp_path, monkeypatch):
    """Issue 29: `--no-train` (thresholds, TTA and a cell filter on the shipped network) from the panel."""
    from conftest import disc

    viewer, widget = viewer_widget
    labels = disc((64, 64), (30, 30), 10).astype(np.int32)
    engine.save_training_example(tmp_path / "examples", "synthetic", (labels > 0).astype(np.uint8) * 120 + 40, labels)
    widget.examples_folder.setText(str(tmp_path / "examples"))
    widget.runs_folder.setText(str(tmp_path / "runs"))
    started = []
    monkeypatch.setattr(widget, "_start", lambda worker, *args, **kwargs: started.append(worker))
    assert widget.train_network.isChecked()  # training stays the default
    widget.train_network.setChecked(False)
    widget.start_finetune()
    assert started and widget.finetune.train is False and widget.finetune.command()[-1] == "--no-train"
    assert "--no-train" not in engine.FinetuneRun(tmp_path, tmp_path / "out", 1.0).command()


def test_a_fine_tune_that_fails_says_why(tmp_path):
    run = engine.FinetuneRun(tmp_path / "nothing", tmp_path / "out", 0.1)
    (tmp_path / "nothing").mkdir()
    assert run.run() == 2
    assert run.verdict is None and "no annotated image" in run.error


def test_the_manifest_is_valid_and_names_importable_commands():
    if shutil.which("npe2") is None and not (Path(sys.executable).parent / "npe2").exists():
        pytest.skip("npe2's command line is not installed")
    npe2 = shutil.which("npe2") or str(Path(sys.executable).parent / "npe2")
    result = subprocess.run([npe2, "validate", "cellseg", "--imports"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr


def test_layer_scale_gives_the_pixel_size():
    assert engine.layer_pixel_size((1.0, 1.0), ["pixel", "pixel"]) is None  # napari's default says nothing
    assert engine.layer_pixel_size((0.65, 0.65)).x_um == 0.65  # unitless scale: µm, as readers set it
    size = engine.layer_pixel_size((1, 0.4, 0.5), ["second", "micrometer", "micrometer"])
    assert (size.x_um, size.y_um) == (0.5, 0.4)
    assert engine.layer_pixel_size((0.5, 0.5), ["nanometer", "nanometer"]).x_um == pytest.approx(0.0005)


@pytest.mark.data
def test_cancel_stops_between_frames_and_keeps_the_frames_done(viewer_widget, qtbot, t98g_frames):
    viewer, widget = viewer_widget
    viewer.add_image(np.concatenate([t98g_frames] * 15), name="t98g")  # 45 frames: cancel lands well before the end
    widget.scope.setCurrentText("all frames")
    widget.segment()
    qtbot.waitUntil(lambda: len(widget.results) >= 1, timeout=120_000)
    widget.cancel()
    wait_idle(qtbot, widget)
    done = sorted(widget.results)
    assert 1 <= len(done) < 45 and done == list(range(len(done)))
    assert "cancelled" in widget.status.text()
    assert all(widget.labels_layer.data[f].max() > 0 for f in done)
    assert widget.labels_layer.data[len(done):].max() == 0  # frames not reached stay empty
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_a_missing_model_file_is_a_clear_error_and_the_widget_stays_usable(viewer_widget, qtbot, tmp_path):
    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((64, 64), np.uint8), name="blank")
    widget.model_kind.setCurrentText(engine.FILE)
    widget.model_target.setText(str(tmp_path / "nope.onnx"))
    widget.segment()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.status.text().startswith("failed: ") and "nope.onnx" in widget.status.text()
    assert widget.segment_button.isEnabled() and widget.labels_layer is None


@pytest.mark.slow
@pytest.mark.data
def test_a_running_server_segments_for_the_widget(viewer_widget, qtbot, server, client, livecell_tif):
    """Labs with one GPU box: the widget sends the frame to the service and shows its cells."""
    import tifffile

    viewer, widget = viewer_widget
    viewer.add_image(tifffile.imread(livecell_tif), name="A172")
    widget.model_kind.setCurrentText(engine.SERVER)
    widget.model_target.setText(server)
    widget.segment()
    wait_idle(qtbot, widget)
    expected = client.segment(livecell_tif).labels
    assert expected.max() > 20 and np.array_equal(widget.labels_layer.data, expected)
    assert widget.results[None].codes is None and widget.model_status.text().startswith(server.rstrip("/"))
    widget.fg_threshold.setValue(0.8)  # new thresholds: asked of the server again (it keeps no maps for us)
    widget.rethreshold()
    wait_idle(qtbot, widget)
    assert np.array_equal(widget.labels_layer.data, client.segment(livecell_tif, fg_threshold=0.8).labels)


@pytest.mark.slow
def test_a_registered_model_is_found_in_the_store_by_tag(tmp_path):
    """The widget's "registered model": the store's fp32 file, checked against its recorded sha256."""
    env = os.environ | {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    register = subprocess.run([sys.executable, "-m", "export", "register"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert register.returncode == 0, register.stderr[-2000:]
    code = ("from cellseg.napari_plugin import engine\n"
            "m = engine.load_model(engine.ModelChoice(engine.REGISTERED, 'livecell-unet:latest'))\n"
            "print(m.model.path)\n"
            "try:\n    engine.registered_model_file('no-such-model:latest')\n"
            "except ValueError as exc:\n    print('refused:', exc)\n")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    path, refusal = found.stdout.strip().splitlines()[-2:]
    assert path.startswith(str(tmp_path / "bentoml")) and path.endswith(".onnx")
    assert "no model 'no-such-model:latest' in the BentoML store" in refusal


@pytest.mark.data
def test_the_time_lapse_sample_segments_with_its_micrometre_scale(viewer_widget, qtbot, data_root):
    """As a biologist starts: File › Open Sample › cellseg, then Segment; the table is in µm."""
    viewer, widget = viewer_widget
    viewer.open_sample("cellseg", "timelapse")
    layer = viewer.layers[-1]
    assert layer.data.ndim == 3 and widget.image_choice.value is layer
    viewer.dims.set_current_step(0, 4)
    widget.segment()
    wait_idle(qtbot, widget)
    record = widget.records[4]
    assert record["count"] > 20 and record["pixel_size"]["x_um"] == pytest.approx(0.87)
    cell = record["cells"][0]
    assert cell["area_um2"] == pytest.approx(cell["area"] * 0.87 ** 2, rel=1e-5)
    assert not widget.table.isColumnHidden(2) and widget.table.item(0, 2).text() == f"{cell['area_um2']:g}"
    assert "0.87 µm" in widget.summary.text()
    assert record["time_s"] == pytest.approx(4 * 10.2 * 60)  # frame 4, 10.2 minutes apart: summary's time_s
    assert tuple(widget.labels_layer.scale) == tuple(layer.scale) and widget.labels_layer.units == layer.units


def test_cancelling_a_fine_tune_ends_its_process_and_says_how_to_resume(viewer_widget, qtbot, tmp_path):
    from conftest import disc

    viewer, widget = viewer_widget
    labels = (disc((96, 96), (30, 30), 12) + 2 * disc((96, 96), (64, 60), 14)).astype(np.int32)
    engine.save_training_example(tmp_path / "examples", "synthetic", (labels > 0).astype(np.uint8) * 120 + 40, labels)
    widget.examples_folder.setText(str(tmp_path / "examples"))
    widget.runs_folder.setText(str(tmp_path / "runs"))
    widget.minutes.setValue(5)
    widget.start_finetune()
    qtbot.waitUntil(lambda: len(widget.finetune.lines) >= 1, timeout=120_000)  # it has started
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    run = widget.finetune
    assert run.cancelled and run.returncode not in (0, None) and run._process.poll() is not None
    assert widget.verdict.text().startswith("fine-tuning cancelled; ") and not widget.use_button.isEnabled()
    assert "nothing to resume" in widget.verdict.text()  # cancelled within its first minute: no checkpoint yet
    run.out.mkdir(parents=True, exist_ok=True)  # (cancelled this early, the run may not have made it)
    (run.out / "finetune.pt").write_bytes(b"")  # with a checkpoint, the hint runs from anywhere
    hint = run.resume_hint()
    assert hint.startswith(f"to continue it: cd {REPO} && ") and hint.endswith("--resume") and str(run.out) in hint


def test_a_z_stack_is_not_segmented_as_a_time_lapse(viewer_widget, qtbot, tmp_path):
    """A user's trial: an ImageJ Z-stack opened in napari was segmented "all frames" as 5 time points,
    where `cellseg segment` refuses the file; the widget now refuses it with the same reason, and
    still segments the plane shown."""
    import tifffile

    path = tmp_path / "zstack.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    viewer, widget = viewer_widget
    viewer.open(path, plugin="napari")
    widget.scope.setCurrentText("all frames")
    widget.segment()
    assert "5 Z-slices" in widget.status.text() and "'current frame'" in widget.status.text()
    assert not widget.busy and widget.labels_layer is None
    widget.scope.setCurrentText("current frame")
    widget.segment()
    wait_idle(qtbot, widget)
    assert widget.labels_layer is not None


@pytest.mark.data
def test_the_pixel_size_in_an_opened_files_metadata_gives_micrometres(viewer_widget, qtbot, livecell_tif, tmp_path):
    """A file opened with napari's own reader has no scale; its ImageJ metadata still gives µm."""
    import tifffile

    path = tmp_path / "calibrated.tif"
    image = tifffile.imread(livecell_tif)[:256, :256]
    tifffile.imwrite(path, image, imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "um"})
    viewer, widget = viewer_widget
    viewer.open(path, plugin="napari")
    assert tuple(viewer.layers[-1].scale) == (1.0, 1.0)
    widget.segment()
    wait_idle(qtbot, widget)
    size = widget.records[None]["pixel_size"]
    assert size["x_um"] == pytest.approx(0.65) and size["source"] == "ImageJ metadata"
    cell = widget.records[None]["cells"][0]
    assert cell["area_um2"] == pytest.approx(cell["area"] * 0.65**2, rel=1e-5)


@pytest.mark.data
def test_corrections_are_kept_when_segmenting_again_and_layers_do_not_pile_up(viewer_widget, qtbot, t98g_frames):
    """Segment again (or new thresholds) must not silently wipe a biologist's painting; segmenting the
    same image again reuses its layers, even after napari renamed a second image's to '... [1]'."""
    viewer, widget = viewer_widget
    first = viewer.add_image(t98g_frames[0], name="t98g")
    widget.segment()
    wait_idle(qtbot, widget)
    cells_layer = widget.labels_layer
    cells_layer.paint((40, 40), 999, refresh=True)  # napari's brush: a correction
    painted = cells_layer.data.copy()
    widget.fg_threshold.setValue(0.8)
    widget.rethreshold()
    wait_idle(qtbot, widget)
    kept = [layer for layer in viewer.layers if layer.name.endswith("(your corrections)")]
    assert len(kept) == 1 and np.array_equal(kept[0].data, painted) and not kept[0].visible
    viewer.add_image(t98g_frames[1], name="t98g")  # napari names it 't98g [1]'
    second = viewer.layers[-1]
    for image in (second, first, first):
        widget.image_choice.value = image
        widget.segment()
        wait_idle(qtbot, widget)
    assert widget.labels_layer is cells_layer  # the first image's own layers again
    outlines = [layer.name for layer in viewer.layers if "outlines" in layer.name]
    assert len(outlines) == 2, outlines  # one pair per image, however often it is segmented


def test_thresholds_set_before_the_first_segment_are_applied(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(90, 110, (96, 96)).astype(np.uint8), name="noise")
    assert widget.fg_threshold.value() == pytest.approx(engine.file_params(engine.default_model_path()).fg_threshold)
    widget.seed_threshold.setValue(0.6)
    widget.min_size.setValue(100)
    widget.segment()
    wait_idle(qtbot, widget)
    assert (widget.seed_threshold.value(), widget.min_size.value()) == (0.6, 100)  # not reset to the model's
    params = widget.params()
    expected = maps_to_labels(decode_maps([widget.results[None].codes])[0], params)
    assert params.seed_threshold == 0.6 and params.min_size == 100 and np.array_equal(widget.labels_layer.data, expected)


@pytest.mark.data
def test_painted_cells_are_scored_by_the_models_cell_filter_like_its_own(data_root, model_path):
    """With the shipped model's cell filter, a run's scores are P(annotated); a cell painted afterwards
    is scored on that scale too (it used to get the mean foreground probability, another scale)."""
    from cellseg.cell_filter import CellFilter
    from cellseg.data import load_split
    from cellseg.napari_plugin.widget import CellsegWidget

    model = engine.LocalModel(model_path)
    assert model.default_params.cell_filter is not None
    image = load_split(data_root, "val")[0].image()[:256, :256]
    result = model.segment(image, model.default_params)
    assert result.cell_filter == model.default_params.cell_filter
    np.testing.assert_array_equal(CellsegWidget._scores(result.labels, result), result.scores)
    painted = result.labels.copy()
    painted[:20, :20] = painted.max() + 1  # a new cell painted in a corner
    scores = CellsegWidget._scores(painted, result)
    maps = decode_maps([result.codes])[0]
    assert isinstance(result.cell_filter, CellFilter) and len(scores) == painted.max()
    np.testing.assert_allclose(scores, result.cell_filter.probabilities(painted, maps))
