"""A lab's own annotations read back as Samples: each format read, the project's own outputs round-trip
to the same cells, and bad files fail with errors that name them."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from cellseg.annotations import AnnotationError, read_annotated, scan_annotated
from cellseg.formats import geojson_bytes, imagej_roi_zip, qupath_geojson
from cellseg.instances import label_png_bytes
from cellseg.matching import iou_matrix, matching
from cellseg.outputs import coco_document, image_record
from conftest import disc

roifile = pytest.importorskip("roifile")
shapely = pytest.importorskip("shapely")
from roifile import ROI_TYPE, ImagejRoi, roiwrite  # noqa: E402

SHAPE = (120, 160)
LIVECELL_IMAGES = 3  # of the 5 validation images: enough cells (hundreds), seconds to run


def write_image(path, shape=SHAPE, seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def only_sample(folder):
    samples = read_annotated([folder])
    assert len(samples) == 1
    return samples[0]


def assert_same_cells(expected: np.ndarray, got: np.ndarray, what: str, min_iou: float = 0.95) -> None:
    """Equal cell counts and every cell matched one to one with IoU >= min_iou."""
    stats = matching(expected, got, thresholds=(min_iou,))[0]
    assert stats.n_true == stats.n_pred == stats.tp, (what, stats)


@pytest.fixture
def synthetic_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.int32)
    labels[disc(SHAPE, (30, 30), 14)] = 1
    labels[disc(SHAPE, (40, 60), 12) & ~disc(SHAPE, (30, 30), 14)] = 2  # touches cell 1, no overlap
    labels[disc(SHAPE, (60, 110), 22) & ~disc(SHAPE, (60, 110), 8)] = 3  # a cell with a hole
    labels[90:100, 10:20] = 4  # a cell of two pieces
    labels[105:115, 30:45] = 4
    labels[80:110, 60:90] = 5
    return labels


def write_project_outputs(labels: np.ndarray, image_path, folder) -> dict:
    """The project's own outputs for one labelled image, each beside a copy of the image in its own
    folder (one annotation per image): {format: folder}."""
    stem, suffix = image_path.stem, image_path.suffix
    image = np.asarray(Image.open(image_path)) if suffix != ".tif" else None
    outputs = {
        "imagej-roi": (f"{stem}_RoiSet.zip", imagej_roi_zip(labels)),
        "qupath-geojson": (f"{stem}.geojson", geojson_bytes(qupath_geojson(labels))),
        "label-mask": (f"{stem}_masks.png", label_png_bytes(labels)),
    }
    record = image_record(image if image is not None else np.zeros(labels.shape, np.float32), labels, None,
                          name=image_path.name, source=image_path.name)
    outputs["coco-json"] = ("instances.coco.json", json.dumps(coco_document([record])).encode())
    folders = {}
    for fmt, (name, data) in outputs.items():
        folders[fmt] = folder / fmt
        folders[fmt].mkdir(parents=True)
        (folders[fmt] / image_path.name).write_bytes(image_path.read_bytes())
        (folders[fmt] / name).write_bytes(data)
    return folders


# --- round trips ------------------------------------------------------------------------------------


def test_project_outputs_round_trip_synthetic(synthetic_labels, tmp_path):
    write_image(tmp_path / "cells.png")
    for fmt, folder in write_project_outputs(synthetic_labels, tmp_path / "cells.png", tmp_path / "out").items():
        scan = scan_annotated([folder])
        labels = scan.samples[0].labels()
        assert scan.per_format() == {fmt: 1}
        assert labels.dtype == np.int32 and not labels.flags.writeable
        assert labels.max() == 5 and len(np.unique(labels)) == 6, fmt
        assert_same_cells(synthetic_labels, labels, fmt)
        # the outlines are exact: every cell comes back pixel for pixel
        assert iou_matrix(synthetic_labels, labels).max(axis=1).min() == 1.0, fmt


@pytest.mark.data
def test_project_outputs_round_trip_livecell(data_root, tmp_path):
    from cellseg.data import read_livecell

    for sample in read_livecell(data_root / "livecell", ("val",))[:LIVECELL_IMAGES]:
        truth = sample.labels()
        folders = write_project_outputs(truth, sample.image_path, tmp_path / sample.image_path.stem)
        for fmt, folder in folders.items():
            got = only_sample(folder)
            assert (got.height, got.width) == truth.shape and got.source == "lab"
            assert_same_cells(truth, got.labels(), f"{sample.id} {fmt}")
            assert np.array_equal(got.labels(), truth), f"{sample.id} {fmt}"  # in fact exact, numbering included
            assert len(got.rles) == truth.max()


@pytest.mark.data
def test_data_roots_read_as_read_any_does(data_root):
    from cellseg.data import read_any

    livecell = data_root / "livecell"
    mine, theirs = read_annotated([livecell]), read_any(livecell)
    assert [(s.id, s.image_path, s.cell_type) for s in mine] == [(s.id, s.image_path, s.cell_type) for s in theirs]
    assert np.array_equal(mine[0].labels(), theirs[0].labels())
    assert scan_annotated([data_root]).per_format() == {"livecell": 16, "sartorius": 487}


def test_data_roots_are_the_folders_read_any_reads(tmp_path):
    """One detection (cellseg.data.is_data_root, re-exported here) for read_any and the annotation reader."""
    import cellseg.annotations
    from cellseg.data import is_data_root

    assert cellseg.annotations.is_data_root is is_data_root
    layouts = {"livecell": "annotations/LIVECell/", "kaggle": "train.csv", "packed": "packed.json",
               "livecell-below": "livecell/annotations/LIVECell/", "sartorius-below": "sartorius/train.csv",
               "lab": "HeLa/a.png", "other-below": "other/train.csv"}
    for name, made in layouts.items():
        path = tmp_path / name / made
        if made.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True)
            path.write_bytes(b"")
    assert [name for name in layouts if is_data_root(tmp_path / name)] == [
        "livecell", "kaggle", "packed", "livecell-below", "sartorius-below"]


# --- ImageJ ROIs ------------------------------------------------------------------------------------


def polygon_roi(points, roitype=ROI_TYPE.POLYGON, name="") -> ImagejRoi:
    roi = ImagejRoi.frompoints(np.asarray(points), name=name)
    roi.roitype = roitype
    return roi


def box_roi(left, top, right, bottom, roitype=ROI_TYPE.RECT, name="") -> ImagejRoi:
    return ImagejRoi(roitype=roitype, left=left, top=top, right=right, bottom=bottom, name=name)


def composite_roi(rings, name="") -> ImagejRoi:
    """ImageJ's shape ROI: closed sub-paths (MOVETO x y, LINETO x y..., CLOSE), filled even-odd."""
    path = []
    for ring in rings:
        path += [0, *ring[0]]
        for x, y in ring[1:]:
            path += [1, x, y]
        path.append(4)
    xy = np.concatenate(rings)
    (left, top), (right, bottom) = xy.min(axis=0), xy.max(axis=0)
    return ImagejRoi(roitype=ROI_TYPE.RECT, name=name, shape_roi_size=len(path),
                     multi_coordinates=np.asarray(path, np.float32),
                     left=int(left), top=int(top), right=int(right), bottom=int(bottom))


