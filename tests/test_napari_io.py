"""The napari plugin's reader, writers and sample data (cellseg/napari_plugin/io.py, samples.py), called
directly and through npe2 as napari calls them; no Qt needed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
npe2 = pytest.importorskip("npe2")

from cellseg.annotations import AnnotationError  # noqa: E402
from cellseg.imageio import decode_image  # noqa: E402
from cellseg.instances import png_bytes  # noqa: E402
from cellseg.napari_plugin import io, samples  # noqa: E402
from cellseg.targets import relabel_sequential  # noqa: E402

MANIFEST = Path(io.__file__).with_name("napari.yaml")
READER = "cellseg.get_reader"


@pytest.fixture(scope="module")
def manifest() -> npe2.PluginManifest:
    return npe2.PluginManifest.from_file(MANIFEST)


@pytest.fixture(scope="module")
def plugins(manifest) -> npe2.PluginManager:
    """npe2's plugin manager as napari uses it: installed plugins, and ours (from the yaml where the
    package is not installed with its entry point)."""
    pm = npe2.PluginManager.instance()
    pm.discover()
    if "cellseg" not in {m.name for m in pm.iter_manifests()}:
        pm.register(manifest)
    return pm


def cells_labels() -> np.ndarray:
    """Cells that test the formats: a hole, two pieces, touching neighbours, the image edge, gaps in
    the ids (napari edits leave them), a one-pixel cell."""
    labels = np.zeros((64, 96), np.int32)
    labels[4:24, 4:30] = 5
    labels[10:16, 12:20] = 0  # a hole
    labels[30:40, 0:12] = 9  # at the left edge
    labels[30:40, 12:22] = 12  # touching 9
    labels[44:50, 40:46] = 200  # two pieces (4-connected apart) of one cell
    labels[50:56, 46:52] = 200
    labels[60, 90] = 201
    labels[20:64, 70:80] = 7  # reaching the bottom edge
    return labels


def padded(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Labels read at the outlines' extent, placed in an image of `shape` (the margin has no cells)."""
    out = np.zeros(shape, labels.dtype)
    out[: labels.shape[0], : labels.shape[1]] = labels
    return out


def read_one(path: Path) -> tuple[np.ndarray, dict]:
    reader = io.get_reader(str(path))
    assert reader is not None, f"get_reader refused {path}"
    ((data, meta, layer_type),) = reader(str(path))
    assert layer_type == "labels"
    return data, meta


# --- manifest and npe2 ---------------------------------------------------------------------------


def test_manifest_commands_import(manifest):
    ids = {c.id for c in manifest.contributions.commands}
    assert {READER, "cellseg.write_roi_set", "cellseg.write_geojson", "cellseg.sample_image",
            "cellseg.sample_timelapse"} <= ids
    for command in manifest.contributions.commands:
        module, _, name = command.python_name.partition(":")
        if module == "cellseg.napari_plugin.widget" and importlib.util.find_spec(module) is None:
            continue  # the dock widget is another part of issue 26 (validate_imports below checks it once merged)
        assert callable(getattr(importlib.import_module(module), name)), command.python_name


def test_manifest_validate_imports(manifest):
    if importlib.util.find_spec("cellseg.napari_plugin.widget") is None:
        pytest.skip("cellseg/napari_plugin/widget.py is not on this branch yet (issue 26's dock widget)")
    manifest.validate_imports()


def test_installed_manifest_is_this_one(manifest):
    try:
        installed = npe2.PluginManifest.from_distribution("cellseg")
    except Exception as exc:  # not installed with its entry point: the yaml is what napari would read
        pytest.skip(f"cellseg is not installed as a napari plugin here ({exc})")
    assert installed.contributions == manifest.contributions


@pytest.mark.parametrize("name", ["X_masks.png", "X_masks.tif", "X_masks.tiff", "X_cp_masks.png", "X_labels.png",
                                  "X_labels.tif", "X_labels.tiff", "X.zip", "X_RoiSet.zip", "X.roi", "X.geojson"])
def test_npe2_offers_our_reader(plugins, name):
    assert READER in {r.command for r in plugins.iter_compatible_readers([f"/data/{name}"])}


