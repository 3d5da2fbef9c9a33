"""napari reader and writers (npe2 contributions in napari.yaml) for cell outlines and label images.

Reader (`get_reader`): opens as a labels layer
- label images ``X_masks.png|tif|tiff``, ``X_cp_masks.png`` (Cellpose) and ``X_labels.png|tif|tiff``:
  one whole number per cell, read by `cellseg.annotations.read_label_mask` (its checks: no colour, no
  fractions, no binary masks); the label image's own size;
- Fiji/ImageJ ROI sets (``.zip`` of ``.roi``) and single ROIs (``.roi``), and QuPath / cellseg GeoJSON
  (``.geojson``), rasterised by `cellseg.annotations` exactly as training and evaluation read them (pixel
  centres, overlaps to the smaller cell, limits against hostile files). Their size: the image beside
  them with the same stem (``X.tif`` for ``X.zip``, ``X_RoiSet.zip``, ``X.roi`` or ``X.geojson``; the
  lookup `cellseg.annotations` does) where there is one, else the outlines' extent from the origin (the
  cells keep their pixel positions, only the bottom/right margin without cells is missing); the layer's
  ``metadata["size_from"]`` says which.
A ``.zip`` that opens and holds no ``.roi`` is not ours (None: napari tries other readers); an empty zip
is an ROI set of no cells (what `cellseg segment` writes for an image without cells). Cells are numbered
1..N in the file's order (`paint_cells` renumbers), so a set written from labels 1..N reads back as
the same labels. Damaged files raise `AnnotationError` (a ValueError) whose message names the file.

Writers (`write_roi_set`, `write_geojson`): a 2-D labels layer as the very bytes `cellseg segment` writes
for those labels (`cellseg.outputs.per_image_files`). The GeoJSON's measurements are the cells' shape
measurements (no intensity image or network scores reach a writer, so no ``mean_intensity``/``score``),
plus µm values where the layer's scale is in a length unit. A (T, Y, X) time-lapse is written one file
per frame, named as batch jobs name frames (``X_t0000.zip``...): `cellseg.annotations` reads no ROI
positions, so one file per frame is what reads back.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.annotations import (
    GEOJSON_ENDING,
    IMAGEJ_ROI,
    LABEL_MASK,
    MAX_COORDINATE,
    QUPATH_GEOJSON,
    AnnotatedImage,
    AnnotationError,
    annotation_image_stem,
    folder_index,
    images_named,
    is_hidden,
    mask_image_stem,
    paint_cells,
    read_geojson,
    read_label_mask,
    read_roi_set,
)
from cellseg.imageio import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageError, read_image
from cellseg.napari_plugin import engine

LayerData = tuple[Any, dict, str]
PathOrPaths = str | list[str]

# While outlines are rasterised without an image, the frame is as large as a coordinate may be; the
# label image is then cut to the cells' extent, which must stay within what an image may hold
UNBOUNDED = (int(MAX_COORDINATE) + 1, int(MAX_COORDINATE) + 1)
FORMAT_NAMES = {LABEL_MASK: "label image", IMAGEJ_ROI: "ROI set", QUPATH_GEOJSON: "GeoJSON"}


# --- reader ---------------------------------------------------------------------------------------


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """npe2 reader: `read_labels` where every path is a file this module reads, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(file_format(Path(p)) for p in paths):
        return None
    return read_labels


def read_labels(path: PathOrPaths) -> list[LayerData]:
    """One labels layer per file (files are not stacked: each has its own cells and size)."""
    paths = [path] if isinstance(path, str) else list(path)
    return [read_labels_layer(Path(p)) for p in paths]


def file_format(path: Path) -> str | None:
    """LABEL_MASK, IMAGEJ_ROI or QUPATH_GEOJSON for a file this module reads, else None."""
    name = path.name.lower()
    if mask_image_stem(path) is not None:
        return LABEL_MASK
    if name.endswith(GEOJSON_ENDING):
        return QUPATH_GEOJSON
    if name.endswith(".roi") or (name.endswith(".zip") and _may_be_roi_set(path)):
        return IMAGEJ_ROI
    return None