def pixel_centres_in(geometry, shape=SHAPE) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return shapely.contains_xy(geometry, cols + 0.5, rows + 0.5)


def write_rois(folder, rois, name="cells_RoiSet.zip", image="cells.png"):
    folder.mkdir(exist_ok=True)
    write_image(folder / image)
    roiwrite(folder / name, rois, mode="w")
    return folder / name


def test_every_area_roi_type_is_filled_by_pixel_centres(tmp_path):
    from shapely.geometry import Polygon

    diamond = [(80.25, 10.5), (95.5, 25.0), (80.25, 39.5), (65.0, 25.0)]
    outer = np.array([[100, 10], [140, 10], [140, 50], [100, 50]], np.float32)
    hole = np.array([[110, 20], [130, 20], [130, 40], [110, 40]], np.float32)
    rois = [
        box_roi(10, 5, 30, 25, name="rectangle"),
        box_roi(10, 60, 40, 80, ROI_TYPE.OVAL, name="oval"),
        polygon_roi([[45, 5], [50, 5], [50, 20], [60, 20], [60, 25], [45, 25]], name="polygon"),  # an L
        polygon_roi(diamond, ROI_TYPE.FREEHAND, name="freehand"),  # sub-pixel vertices
        polygon_roi([[60, 90], [80, 90], [80, 110], [60, 110]], ROI_TYPE.TRACED, name="traced"),
        composite_roi([outer, hole], name="ring"),
        ImagejRoi(roitype=ROI_TYPE.LINE, x1=1, y1=1, x2=50, y2=50, name="a line"),
        polygon_roi([[5, 100], [9, 104]], ROI_TYPE.POINT, name="points"),
    ]
    write_rois(tmp_path, rois)
    scan = scan_annotated([tmp_path])
    labels = scan.samples[0].labels()
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    expected = np.zeros(SHAPE, np.int32)
    expected[5:25, 10:30] = 1
    expected[((yy + 0.5 - 70) / 10) ** 2 + ((xx + 0.5 - 25) / 15) ** 2 < 1] = 2
    expected[5:20, 45:50] = 3
    expected[20:25, 45:60] = 3
    expected[pixel_centres_in(Polygon(diamond))] = 4
    expected[90:110, 60:80] = 5
    expected[10:50, 100:140] = 6
    expected[20:40, 110:130] = 0
    assert np.array_equal(labels, expected)
    assert scan.images[0].not_cells == 2 and scan.images[0].cells == 6 and scan.images[0].overlap_pixels == 0