@pytest.mark.parametrize("name", ["X.png", "X.tif", "X.jpg", "X.json", "X_masks.jpg"])
def test_npe2_does_not_offer_our_reader_for_images(plugins, name):
    assert READER not in {r.command for r in plugins.iter_compatible_readers([f"/data/{name}"])}


def test_npe2_offers_our_writers_for_labels(plugins):
    writers = {w.command: w.filename_extensions for w in plugins.iter_compatible_writers(["labels"])}
    assert writers.get("cellseg.write_roi_set") == [".zip"]
    assert writers.get("cellseg.write_geojson") == [".geojson"]


def test_npe2_write_and_read_round_trip(plugins, tmp_path):
    labels = cells_labels()
    for suffix in (".zip", ".geojson"):
        path = tmp_path / f"cells{suffix}"
        assert npe2.write(path, [(labels, {"name": "cells"}, "labels")], plugin_name="cellseg") == [str(path)]
        ((data, meta, layer_type),) = npe2.read([path], stack=False, plugin_name="cellseg")
        assert layer_type == "labels"
        np.testing.assert_array_equal(padded(data, labels.shape), relabel_sequential(labels))


# --- reader ---------------------------------------------------------------------------------------


def test_get_reader_refuses_other_files(tmp_path):
    other_zip = tmp_path / "X.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "not ROIs")
    (tmp_path / "X.png").write_bytes(png_bytes(np.zeros((32, 32), np.uint8)))
    assert io.get_reader(str(other_zip)) is None
    assert io.get_reader(str(tmp_path / "X.png")) is None  # an image, not labels
    assert io.get_reader([str(other_zip), str(tmp_path / "X.png")]) is None


def test_label_image_reads_as_labels(tmp_path):
    labels = cells_labels()
    path = tmp_path / "X_masks.png"
    path.write_bytes(png_bytes(labels.astype(np.uint16)))
    data, meta = read_one(path)
    # label values are numbered 1..N in their order (cellseg.annotations.read_label_mask)
    np.testing.assert_array_equal(data, relabel_sequential(labels))
    assert meta["name"] == "X_masks" and meta["metadata"]["format"] == "label-mask"
    assert meta["metadata"]["cells"] == len(np.unique(labels)) - 1


def test_several_files_give_one_layer_each(tmp_path):
    labels = cells_labels()
    io.write_roi_set(str(tmp_path / "a.zip"), labels, {})
    io.write_geojson(str(tmp_path / "a.geojson"), labels, {})
    paths = [str(tmp_path / "a.zip"), str(tmp_path / "a.geojson")]
    layers = io.get_reader(paths)(paths)
    assert [meta["name"] for _, meta, _ in layers] == ["a (ROI set)", "a (GeoJSON)"]


@pytest.mark.parametrize("writer, suffix", [(io.write_roi_set, ".zip"), (io.write_geojson, ".geojson")])
def test_outlines_round_trip_at_extent(tmp_path, writer, suffix):
    labels = cells_labels()
    path = tmp_path / f"X{suffix}"
    assert writer(str(path), labels, {}) == [str(path)]
    data, meta = read_one(path)
    # without the image, the label image ends at the cells' far edge; cells keep their positions and
    # are renumbered 1..N in id order (the files list them by id)
    assert data.shape == (64, 91)
    np.testing.assert_array_equal(padded(data, labels.shape), relabel_sequential(labels))
    assert "extent" in meta["metadata"]["size_from"] and meta["metadata"]["image"] is None
    assert meta["metadata"]["cells"] == 6 and meta["metadata"]["overlap_pixels"] == 0


@pytest.mark.parametrize("writer, name", [(io.write_roi_set, "X_RoiSet.zip"), (io.write_roi_set, "X.zip"),
                                          (io.write_geojson, "X.geojson")])
def test_outlines_take_the_size_of_the_image_beside_them(tmp_path, writer, name):
    labels = cells_labels()
    (tmp_path / "X.png").write_bytes(png_bytes(np.zeros((80, 120), np.uint8)))  # larger than the cells' extent
    writer(str(tmp_path / name), labels, {})
    data, meta = read_one(tmp_path / name)
    assert data.shape == (80, 120)
    np.testing.assert_array_equal(data, padded(relabel_sequential(labels), (80, 120)))
    assert meta["metadata"]["size_from"] == "image beside it: X.png"