def _may_be_roi_set(path: Path) -> bool:
    """A zip holding .roi entries, or none at all; a zip that does not open is claimed too, so that
    opening it says what is wrong rather than that no reader knows it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/") and not is_hidden(Path(n))]
    except (OSError, zipfile.BadZipFile, ValueError):
        return path.is_file()
    return not names or any(n.lower().endswith(".roi") for n in names)


def read_labels_layer(path: Path) -> LayerData:
    """A file as a labels layer; damage of any kind comes out as an AnnotationError naming the file."""
    fmt = file_format(path)
    if fmt is None:
        raise AnnotationError(f"{path} is not a label image, ImageJ ROI set or GeoJSON file cellseg reads")
    try:
        labels, metadata = _read_label_image(path) if fmt == LABEL_MASK else _read_outlines(path, fmt)
    except AnnotationError:
        raise
    except Exception as exc:  # the decoders raise many types; napari shows this message to the user
        raise AnnotationError(f"{path}: cannot be read as a {FORMAT_NAMES[fmt]} ({type(exc).__name__}: {exc})") from exc
    name = path.stem if fmt == LABEL_MASK else f"{path.stem} ({FORMAT_NAMES[fmt]})"
    return labels, {"name": name, "metadata": {"source": str(path), "format": fmt, **metadata}}, "labels"


def _read_label_image(path: Path) -> tuple[np.ndarray, dict]:
    labels = read_label_mask(path, None)  # no image beside it to match: the mask is its own size
    return labels, {"size_from": "the label image itself", "cells": int(labels.max(initial=0))}


def _read_outlines(path: Path, fmt: str) -> tuple[np.ndarray, dict]:
    """An ROI set or GeoJSON rasterised at its image's size, else at its outlines' extent."""
    image = image_beside(path)
    shape = _image_shape(image, path) if image else UNBOUNDED
    note = AnnotatedImage(path.name, image or path, path, fmt)
    cells = (read_roi_set if fmt == IMAGEJ_ROI else read_geojson)(path, shape, note)
    if image is None:
        shape = _extent(cells, path)
    labels = paint_cells(cells, shape, note)
    size_from = (f"image beside it: {image.name}" if image else
                 "outlines' extent from the origin (no image with the same stem beside it)")
    report = {k: v for k, v in asdict(note).items() if isinstance(v, int)}  # cells, overlaps, clipped...
    return labels, {"size_from": size_from, "image": str(image) if image else None, **report}


def image_beside(path: Path) -> Path | None:
    """The image an annotation file belongs to, as `cellseg.annotations` finds it: same stem, beside it
    (names compared without regard to case; the first of IMAGE_SUFFIXES where there are several)."""
    found = annotation_image_stem(path)
    images = images_named(found[0], folder_index(path.parent)) if found else []
    return images[0] if images else None


def _image_shape(image: Path, annotation: Path) -> tuple[int, int]:
    try:
        return read_image(image).shape
    except ImageError as exc:
        raise AnnotationError(f"{image}, the image beside {annotation.name} that gives its size: {exc}") from exc


def _extent(cells: list, path: Path) -> tuple[int, int]:
    """(height, width) from the origin to the cells' far edge, within the pixels an image may have."""
    if not cells:
        raise AnnotationError(f"{path} holds no cells, and no image with its stem beside it gives the label image's "
                              f"size: put the image ({', '.join(IMAGE_SUFFIXES)}) beside it")
    height = max(cell.top + cell.height for cell in cells)
    width = max(cell.left + cell.width for cell in cells)
    if height * width > DEFAULT_MAX_PIXELS:
        raise AnnotationError(f"{path}: its outlines reach {width:,}x{height:,} pixels, over the {DEFAULT_MAX_PIXELS:,} "
                              "an image may have: damaged coordinates, or put the image beside it")
    return height, width


# --- writers --------------------------------------------------------------------------------------


def write_roi_set(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: a labels layer as a Fiji ROI set, one ROI per cell named cell-<id>; a time-lapse's
    (T, Y, X) labels as one set per frame, named as `cellseg segment` names frames (X_t0003.zip)."""
    from cellseg.outputs import per_image_files

    return [_write(target, per_image_files(labels, {"page": frame}, ["rois"])["rois"])
            for target, labels, frame in frame_files(path, data, "an ImageJ ROI set")]


def write_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: a labels layer as QuPath detections with their shape measurements (in µm too
    where the layer's scale is in a length unit); a time-lapse's labels as one file per frame."""
    from cellseg.instances import measure_cells
    from cellseg.outputs import per_image_files
    from cellseg.pixelsize import add_physical_measurements

    scale = meta.get("scale")
    size = engine.layer_pixel_size(scale, meta.get("units")) if scale is not None and len(scale) >= 2 else None
    written = []
    for target, labels, _ in frame_files(path, data, "QuPath GeoJSON"):
        cells = add_physical_measurements(measure_cells(labels), size)
        written.append(_write(target, per_image_files(labels, {"cells": cells}, ["geojson"])["geojson"]))
    return written


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def frame_files(path: str, data: Any, what: str) -> list[tuple[Path, np.ndarray, int | None]]:
    """(file, 2-D labels, frame) to write: the one file for an image (frame None), or for a (T, Y, X)
    time-lapse one per frame beside it, <stem>_t0000<suffix>..., as a batch job names a stack's frames.
    Every frame is checked before any file is written."""
    from cellseg.batch import frame_name

    if isinstance(data, (list, tuple)):  # a multiscale layer: its full-resolution level
        data = data[0]
    array = np.asarray(data)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    target = Path(path)
    if array.ndim != 3:
        return [(target, labels_2d(array, what), None)]
    frames = [labels_2d(frame, what) for frame in array]
    return [(target.with_name(frame_name(target.stem, t, len(frames)) + target.suffix), labels, t)
            for t, labels in enumerate(frames)]


def labels_2d(data: Any, what: str) -> np.ndarray:
    """A labels layer's data as the int32 (Y, X) labels cellseg writes from; leading axes of length 1
    are dropped. Refuses (ValueError) a stack, negative or non-integer labels."""
    if isinstance(data, (list, tuple)):  # a multiscale layer: its full-resolution level
        data = data[0]
    labels = np.asarray(data)
    while labels.ndim > 2 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise ValueError(f"{what} holds the cells of 2-D images (a time-lapse: one file per frame); this labels "
                         f"layer is {labels.ndim}-D, shape {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"a labels layer of {labels.dtype} values: {what} needs whole-number cell ids")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"cell ids must be 0 (background) to {np.iinfo(np.int32).max:,}; this layer holds "
                         f"{labels.min()}..{labels.max()}")
    return labels.astype(np.int32, copy=False)