def test_single_roi_file_and_roi_partly_outside_is_clipped(tmp_path):
    write_image(tmp_path / "cells.tif")
    box_roi(-5, 100, 10, 130).tofile(tmp_path / "cells.roi")  # past the left and bottom edges
    scan = scan_annotated([tmp_path / "cells.tif"])
    expected = np.zeros(SHAPE, np.int32)
    expected[100:120, 0:10] = 1
    assert np.array_equal(scan.samples[0].labels(), expected)
    assert scan.images[0].clipped_cells == 1 and scan.per_format() == {"imagej-roi": 1}


def test_roi_wholly_outside_the_image_is_an_error(tmp_path):
    write_rois(tmp_path, [box_roi(10, 10, 20, 20, name="fine"), box_roi(200, 10, 220, 30, name="stray")])
    with pytest.raises(AnnotationError, match=r"cells_RoiSet\.zip: ROI 'stray' lies wholly outside the 160x120 image"):
        read_annotated([tmp_path])


def test_unreadable_roi_set_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "cells.png")
    (tmp_path / "cells.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AnnotationError, match=r"cells\.zip is not a readable ImageJ ROI set"):
        read_annotated([tmp_path])
    with zipfile.ZipFile(tmp_path / "cells.zip", "w") as archive:
        archive.writestr("cell-1.roi", b"Iout" + b"\0" * 10)
    with pytest.raises(AnnotationError, match=r"cells\.zip: cell-1\.roi is not a readable ImageJ ROI"):
        read_annotated([tmp_path])


def test_overlapping_rois_the_smaller_cell_wins_and_overlaps_are_counted(tmp_path):
    rois = [box_roi(0, 0, 40, 40, name="big"), box_roi(10, 10, 20, 20, name="inside big"),
            box_roi(50, 0, 70, 10, name="covered"),  # 200 px, covered by the next two (120 px each)
            box_roi(50, 0, 62, 10, name="left half"), box_roi(58, 0, 70, 10, name="right half")]
    write_rois(tmp_path, rois)
    scan = scan_annotated([tmp_path])
    labels, note = scan.samples[0].labels(), scan.images[0]
    assert (labels[10:20, 10:20] == 2).all() and (labels[:40, :40] == 1).sum() == 1600 - 100
    assert labels.max() == 4 and len(scan.samples[0].rles) == 4  # "covered" is gone, numbers stay 1..N
    assert (note.overlap_pixels, note.overlapping_cells, note.hidden_cells) == (100 + 200, 5, 1)
    assert "the smaller cell keeps them" in scan.summary() and "1 cell wholly covered" in scan.summary()


# --- QuPath GeoJSON ---------------------------------------------------------------------------------


def square(x0, y0, x1, y1) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry_type, coordinates, object_type="detection") -> dict:
    return {"type": "Feature", "geometry": {"type": geometry_type, "coordinates": coordinates},
            "properties": {"objectType": object_type}}