def test_outlines_cut_at_a_smaller_image_beside_them(tmp_path):
    labels = cells_labels()
    (tmp_path / "X.png").write_bytes(png_bytes(np.zeros((62, 95), np.uint8)))  # cell 7 reaches row 63
    io.write_roi_set(str(tmp_path / "X.zip"), labels, {})
    data, meta = read_one(tmp_path / "X.zip")
    np.testing.assert_array_equal(data, relabel_sequential(labels)[:62, :95])
    assert meta["metadata"]["clipped_cells"] == 1
    # a cell wholly outside its image is an error (cellseg.annotations' rule): the wrong image, or damage
    (tmp_path / "X.png").write_bytes(png_bytes(np.zeros((50, 60), np.uint8)))
    with pytest.raises(AnnotationError, match=r"X\.zip: ROI 'cell-00007' lies wholly outside the 60x50 image"):
        read_one(tmp_path / "X.zip")


def test_empty_roi_set(tmp_path):
    """cellseg writes an empty zip for an image without cells: ours, and empty labels at its image's size."""
    empty = np.zeros((40, 50), np.int32)
    io.write_roi_set(str(tmp_path / "X.zip"), empty, {})
    with pytest.raises(AnnotationError, match=r"X\.zip holds no cells.*put the image"):
        read_one(tmp_path / "X.zip")
    (tmp_path / "X.tif").write_bytes(png_bytes(np.zeros((40, 50), np.uint8)))  # a PNG named .tif decodes too
    data, _ = read_one(tmp_path / "X.zip")
    np.testing.assert_array_equal(data, empty)


# --- damaged and hostile files ---------------------------------------------------------------------


def test_damaged_zip_names_the_file(tmp_path):
    whole = tmp_path / "whole.zip"
    io.write_roi_set(str(whole), cells_labels(), {})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a download stopped half-way
    with pytest.raises(AnnotationError, match=r"cut\.zip is not a readable ImageJ ROI set"):
        read_one(cut)
    garbage = tmp_path / "garbage.zip"
    with zipfile.ZipFile(garbage, "w") as archive:
        archive.writestr("cell-00001.roi", b"Iout" + bytes(20))
    with pytest.raises(AnnotationError, match=r"garbage\.zip"):
        read_one(garbage)
    single = tmp_path / "one.roi"
    single.write_bytes(b"not a ROI")
    with pytest.raises(AnnotationError, match=r"one\.roi is not a readable ImageJ ROI"):
        read_one(single)


def test_damaged_npe2_read_shows_our_message(plugins, tmp_path):
    path = tmp_path / "broken.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(AnnotationError, match=r"broken\.geojson is not readable GeoJSON"):
        npe2.read([path], stack=False, plugin_name="cellseg")


@pytest.mark.parametrize("document, message", [
    ("[1, 2", "is not readable GeoJSON"),
    ('{"type": "Topology"}', "is not a GeoJSON FeatureCollection"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": "x"}}]}', "unreadable geometry"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [9000000, 0], [9000000, 9000000], [0, 0]]]}}]}', "over the .* an image may have"),
])
def test_damaged_geojson_names_the_file(tmp_path, document, message):
    path = tmp_path / "cells.geojson"
    path.write_text(document)
    with pytest.raises(AnnotationError, match=rf"cells\.geojson.*{message}"):
        read_one(path)


def test_damaged_label_image_names_the_file(tmp_path):
    good = png_bytes(cells_labels().astype(np.uint16))
    path = tmp_path / "X_masks.png"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(AnnotationError, match=r"X_masks\.png"):
        read_one(path)
    path.write_bytes(png_bytes(((cells_labels() > 0) * 255).astype(np.uint8)))  # binary: cells would merge
    with pytest.raises(AnnotationError, match=r"X_masks\.png looks like a binary mask"):
        read_one(path)


# --- writers --------------------------------------------------------------------------------------


def test_a_time_lapse_is_written_one_file_per_frame_named_as_batch_jobs_name_frames(plugins, tmp_path):
    stack = np.stack([cells_labels(), np.zeros_like(cells_labels()), cells_labels()[:, ::-1]])
    for writer, suffix in ((io.write_roi_set, ".zip"), (io.write_geojson, ".geojson")):
        written = writer(str(tmp_path / f"t{suffix}"), stack, {})
        assert written == [str(tmp_path / f"t_t000{t}{suffix}") for t in range(3)]
        assert not (tmp_path / f"t{suffix}").exists()
        for t, path in enumerate(written):  # each frame reads back as its own cells (an empty one: none)
            image = tmp_path / f"t_t000{t}.png"
            image.write_bytes(png_bytes(np.zeros(stack.shape[1:], np.uint8)))  # beside it: gives the size
            np.testing.assert_array_equal(read_one(Path(path))[0], relabel_sequential(stack[t]))
            image.unlink()
    import roifile  # each frame's ROIs sit on that frame in Fiji (position: the 1-based stack index)

    assert {r.position for r in roifile.roiread(tmp_path / "t_t0002.zip")} == {3}
    assert npe2.write(tmp_path / "n.zip", [(stack, {}, "labels")], plugin_name="cellseg")  # through napari's writer
    with pytest.raises(ValueError, match="4-D"):
        io.write_roi_set(str(tmp_path / "x.zip"), np.zeros((2, 2, 8, 8), np.int32), {})
    io.write_roi_set(str(tmp_path / "one.zip"), stack[:1], {})  # (1, Y, X): one image
    np.testing.assert_array_equal(padded(read_one(tmp_path / "one.zip")[0], (64, 96)), relabel_sequential(stack[0]))


def test_writers_refuse_values_that_are_not_cell_ids(tmp_path):
    with pytest.raises(ValueError, match="whole-number"):
        io.write_roi_set(str(tmp_path / "f.zip"), cells_labels().astype(np.float32), {})
    with pytest.raises(ValueError, match="cell ids must be 0"):
        io.write_roi_set(str(tmp_path / "n.zip"), -cells_labels(), {})


def test_geojson_measurements_in_um_from_the_layer_scale(tmp_path):
    labels = cells_labels()
    io.write_geojson(str(tmp_path / "px.geojson"), labels, {"scale": [1.0, 1.0], "units": ("pixel", "pixel")})
    io.write_geojson(str(tmp_path / "um.geojson"), labels, {"scale": [0.5, 0.5], "units": ("micrometer", "µm")})
    io.write_geojson(str(tmp_path / "mm.geojson"), labels, {"scale": [0.002, 0.002], "units": ("millimeter",) * 2})
    features = {name: json.loads((tmp_path / f"{name}.geojson").read_text())["features"] for name in ("px", "um", "mm")}
    first = {name: f[0]["properties"]["measurements"] for name, f in features.items()}
    assert "area_um2" not in first["px"] and first["px"]["area"] == first["um"]["area"]
    assert first["um"]["area_um2"] == pytest.approx(first["um"]["area"] * 0.25)
    assert first["mm"]["area_um2"] == pytest.approx(first["mm"]["area"] * 4.0)
    assert [f["properties"]["cell_id"] for f in features["px"]] == [5, 7, 9, 12, 200, 201]


# --- a real `cellseg segment` job ------------------------------------------------------------------


@pytest.fixture(scope="module")
def segment_job(tmp_path_factory, request) -> tuple[Path, Path]:
    """(--out folder, image) of `cellseg segment` on the LIVECell demo image, labels, ROI set and GeoJSON."""
    from cellseg.cli import main

    image = request.getfixturevalue("tif")
    out = tmp_path_factory.mktemp("segment") / "out"
    assert main(["segment", str(image), "--out", str(out), "--formats", "labels,rois,geojson", "--precision", "fp32",
                 "--quiet"]) == 0
    return out, image


@pytest.mark.data
def test_segment_outputs_read_back_as_the_same_cells(segment_job, tmp_path):
    out, image = segment_job
    stem = image.stem
    job_labels = decode_image((out / "labels" / f"{stem}.png").read_bytes()).astype(np.int32)
    assert job_labels.shape == (520, 704) and job_labels.max() > 50
    # renamed as fine-tuning names masks, the job's label image reads back as it is (napari offers readers
    # by file name, so a plain labels/X.png opens as an image: README, "In napari")
    (tmp_path / f"{stem}_masks.png").write_bytes((out / "labels" / f"{stem}.png").read_bytes())
    np.testing.assert_array_equal(read_one(tmp_path / f"{stem}_masks.png")[0], job_labels)
    for name in (f"rois/{stem}.zip", f"geojson/{stem}.geojson"):
        data, meta = read_one(out / name)
        np.testing.assert_array_equal(padded(data, job_labels.shape), job_labels, err_msg=name)
        assert meta["metadata"]["cells"] == job_labels.max()
        # beside its image (linked, not copied) it is read at the image's size
        beside = tmp_path / Path(name).name
        beside.symlink_to(out / name)
        (tmp_path / image.name).unlink(missing_ok=True)
        (tmp_path / image.name).symlink_to(image)
        data, meta = read_one(beside)
        np.testing.assert_array_equal(data, job_labels, err_msg=name)
        assert meta["metadata"]["size_from"] == f"image beside it: {image.name}"


@pytest.mark.data
def test_writers_give_the_bytes_segment_writes(segment_job, tmp_path):
    out, image = segment_job
    job_labels = decode_image((out / "labels" / f"{image.stem}.png").read_bytes())  # uint16, as napari would open it
    io.write_roi_set(str(tmp_path / "cells.zip"), job_labels, {})
    assert (tmp_path / "cells.zip").read_bytes() == (out / "rois" / f"{image.stem}.zip").read_bytes()
    io.write_geojson(str(tmp_path / "cells.geojson"), job_labels, {})
    ours = json.loads((tmp_path / "cells.geojson").read_text())["features"]
    theirs = json.loads((out / "geojson" / f"{image.stem}.geojson").read_text())["features"]
    # the same features and geometry; the job also measures intensity and has the network's scores,
    # which a writer, given only the labels, has not
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["id"] == b["id"] and a["geometry"] == b["geometry"]
        job_values = {k: v for k, v in b["properties"]["measurements"].items() if k not in ("mean_intensity", "score")}
        assert a["properties"]["measurements"] == job_values


# --- sample data ----------------------------------------------------------------------------------


def layer(data_tuple):
    from napari.layers import Layer

    return Layer.create(*data_tuple)  # napari's own check of the tuple (unknown keywords raise)


def test_livecell_sample_falls_back_to_the_packaged_crop(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSEG_DATA", str(tmp_path))  # no data here
    ((data, meta, kind),) = samples.livecell_image()
    assert kind == "image" and data.shape == (256, 256) and data.dtype == np.uint8
    assert "crop" in meta["name"] and "CC BY-NC 4.0" in meta["metadata"]["licence"]
    assert layer((data, meta, kind)).name == meta["name"]


@pytest.mark.data
def test_livecell_sample_from_the_data_root(data_root):
    ((data, meta, kind),) = samples.livecell_image()
    assert data.shape == (520, 704) and meta["name"] == "A172 (LIVECell)"
    assert meta["metadata"]["source"] == str(data_root / samples.LIVECELL_DEMO)
    assert "CC BY-NC 4.0" in meta["metadata"]["licence"]


@pytest.mark.data
def test_timelapse_sample(data_root):
    if not (data_root / samples.TIMELAPSE / "frames").is_dir():
        pytest.skip(f"no T98G time-lapse in {data_root / samples.TIMELAPSE}")
    ((data, meta, kind),) = samples.timelapse()
    assert kind == "image" and data.shape == (8, 1022, 1024) and data.dtype == np.uint16
    assert meta["metadata"]["frames"][0].endswith("t01.tif") and meta["metadata"]["frames"][-1].endswith("t08.tif")
    made = layer((data, meta, kind))
    np.testing.assert_allclose(made.scale, (10.2, 0.87, 0.87))  # minutes between frames, µm per pixel
    assert [str(u) for u in made.units] == ["minute", "micrometer", "micrometer"] and made.axis_labels == ("t", "y", "x")


def test_timelapse_sample_without_data_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSEG_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*set CELLSEG_DATA"):
        samples.timelapse()