def test_geojson_polygons_with_holes_multipolygons_and_points(tmp_path):
    write_image(tmp_path / "cells.png")
    features = [
        feature("Point", [5, 5]),
        feature("MultiPolygon", [[square(10, 10, 20, 20)], [[*square(40, 10, 60, 30)], square(45, 15, 55, 25)]]),
        feature("Polygon", [square(100, 50, 120, 70)], "cell"),
        feature("Polygon", [square(0, 0, 160, 120)], "annotation"),  # the region the cells were detected in
        feature("LineString", [[0, 0], [10, 10]]),
    ]
    (tmp_path / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    scan = scan_annotated([tmp_path])
    labels = scan.samples[0].labels()
    expected = np.zeros(SHAPE, np.int32)
    expected[10:20, 10:20] = expected[10:30, 40:60] = 1
    expected[15:25, 45:55] = 0
    expected[50:70, 100:120] = 2
    assert np.array_equal(labels, expected)
    assert scan.images[0].not_cells == 3
    # a bare list of features (QuPath's "Export objects" without the collection) reads the same;
    # without detections, annotations are cells
    (tmp_path / "cells.geojson").write_text(json.dumps([feature("Polygon", [square(0, 0, 8, 8)], "annotation")]))
    assert only_sample(tmp_path).labels()[:8, :8].all()


def test_a_self_intersecting_outline_is_read_and_said_to_be_repaired(tmp_path):
    """A user's trial: a bow-tie polygon (an outline crossing itself) was taken without a word; it is
    made valid as before (two triangles, one cell), and the summary says so, to check in QuPath."""
    write_image(tmp_path / "cells.png")
    bow_tie = [[10, 10], [30, 30], [30, 10], [10, 30], [10, 10]]
    features = [feature("Polygon", [bow_tie], "cell"), feature("Polygon", [square(60, 60, 80, 80)], "cell")]
    (tmp_path / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    scan = scan_annotated([tmp_path])
    assert scan.images[0].repaired_shapes == 1 and scan.images[0].cells == 2
    assert "1 outline invalid (crossing itself) and made valid" in scan.summary()


def test_unreadable_geojson_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "cells.png")
    (tmp_path / "cells.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(AnnotationError, match=r"cells\.geojson is not readable GeoJSON"):
        read_annotated([tmp_path / "cells.geojson"])


# --- label masks ------------------------------------------------------------------------------------


def test_label_mask_values_become_sequential_labels(tmp_path):
    write_image(tmp_path / "cells.tif")
    mask = np.zeros(SHAPE, np.uint16)
    mask[10:20, 10:20], mask[30:40, 30:40], mask[50:60, 50:60] = 300, 5, 17
    Image.fromarray(mask).save(tmp_path / "cells_labels.png")
    sample = only_sample(tmp_path)
    labels = sample.labels()
    assert labels[35, 35] == 1 and labels[55, 55] == 2 and labels[15, 15] == 3 and labels.max() == 3
    assert sample.id == "lab:cells.tif" and sample.cell_type == tmp_path.name


@pytest.mark.parametrize("problem, match", [
    ("size", r"cells_masks\.tif is 150x120 pixels but its image is 160x120"),
    ("fractions", r"cells_masks\.tif holds fractional"),
    ("negative", r"cells_masks\.tif holds negative values"),
    ("binary", r"cells_masks\.tif looks like a binary mask .* connected components would merge touching cells"),
])
def test_unusable_label_masks_are_refused(tmp_path, problem, match):
    import tifffile

    write_image(tmp_path / "cells.png")
    mask = np.zeros(SHAPE, np.float32 if problem == "fractions" else np.int16)
    mask[10:20, 10:20], mask[40:50, 40:50] = 1, 2
    if problem == "size":
        mask = mask[:, :150]
    elif problem == "fractions":
        mask[40:50, 40:50] = 2.5
    elif problem == "negative":
        mask[40:50, 40:50] = -1
    else:
        mask = (mask > 0).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "cells_masks.tif", mask)
    with pytest.raises(AnnotationError, match=match):
        read_annotated([tmp_path])


# --- COCO -------------------------------------------------------------------------------------------


def test_coco_json_with_images_folder(synthetic_labels, tmp_path):
    (tmp_path / "HeLa" / "images").mkdir(parents=True)
    write_image(tmp_path / "HeLa" / "images" / "a.png")
    record = image_record(np.zeros(SHAPE, np.float32), synthetic_labels, None, name="a.png", source="a.png")
    document = coco_document([record])
    document["annotations"][0]["iscrowd"] = 1  # a crowd region is not a cell
    (tmp_path / "HeLa" / "train.json").write_text(json.dumps(document))
    scan = scan_annotated([tmp_path])
    sample = scan.samples[0]
    assert (sample.id, sample.cell_type, scan.per_format()) == ("lab:HeLa/images/a.png", "HeLa", {"coco-json": 1})
    assert sample.labels().max() == 4 and scan.images[0].not_cells == 1
    document["images"][0]["file_name"] = "missing.png"
    (tmp_path / "HeLa" / "train.json").write_text(json.dumps(document))
    with pytest.raises(AnnotationError, match=r"train\.json names the image 'missing\.png'"):
        read_annotated([tmp_path / "HeLa" / "train.json"])


def test_a_coco_file_is_parsed_once(synthetic_labels, tmp_path, monkeypatch):
    """Found in a folder or named, a COCO file's JSON is parsed once: deciding it is COCO and reading it
    share the parse (LIVECell-sized files take seconds and gigabytes each time)."""
    write_image(tmp_path / "a.png")
    record = image_record(np.zeros(SHAPE, np.float32), synthetic_labels, None, name="a.png", source="a.png")
    (tmp_path / "cells.json").write_text(json.dumps(coco_document([record])))
    parses = []
    for name in ("load", "loads"):
        def counted(*args, original=getattr(json, name), **kwargs):
            parses.append(args[0])
            return original(*args, **kwargs)
        monkeypatch.setattr(json, name, counted)
    for paths in ([tmp_path], [tmp_path / "cells.json"]):
        parses.clear()
        assert read_annotated(paths)[0].labels().max() == synthetic_labels.max()
        assert len(parses) == 1, paths


# --- images, folders, reports -------------------------------------------------------------------------


def test_empty_annotations_are_valid_background(tmp_path):
    empty = np.zeros(SHAPE, np.int32)
    for name, data in [("a.zip", imagej_roi_zip(empty)), ("b.geojson", geojson_bytes(qupath_geojson(empty))),
                       ("c_masks.png", label_png_bytes(empty))]:
        write_image(tmp_path / f"{name[0]}.png")
        (tmp_path / name).write_bytes(data)
    samples = read_annotated([tmp_path])
    assert len(samples) == 3
    for sample in samples:
        assert sample.labels().shape == SHAPE and not sample.labels().any() and sample.rles == []


def test_folder_skips_unannotated_images_but_a_named_one_is_an_error(tmp_path):
    (tmp_path / "MCF7").mkdir()
    write_image(tmp_path / "MCF7" / "a.png")
    write_image(tmp_path / "MCF7" / "b.png")
    (tmp_path / "MCF7" / "a_masks.png").write_bytes(_one_cell())
    (tmp_path / "MCF7" / "orphan.geojson").write_text("[]")
    scan = scan_annotated([tmp_path])
    assert [(s.id, s.cell_type) for s in scan.samples] == [("lab:MCF7/a.png", "MCF7")]
    assert [(s.path.name, s.reason.split(" (")[0]) for s in scan.skipped] == [
        ("b.png", "no annotation beside it"), ("orphan.geojson", "annotation without its image")]
    assert "skipped 2 files" in scan.summary() and "b.png: no annotation beside it" in scan.summary()
    with pytest.raises(AnnotationError, match=r"b\.png has no annotation beside it: expected one of b_masks\.png"):
        read_annotated([tmp_path / "MCF7" / "b.png"])
    (tmp_path / "MCF7" / "a_masks.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no annotated images in .*\n  .*a\.png: no annotation beside it"):
        read_annotated([tmp_path])


def _one_cell() -> bytes:
    labels = np.zeros(SHAPE, np.int32)
    labels[20:30, 20:30] = 1
    return label_png_bytes(labels)


def test_two_annotations_for_one_image_are_an_error(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a_masks.png").write_bytes(_one_cell())
    (tmp_path / "a.geojson").write_text("[]")
    with pytest.raises(AnnotationError, match=r"a\.png has 2 annotations"):
        read_annotated([tmp_path])


# --- cellseg evaluate --data ---------------------------------------------------------------------------


def test_evaluate_on_a_folder_of_lab_annotations(model_path, synthetic_gray, tmp_path, capsys):
    from scipy import ndimage as ndi

    from cellseg.cli import main

    folder = tmp_path / "lab" / "discs"
    folder.mkdir(parents=True)
    Image.fromarray(synthetic_gray).save(folder / "a.png")
    labels, _ = ndi.label(synthetic_gray > 120)
    (folder / "a_masks.png").write_bytes(label_png_bytes(labels.astype(np.int32)))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(model_path), "--data", str(tmp_path / "lab"), "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 1 and result["n_cells"] == 3 and list(result["per_source"]) == ["lab"]
    assert result["split"] == "all"
    assert list(result["per_cell_type"]) == ["discs"] and result["annotations"]["per_format"] == {"label-mask": 1}
    assert "annotations: 1 image (1 label-mask), 3 cells" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(model_path), "--data", str(tmp_path / "lab"), "--split", "val"]) == 2
    assert "--split" in capsys.readouterr().err
    # a user's trial: no per-image figures outside --json; --per-image prints a line per image
    assert main(["evaluate", "--model", str(model_path), "--data", str(tmp_path / "lab"), "--per-image", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("image "))
    row = printed[header + 2].split()
    assert row[:3] == [result["per_image"][0]["id"], "discs", "3"] and "mSA" in printed[header]
    assert float(row[5]) == pytest.approx(result["per_image"][0]["msa"], abs=1e-3)


@pytest.mark.data
def test_evaluate_reads_data_roots_as_before(data_root):
    from cellseg.cli import evaluation_samples
    from cellseg.data import load_split

    samples, split, report = evaluation_samples(data_root, None)  # no --split: the project's validation split
    assert split == "val" and report is None and [s.id for s in samples] == [s.id for s in load_split(data_root, "val")]
