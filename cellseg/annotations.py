"""Annotations a lab already has, read as training and evaluation `Sample`s.

`read_annotated(paths)` takes image files, annotation files and folders (searched recursively) and
returns one `cellseg.data.Sample` per annotated image; `scan_annotated(paths)` returns the same
samples with a report (`AnnotationScan`: images read per format, skipped files and why, overlaps).

Formats, found per image ``X.tif|tiff|png|jpg|jpeg`` by the files beside it (names compared without
regard to case; one annotation per image: two are an error):

- label mask ``X_masks.tif|tiff|png`` (Cellpose's naming), ``X_cp_masks.png`` or ``X_labels.png|tif|tiff``:
  one whole number per cell, 0 = background, the image's size (8/16/32-bit, or float with whole values);
- ImageJ/Fiji ROI set ``X.zip`` or ``X_RoiSet.zip``, or one ROI ``X.roi``: polygon, freehand, traced,
  rectangle, oval and composite ROIs are cells;
- QuPath GeoJSON ``X.geojson`` ("Export objects": a FeatureCollection or a bare list of features):
  Polygon and MultiPolygon cells, holes kept; a cell object's ``geometry``, not its nucleus;
- COCO ``*.json`` (images + annotations, polygons or RLE), its images beside it or in ``images/``.

A folder that is a LIVECell or Kaggle data root (what `cellseg.data.read_any` reads) is read by
`read_any`, with the same samples.

Rules:
- Pixels: ImageJ and QuPath put the origin at the top-left *corner* of the first pixel, so pixel
  (row r, column c) is in a shape when its centre (c + 0.5, r + 0.5) is (ImageJ's and QuPath's own
  rule, and the one `cellseg.formats` writes with, so its ROI sets and GeoJSON read back exactly).
  Composite ROIs fill by the even-odd rule; an oval fills its inscribed ellipse; rounded corners of a
  rectangle ROI are ignored.
- Not cells, counted in the report: points, lines, angles and text ROIs; GeoJSON points and lines;
  COCO crowd regions; QuPath tiles and TMA cores, and QuPath *annotations* in a file that also holds
  detections or cells (they are the regions the cells were detected in); shapes too thin to hold a
  pixel centre.
- A shape partly outside the image is cut at the image edge (counted as clipped); a shape wholly
  outside is an error naming the file and the shape.
- Overlaps: where cells overlap, the smaller cell keeps the pixels (as `Sample.labels` does for
  LIVECell), so it does not vanish inside its neighbour; overlapping pixels and cells are counted, and
  a cell wholly covered by smaller ones is dropped and counted.
- Label masks: refused when their size differs from the image's, when they hold negative or
  fractional values, colour, or when they look binary (one value over several separate blobs):
  instance labels are needed, and connected components would merge touching cells.
- An annotation holding no cells is valid: the image teaches background (all-zero labels).
- An image in a folder with no annotation beside it is skipped and reported; an image named
  explicitly without an annotation is an error. An annotation file without its image is reported.
- A COCO file naming an image that is not there is an error, and so is an image that both a COCO file
  and a file of its own annotate.
- A sample's `id` is ``lab:<path relative to the folder named>`` (``lab:<file name>`` for a file
  named explicitly; ``lab:<absolute path>`` where two images would share an id), its `source` is
  ``lab``, and its `cell_type` is the name of the folder that holds the image (a folder named
  ``images``, as in COCO layouts, gives its parent's name): put each cell type in its own folder.
  Its labels are built while reading (errors surface now, not mid-training) and its COCO RLEs are
  those labels' cells.
- Images go through the runtime's decoder and limits (`cellseg.imageio.read_image`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from cellseg.data import LIVECELL_SPLITS, Sample, _load_coco, is_data_root, read_any
from cellseg.imageio import IMAGE_SUFFIXES, ImageError, decode_image, read_image
from cellseg.rle import checked_counts, labels_to_coco_rles
from cellseg.targets import relabel_sequential

MASK_SUFFIXES = (".tif", ".tiff", ".png")  # lossless only: JPEG would blur label values
MASK_STEM_ENDINGS = ("_cp_masks", "_masks", "_labels")  # longest first: X_cp_masks is not image X_cp
ROI_ENDINGS = (".zip", "_roiset.zip", ".roi")
GEOJSON_ENDING = ".geojson"
MAX_ROI_BYTES = 64 * 2**20  # one ROI in a set; a real one is kilobytes, so more is a damaged (or hostile) zip
# Bounds that keep reading any annotation within memory and time. A LIVECell or Sartorius image holds
# at most a few thousand cells and its cells cover it about once; beyond these, a file is not cell
# outlines (a mask whose every pixel is its own label, hundreds of full-frame shapes).
MAX_CELLS_PER_IMAGE = 65_535  # as many as a 16-bit label image holds
MAX_COVERAGE = 64  # the cells' bounding boxes may cover the image at most this many times over
MAX_COORDINATE = 1e7  # |x|, |y| of any vertex, in pixels: beyond it a coordinate is damage, not an image

LABEL_MASK, IMAGEJ_ROI, QUPATH_GEOJSON, COCO_JSON = "label-mask", "imagej-roi", "qupath-geojson", "coco-json"
LAB_SOURCE = "lab"


class AnnotationError(ValueError):
    """An annotation (or its image) cannot be used; the message names the file."""


@dataclass
class AnnotatedImage:
    """What reading one image's annotation found (one line of the report)."""

    sample_id: str
    image: Path
    annotation: Path
    format: str
    cells: int = 0
    overlap_pixels: int = 0  # pixels claimed by more than one cell
    overlapping_cells: int = 0  # cells sharing pixels with another
    hidden_cells: int = 0  # wholly covered by smaller cells: not in the labels
    clipped_cells: int = 0  # reaching beyond the image edge: cut there
    not_cells: int = 0  # points, lines, text, crowd regions, QuPath regions around detections
    empty_shapes: int = 0  # too thin to hold a pixel centre
    repaired_shapes: int = 0  # invalid outlines (self-intersecting: a bow-tie) made valid by shapely


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class AnnotationScan:
    """Samples read, and the report: one `AnnotatedImage` per lab image, and the files skipped."""

    samples: list[Sample] = field(default_factory=list)
    images: list[AnnotatedImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def per_format(self) -> dict[str, int]:
        """Images read per format (data roots read by `read_any` count under their source)."""
        counts = Counter(image.format for image in self.images)
        counts.update(s.source for s in self.samples if s.source != LAB_SOURCE)
        return dict(sorted(counts.items()))

    def totals(self) -> dict[str, int]:
        keys = ("cells", "overlap_pixels", "overlapping_cells", "hidden_cells", "clipped_cells", "not_cells",
                "empty_shapes", "repaired_shapes")
        totals = {key: sum(getattr(image, key) for image in self.images) for key in keys}
        totals["images_with_overlaps"] = sum(image.overlap_pixels > 0 for image in self.images)
        return totals

    def as_dict(self) -> dict:
        """JSON-ready report."""
        return {"per_format": self.per_format(), "totals": self.totals(),
                "images": [{**asdict(i), "image": str(i.image), "annotation": str(i.annotation)} for i in self.images],
                "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped]}

    def summary(self) -> str:
        """A few lines for people: what was read, what was set aside and why."""
        formats = ", ".join(f"{n} {name}" for name, n in self.per_format().items())
        t = self.totals()
        lines = [f"annotations: {_count(len(self.samples), 'image')} ({formats})"
                 + (f", {_count(t['cells'], 'cell')} in lab annotations" if self.images else "")]
        if t["overlap_pixels"]:
            lines.append(f"  overlaps: {_count(t['overlapping_cells'], 'cell')} in {_count(t['images_with_overlaps'], 'image')} "
                         f"share {_count(t['overlap_pixels'], 'pixel')} (the smaller cell keeps them)"
                         + (f"; {_count(t['hidden_cells'], 'cell')} wholly covered by smaller ones dropped"
                            if t["hidden_cells"] else ""))
        notes = {"clipped_cells": ("cell", "cut at the image edge"),
                 "not_cells": ("shape", "not cells (points, lines, text, crowd or QuPath region annotations)"),
                 "empty_shapes": ("shape", "too thin to hold a pixel centre"),
                 "repaired_shapes": ("outline", "invalid (crossing itself) and made valid (shapely.make_valid): "
                                                "check them in QuPath")}
        lines += [f"  {_count(t[key], noun)} {text}" for key, (noun, text) in notes.items() if t[key]]
        if self.skipped:
            lines.append(f"  skipped {_count(len(self.skipped), 'file')}:")
            lines += [f"    {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def read_annotated(paths: Sequence[Path | str], livecell_splits: tuple[str, ...] = LIVECELL_SPLITS) -> list[Sample]:
    """One `Sample` per annotated image under `paths` (files or folders); see the module docstring."""
    return scan_annotated(paths, livecell_splits).samples


def scan_annotated(paths: Sequence[Path | str], livecell_splits: tuple[str, ...] = LIVECELL_SPLITS) -> AnnotationScan:
    """`read_annotated`'s samples with the report. Raises `AnnotationError` (a ValueError) naming the file
    for unusable annotations, FileNotFoundError for missing paths or when nothing annotated is found."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    scan = _Scan()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir() and is_data_root(path):
            scan.add_data_root(read_any(path, livecell_splits))
        elif path.is_dir():
            scan.add_folder(path)
        else:
            scan.add_file(path)
    if not scan.result.samples:
        skipped = "".join(f"\n  {s.path}: {s.reason}" for s in scan.result.skipped)
        raise FileNotFoundError(f"no annotated images in {', '.join(map(str, paths))}: give images with their label masks "
                                f"(X_masks.png), Fiji ROI sets (X_RoiSet.zip) or QuPath GeoJSON (X.geojson){skipped}")
    return scan.result


# --- finding images and their annotations ---------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and mask_image_stem(path) is None


def mask_image_stem(path: Path) -> str | None:
    """The image stem a label-mask file belongs to (``X`` for ``X_masks.png``), else None."""
    if path.suffix.lower() not in MASK_SUFFIXES:
        return None
    stem = path.stem
    for ending in MASK_STEM_ENDINGS:
        if stem.lower().endswith(ending) and len(stem) > len(ending):
            return stem[: -len(ending)]
    return None


def annotation_image_stem(path: Path) -> tuple[str, str] | None:
    """(image stem, format) of a per-image annotation file, else None."""
    name = path.name.lower()
    if (stem := mask_image_stem(path)) is not None:
        return stem, LABEL_MASK
    for ending in (GEOJSON_ENDING, *sorted(ROI_ENDINGS, key=len, reverse=True)):
        if name.endswith(ending) and len(name) > len(ending):
            return path.name[: -len(ending)], QUPATH_GEOJSON if ending == GEOJSON_ENDING else IMAGEJ_ROI
    return None


def _annotation_names(stem: str) -> list[tuple[str, str]]:
    """(lower-case file name, format) of every annotation an image with this stem may have."""
    stem = stem.lower()
    masks = [(f"{stem}{ending}{ext}", LABEL_MASK) for ending in MASK_STEM_ENDINGS for ext in MASK_SUFFIXES]
    rois = [(f"{stem}{ending}", IMAGEJ_ROI) for ending in ROI_ENDINGS]
    return [*masks, *rois, (f"{stem}{GEOJSON_ENDING}", QUPATH_GEOJSON)]


def folder_index(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()}


def _annotations_beside(image: Path, index: dict[str, Path]) -> list[tuple[Path, str]]:
    return [(index[name], fmt) for name, fmt in _annotation_names(image.stem) if name in index]


def _cell_type(image: Path) -> str:
    folder = image.parent
    return folder.parent.name if folder.name.lower() == "images" else folder.name


def _expected_names(image: Path) -> str:
    return f"{image.stem}_masks.png, {image.stem}.zip, {image.stem}_RoiSet.zip, {image.stem}.roi, {image.stem}.geojson"


class _Scan:
    """Collects samples and the report while paths are read; every image is read once."""

    def __init__(self) -> None:
        self.result = AnnotationScan()
        self.done: set[Path] = set()
        self.ids: set[str] = set()

    def add_data_root(self, samples: list[Sample]) -> None:
        self.result.samples += samples
        self.ids.update(s.id for s in samples)

    def add_folder(self, folder: Path) -> None:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_hidden(p.relative_to(folder)))
        coco_images = {}
        for json_path in (p for p in files if p.suffix.lower() == ".json"):
            if (dataset := _coco_dataset(json_path)) is None:
                continue
            for image in self.add_coco(json_path, dataset, folder):
                coco_images[image] = json_path
        used: set[Path] = set()
        indexes: dict[Path, dict[str, Path]] = {}
        for image in filter(_is_image_name, files):
            index = indexes.setdefault(image.parent, folder_index(image.parent))
            found = _annotations_beside(image, index)
            if image.resolve() in coco_images and found:
                raise AnnotationError(f"{image} has two annotations: {coco_images[image.resolve()]} and {found[0][0]}")
            used.update(path for path, _ in found)
            if image.resolve() in coco_images:
                continue
            if not found:
                self.result.skipped.append(SkippedFile(image, f"no annotation beside it ({_expected_names(image)}, "
                                                              "or a COCO JSON naming it)"))
                continue
            self.add_image(image, _only_annotation(image, found), folder)
        for orphan in (p for p in files if annotation_image_stem(p) and p not in used):
            stem = annotation_image_stem(orphan)[0]
            self.result.skipped.append(SkippedFile(orphan, f"annotation without its image ({stem}.tif, .png, ...) beside it"))

    def add_file(self, path: Path) -> None:
        if path.suffix.lower() == ".json":
            if (dataset := _coco_dataset(path)) is None:
                raise AnnotationError(f"{path} is not a COCO annotation file (it needs 'images' and 'annotations')")
            self.add_coco(path, dataset, path.parent)
            return
        index = folder_index(path.parent)
        if _is_image_name(path):
            found = _annotations_beside(path, index)
            if not found:
                raise AnnotationError(f"{path} has no annotation beside it: expected one of {_expected_names(path)}")
            self.add_image(path, _only_annotation(path, found), path.parent)
            return
        if (stem_format := annotation_image_stem(path)) is None:
            raise AnnotationError(f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor an annotation file")
        stem = stem_format[0]
        images = images_named(stem, index)
        if len(images) != 1:
            problem = "no image" if not images else f"{len(images)} images ({', '.join(p.name for p in images)})"
            raise AnnotationError(f"{path}: {problem} named {stem}{{{','.join(IMAGE_SUFFIXES)}}} beside it")
        self.add_image(images[0], _only_annotation(images[0], _annotations_beside(images[0], index)), path.parent)

    def add_image(self, image: Path, annotation: tuple[Path, str], base: Path) -> None:
        if image.resolve() in self.done:
            return
        path, fmt = annotation
        height, width = _image_size(image)
        note = AnnotatedImage(self.new_id(image, base), image, path, fmt)
        if fmt == LABEL_MASK:
            labels = read_label_mask(path, (height, width))
            note.cells = int(labels.max(initial=0))
        else:
            reader = read_roi_set if fmt == IMAGEJ_ROI else read_geojson
            labels = paint_cells(reader(path, (height, width), note), (height, width), note)
        self.add_sample(image, labels, note)

    def add_coco(self, json_path: Path, dataset: dict, base: Path) -> list[Path]:
        """Samples of every image a COCO file (parsed as `dataset`) names; returns their resolved paths."""
        coco = _coco_index(json_path, dataset)
        orphans = sorted({str(a.get("image_id")) for a in coco.anns.values()} - {str(i) for i in coco.imgs})
        if orphans:
            raise AnnotationError(f"{json_path} has annotations of image_id {_printable(', '.join(orphans[:5]))}, which "
                                  "its 'images' list does not hold")
        read = []
        for image_id in sorted(coco.imgs):
            entry = coco.imgs[image_id]
            image = _coco_image_path(json_path, entry)
            read.append(image.resolve())
            if image.resolve() in self.done:
                continue
            height, width = _image_size(image)
            stated = entry.get("height", height), entry.get("width", width)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in stated):
                raise AnnotationError(f"{json_path}: the image {_printable(entry.get('file_name'))!r} has a height or width "
                                      f"that is not a whole number ({_printable(stated)})")
            if stated != (height, width):
                raise AnnotationError(f"{json_path} says {_printable(entry.get('file_name'))} is {stated[1]}x{stated[0]}, "
                                      f"but {image} is {width}x{height}")
            note = AnnotatedImage(self.new_id(image, base), image, json_path, COCO_JSON)
            cells = coco_cells(coco, image_id, height, width, json_path, note)
            self.add_sample(image, paint_cells(cells, (height, width), note), note)
        return read

    def add_sample(self, image: Path, labels: np.ndarray, note: AnnotatedImage) -> None:
        labels.flags.writeable = False  # Sample.labels() is shared by every caller
        height, width = labels.shape
        sample = Sample(note.sample_id, LAB_SOURCE, _cell_type(image), image, height, width,
                        lambda labels=labels: _bytes_rles(labels_to_coco_rles(labels)), labels)
        self.result.samples.append(sample)
        self.result.images.append(note)
        self.done.add(image.resolve())

    def new_id(self, image: Path, base: Path) -> str:
        """``lab:<path relative to the folder named>``; the absolute path where that is already taken."""
        sample_id = f"lab:{image.relative_to(base).as_posix()}"
        if sample_id in self.ids:
            sample_id = f"lab:{image.resolve().as_posix()}"
        self.ids.add(sample_id)
        return sample_id


def is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def _only_annotation(image: Path, found: list[tuple[Path, str]]) -> tuple[Path, str]:
    if len(found) > 1:
        raise AnnotationError(f"{image} has {len(found)} annotations ({', '.join(p.name for p, _ in found)}): "
                              "keep one, so it is clear which is meant")
    return found[0]


def images_named(stem: str, index: dict[str, Path]) -> list[Path]:
    """The images of a folder (`folder_index`) named `stem` + one of IMAGE_SUFFIXES, in that order: the
    image an annotation file `<stem>.zip`, `<stem>_masks.png`... belongs to (names compared without case)."""
    return [index[f"{stem.lower()}{ext}"] for ext in IMAGE_SUFFIXES if f"{stem.lower()}{ext}" in index]


def _image_size(image: Path) -> tuple[int, int]:
    """(height, width) of an image, decoded under the runtime's limits so that unusable images fail now."""
    try:
        return read_image(image).shape
    except ImageError as exc:
        raise AnnotationError(f"{image}: {exc}") from exc


def _bytes_rles(rles: list[dict]) -> list[dict]:
    """Sample.rles holds pycocotools' own form: counts as bytes."""
    return [{"size": rle["size"], "counts": rle["counts"].encode("ascii")} for rle in rles]


# --- cells to labels ------------------------------------------------------------------------------


Fill = Callable[[int, int, tuple[int, int]], np.ndarray]  # (top, left, window shape) -> mask


@dataclass
class Cell:
    """One annotated cell before painting: its pixel window (cut at the image edge) and how to fill it.
    Its pixels are made when asked, so a file's cells never all hold image-sized masks at once."""

    top: int
    left: int
    height: int
    width: int
    fill: Fill
    clipped: bool = False  # its shape reaches beyond the image edge

    def window(self) -> tuple[slice, slice]:
        return (slice(self.top, self.top + self.height), slice(self.left, self.left + self.width))

    def pixels(self) -> np.ndarray:
        return self.fill(self.top, self.left, (self.height, self.width))


def paint_cells(cells: Sequence[Cell], shape: tuple[int, int], note: AnnotatedImage) -> np.ndarray:
    """int32 labels 1..N in the annotation's order; where cells overlap the smaller one keeps the pixels
    (largest painted first). Overlaps and wholly covered cells are counted in `note`. Two passes over
    the cells, one cell's pixels at a time: memory stays at two image-sized arrays whatever the file
    holds, and time at the cells' windows, which MAX_COVERAGE bounds."""
    _check_cell_count(len(cells), note.annotation)
    windows = sum(cell.height * cell.width for cell in cells)
    if windows > MAX_COVERAGE * shape[0] * shape[1]:
        raise AnnotationError(f"{note.annotation}: its {len(cells):,} shapes cover the {shape[1]}x{shape[0]} image "
                              f"{windows / (shape[0] * shape[1]):,.0f} times over (at most {MAX_COVERAGE}): these are "
                              "not cell outlines")
    claims = np.zeros(shape, dtype=np.int32)
    kept, areas = [], []
    for cell in cells:
        pixels = cell.pixels()
        area = int(pixels.sum())
        if not area:
            note.empty_shapes += 1  # too thin to hold a pixel centre
            continue
        note.clipped_cells += cell.clipped
        claims[cell.window()] += pixels
        kept.append(cell)
        areas.append(area)
    shared = claims > 1
    del claims
    labels = np.zeros(shape, dtype=np.int32)
    note.overlapping_cells = 0
    for index in np.argsort(-np.array(areas, dtype=np.int64), kind="stable"):
        cell = kept[index]
        pixels = cell.pixels()
        labels[cell.window()][pixels] = index + 1
        note.overlapping_cells += bool(shared[cell.window()][pixels].any())
    note.overlap_pixels = int(shared.sum())
    labels = relabel_sequential(labels)
    note.cells = int(labels.max(initial=0))
    note.hidden_cells = len(kept) - note.cells
    return labels


def _check_cell_count(count: int, path: Path) -> None:
    if count > MAX_CELLS_PER_IMAGE:
        raise AnnotationError(f"{path}: {count:,} cells in one image, over the {MAX_CELLS_PER_IMAGE:,} an annotation "
                              "here may hold (a label image with that many values is not one cell per label)")


def rasterise(bounds: tuple[float, float, float, float], fill: Fill, shape: tuple[int, int], what: str,
              note: AnnotatedImage) -> Cell | None:
    """A shape with corner-origin `bounds` (x0, y0, x1, y1), whose pixel centres `fill` marks, as a
    Cell cut at the image edge. None (counted) for a shape too thin to hold a pixel centre; an error
    for one wholly outside the image or with coordinates that are not finite, sane numbers."""
    x0, y0, x1, y1 = bounds
    height, width = shape
    if not all(np.isfinite(v) and abs(v) <= MAX_COORDINATE for v in bounds):
        raise AnnotationError(f"{what} has a vertex at x {x0:g}..{x1:g}, y {y0:g}..{y1:g}: coordinates must be finite "
                              f"numbers within ±{MAX_COORDINATE:g} pixels")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise AnnotationError(f"{what} lies wholly outside the {width}x{height} image "
                              f"(x {x0:g}..{x1:g}, y {y0:g}..{y1:g})")
    # the pixels whose centres may lie inside: y0 < r + 0.5 < y1 and x0 < c + 0.5 < x1
    rows = (int(np.floor(y0 + 0.5)), int(np.ceil(y1 - 0.5)))
    cols = (int(np.floor(x0 + 0.5)), int(np.ceil(x1 - 0.5)))
    top, bottom = max(rows[0], 0), min(rows[1], height)
    left, right = max(cols[0], 0), min(cols[1], width)
    if bottom <= top or right <= left:
        note.empty_shapes += 1
        return None
    return Cell(top, left, bottom - top, right - left, fill, clipped=(top, bottom, left, right) != (*rows, *cols))


def fill_rings(rings: Sequence[np.ndarray]) -> Fill:
    """Even-odd fill of (x, y) corner-origin rings by pixel centres (ImageJ's rule for polygons and
    composite ROIs), by scanlines: each edge is crossed with the pixel-centre rows it spans and the
    crossings toggle the pixels to their right, so the time is the edges' rows plus the window's
    pixels, not vertices times pixels (a 1,000,000-vertex ROI fills in a second)."""
    rings = [r for r in (np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in rings) if len(r) >= 3]

    def fill(top: int, left: int, window: tuple[int, int]) -> np.ndarray:
        height, width = window
        toggles = np.zeros((height, width + 1), np.uint8)
        for ring in rings:
            x0, y0 = ring[:, 0], ring[:, 1]
            x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
            # rows r whose centre top + r + 0.5 lies in [min(y0, y1), max(y0, y1)): a vertex on a centre
            # row is counted once where the ring passes through it and twice (no change) at a turn
            first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5 - top), 0, height).astype(np.int64)
            stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5 - top), 0, height).astype(np.int64)
            spans = stop - first
            if not spans.sum():
                continue
            edge = np.repeat(np.arange(len(spans)), spans)
            rows = np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans) + first[edge]
            x = x0[edge] + (rows + top + 0.5 - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
            # the first pixel whose centre lies right of the crossing: c + left + 0.5 > x
            cols = np.clip(np.floor(x - 0.5 - left) + 1, 0, width).astype(np.int64)
            np.bitwise_xor.at(toggles, (rows, cols), 1)
        return np.bitwise_xor.accumulate(toggles, axis=1)[:, :width].astype(bool)

    return fill


def fill_ellipse(bounds: tuple[float, float, float, float]) -> Fill:
    """The ellipse inscribed in corner-origin `bounds`, by pixel centres (an ImageJ oval ROI)."""
    from skimage.draw import ellipse

    x0, y0, x1, y1 = bounds

    def fill(top: int, left: int, window: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(window, bool)
        if x1 > x0 and y1 > y0:
            rr, cc = ellipse((y0 + y1) / 2 - 0.5 - top, (x0 + x1) / 2 - 0.5 - left, (y1 - y0) / 2, (x1 - x0) / 2,
                             shape=window)
            mask[rr, cc] = True
        return mask

    return fill


def fill_geometry(geometry) -> Fill:
    """A valid shapely (Multi)Polygon (corner-origin) by pixel centres, as QuPath fills a GeoJSON
    polygon: the even-odd fill of its shells and holes (for a valid polygon, its interior)."""
    import shapely

    rings = [np.asarray(ring.coords) for ring in shapely.get_rings(shapely.get_parts(geometry)).tolist()]
    return fill_rings(rings)


def _ring_bounds(rings: Iterable[np.ndarray]) -> tuple[float, float, float, float]:
    xy = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings])
    if not len(xy):
        return (0.0, 0.0, 0.0, 0.0)
    (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
    return (float(x0), float(y0), float(x1), float(y1))


# --- label masks ----------------------------------------------------------------------------------


def read_label_mask(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    """int32 labels 1..N (in the order of the mask's values) from a label mask of the image's size
    (`shape`; None: a mask read on its own, of its own size)."""
    values = _decode_mask(path)
    shape = values.shape if shape is None else shape
    if values.shape != shape:
        raise AnnotationError(f"{path} is {values.shape[1]}x{values.shape[0]} pixels but its image is "
                              f"{shape[1]}x{shape[0]}: a label mask must match its image")
    if values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.round(values)).all()):
        raise AnnotationError(f"{path} holds fractional or non-finite values: a label mask needs whole numbers "
                              "(0 = background, one number per cell)")
    if values.dtype.kind in "if" and (values < 0).any():
        raise AnnotationError(f"{path} holds negative values: a label mask needs 0 for background and 1, 2, ... for cells")
    foreground = values != 0
    cell_values = np.unique(values[foreground])
    _check_cell_count(len(cell_values), path)
    if len(cell_values) == 1 and ndi.label(foreground)[1] > 1:
        raise AnnotationError(f"{path} looks like a binary mask (one value, {int(cell_values[0])}, over several separate "
                              "blobs): instance labels are needed, one value per cell, and connected components would "
                              "merge touching cells. Export a label image (Fiji: ROI Manager > Labels; QuPath: label "
                              "image export; Cellpose: _masks files)")
    labels = np.zeros(shape, dtype=np.int32)
    labels[foreground] = np.searchsorted(cell_values, values[foreground]) + 1
    return labels


def _decode_mask(path: Path) -> np.ndarray:
    """The mask's values, decoded under the runtime's limits; a palette PNG gives its indices (labels),
    and a colour image whose channels are equal gives one channel."""
    data = path.read_bytes()
    if not data.startswith((b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        raise AnnotationError(f"{path} is not a PNG or TIFF file (whatever its name): a label mask must be stored "
                              "losslessly, as a 16-bit PNG or a TIFF")
    try:
        values = decode_image(data)
    except ImageError as exc:
        raise AnnotationError(f"{path}: {exc}") from exc
    if values.dtype.kind not in "uif":
        raise AnnotationError(f"{path} holds {values.dtype} values: a label mask needs whole numbers")
    if values.ndim == 3 and values.shape[-1] in (3, 4):
        with Image.open(io.BytesIO(data)) as img:
            if img.mode == "P":
                return np.asarray(img)
        colour = values[..., :3]
        if (colour == colour[..., :1]).all():
            return colour[..., 0]
    if values.ndim == 3 and values.shape[-1] == 1:
        return values[..., 0]
    if values.ndim != 2:
        raise AnnotationError(f"{path} is a colour image of shape {values.shape}: a label mask has one channel "
                              "(a 16-bit PNG or TIFF with 0 = background and one number per cell)")
    return values


# --- ImageJ / Fiji ROIs ---------------------------------------------------------------------------


def read_roi_set(path: Path, shape: tuple[int, int], note: AnnotatedImage) -> list[Cell]:
    """Cells of an ImageJ ROI set (.zip) or single ROI (.roi), in the file's order."""
    cells = []
    for entry, roi in _read_rois(path):
        what = f"{path}: ROI '{_printable(roi.name or entry)}'"
        try:
            cell = _roi_cell(roi, shape, what, note)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            if isinstance(exc, AnnotationError):
                raise
            raise AnnotationError(f"{what}: cannot read its outline ({exc})") from exc
        if cell is not None:
            cells.append(cell)
    return cells


def _read_rois(path: Path) -> list[tuple[str, object]]:
    from roifile import ImagejRoi

    try:
        if path.suffix.lower() == ".roi":
            return [(path.name, ImagejRoi.fromfile(path))]
        rois = []
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or not info.filename.lower().endswith(".roi") or is_hidden(Path(info.filename)):
                    continue
                name = _printable(info.filename)
                if info.file_size > MAX_ROI_BYTES:
                    raise AnnotationError(f"{path}: {name} is {info.file_size:,} bytes, not an ImageJ ROI")
                with archive.open(info) as entry:  # the header's size may lie: read no more than the limit
                    data = entry.read(MAX_ROI_BYTES + 1)
                if len(data) > MAX_ROI_BYTES:
                    raise AnnotationError(f"{path}: {name} inflates past {MAX_ROI_BYTES:,} bytes, not an ImageJ ROI")
                rois.append((info.filename, _roi_from_bytes(data, path, name)))
        return rois
    except AnnotationError:
        raise
    except Exception as exc:  # zipfile, struct and roifile raise many types for damaged files
        raise AnnotationError(f"{path} is not a readable ImageJ ROI set or ROI ({type(exc).__name__}: {exc})") from exc


def _roi_from_bytes(data: bytes, path: Path, entry: str):
    from roifile import ImagejRoi

    try:
        return ImagejRoi.frombytes(data)
    except Exception as exc:
        raise AnnotationError(f"{path}: {entry} is not a readable ImageJ ROI ({exc})") from exc


def _roi_cell(roi, shape: tuple[int, int], what: str, note: AnnotatedImage) -> Cell | None:
    from roifile import ROI_SUBTYPE, ROI_TYPE

    if roi.subtype in (ROI_SUBTYPE.TEXT, ROI_SUBTYPE.ARROW, ROI_SUBTYPE.IMAGE):
        note.not_cells += 1
        return None
    if roi.composite:
        rings = roi.coordinates(multi=True)  # absolute image coordinates, every ring (not only the longest)
        return rasterise(_ring_bounds(rings), fill_rings(rings), shape, what, note)
    if roi.roitype in (ROI_TYPE.RECT, ROI_TYPE.OVAL):
        bounds = ((roi.xd, roi.yd, roi.xd + roi.widthd, roi.yd + roi.heightd) if roi.subpixelrect
                  else (roi.left, roi.top, roi.right, roi.bottom))
        x0, y0, x1, y1 = map(float, bounds)
        fill = fill_ellipse(bounds) if roi.roitype == ROI_TYPE.OVAL else fill_rings(
            [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])])
        return rasterise((x0, y0, x1, y1), fill, shape, what, note)
    if roi.roitype in (ROI_TYPE.POLYGON, ROI_TYPE.FREEHAND, ROI_TYPE.TRACED):
        ring = np.asarray(roi.coordinates(), dtype=np.float64)  # roifile adds left/top to integer vertices
        return rasterise(_ring_bounds([ring]), fill_rings([ring]), shape, what, note)
    note.not_cells += 1  # lines, polylines, angles, points: no area
    return None


# --- QuPath GeoJSON -------------------------------------------------------------------------------

QUPATH_CELL_OBJECTS = {"detection", "cell"}
QUPATH_OBJECT_TYPES = {"annotation", *QUPATH_CELL_OBJECTS}
# QuPath 0.2 wrote no objectType; the feature's id named the object's class
QUPATH_LEGACY_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                     "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core"}


def read_geojson(path: Path, shape: tuple[int, int], note: AnnotatedImage) -> list[Cell]:
    """Cells of a QuPath GeoJSON export: the polygonal features (a cell's `geometry`, not its nucleus)."""
    features = _geojson_features(path)
    types = [_object_type(f) for f in features]
    # QuPath exports the annotation a lab drew around an area together with the cells detected in it
    annotations_are_regions = bool(QUPATH_CELL_OBJECTS & set(types))
    cells = []
    for number, (feature, object_type) in enumerate(zip(features, types), start=1):
        geometry, repaired = _polygonal(feature, path, number)
        note.repaired_shapes += repaired
        is_region = object_type == "annotation" and annotations_are_regions
        if geometry is None or is_region or object_type not in QUPATH_OBJECT_TYPES:
            note.not_cells += 1
            continue
        what = f"{path}: feature {_printable(feature.get('id') or number)}"
        cell = rasterise(tuple(geometry.bounds), fill_geometry(geometry), shape, what, note)
        if cell is not None:
            cells.append(cell)
    return cells


def _object_type(feature: dict) -> str:
    """QuPath's object type of a feature; "annotation" for GeoJSON from other tools (every shape a cell)."""
    properties = feature.get("properties") or {}
    if "objectType" in properties:
        return str(properties["objectType"]).lower()
    return QUPATH_LEGACY_IDS.get(str(feature.get("id")), "annotation")


def _geojson_features(path: Path) -> list[dict]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path} is not readable GeoJSON ({exc})") from exc
    except RecursionError:
        raise AnnotationError(f"{path}: its JSON is nested too deeply to be GeoJSON") from None
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        document = document.get("features")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        document = [document]
    if not isinstance(document, list) or not all(isinstance(f, dict) for f in document):
        raise AnnotationError(f"{path} is not a GeoJSON FeatureCollection or list of features")
    return document


def _polygonal(feature: dict, path: Path, number: int):
    """(The feature's area as a valid (Multi)Polygon, or None where it has none (point, line, null);
    whether its outline was invalid and had to be made valid)."""
    import shapely
    from shapely.geometry import shape as to_shape

    if not feature.get("geometry"):
        return None, False
    what = f"{path}: feature {_printable(feature.get('id') or number)}"
    try:
        geometry = to_shape(feature["geometry"])
        coordinates = shapely.get_coordinates(geometry)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise AnnotationError(f"{what} has an unreadable geometry ({_printable(str(exc))})") from exc
    if not np.isfinite(coordinates).all() or (coordinates.size and np.abs(coordinates).max() > MAX_COORDINATE):
        raise AnnotationError(f"{what}: coordinates must be finite numbers within ±{MAX_COORDINATE:g} pixels")
    repaired = not geometry.is_valid
    if repaired:
        geometry = shapely.make_valid(geometry)
    polygons = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not polygons:
        return None, repaired  # a point, a line, or an empty polygon: no area, not a cell
    return shapely.union_all(polygons), repaired


# --- COCO JSON ------------------------------------------------------------------------------------


def _coco_dataset(path: Path) -> dict | None:
    """The file's JSON where it is an object with images and annotations (a COCO dataset), else None.
    Parsed once, and only when its first 64 KiB name either key: other JSON files, however big, are not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        if b'"images"' not in head and b'"annotations"' not in head:
            return None
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    except RecursionError:
        raise AnnotationError(f"{path}: its JSON is nested too deeply to be an annotation file") from None
    return document if isinstance(document, dict) and "images" in document and "annotations" in document else None


def _coco_index(path: Path, dataset: dict):
    """pycocotools' index of the dataset parsed from `path` (which names the file in errors)."""
    try:
        return _load_coco(dataset)
    except Exception as exc:  # KeyError, TypeError... from a malformed dataset
        raise AnnotationError(f"{path} is not a readable COCO annotation file ({type(exc).__name__}: {exc})") from exc


def _coco_image_path(json_path: Path, entry: dict) -> Path:
    """An image a COCO file names, beside the file or in images/ beside it (by its path, then its name)."""
    name = Path(str(entry.get("file_name", "")))
    folder = json_path.parent
    if name.is_absolute() or ".." in name.parts:
        raise AnnotationError(f"{json_path} names the image {_printable(str(name))!r}: a COCO file_name must be a path "
                              "inside the file's folder (no absolute path, no '..')")
    for candidate in (folder / name, folder / "images" / name, folder / name.name, folder / "images" / name.name):
        if name.name and candidate.is_file():
            return candidate
    raise AnnotationError(f"{json_path} names the image {str(name)!r}, which is neither beside it nor in "
                          f"{folder / 'images'}")


def coco_cells(coco, image_id: int, height: int, width: int, json_path: Path, note: AnnotatedImage) -> list[Cell]:
    """Cells of one image of a COCO dataset (crowd regions are not cells), each checked first."""
    from pycocotools import mask as mask_utils

    ann_ids = coco.getAnnIds(imgIds=[image_id], iscrowd=None)
    _check_cell_count(len(ann_ids), json_path)
    cells = []
    for ann_id in ann_ids:
        annotation = coco.anns[ann_id]
        if annotation.get("iscrowd"):
            note.not_cells += 1
            continue
        rle = coco_rle(annotation, height, width, f"{json_path}: annotation {_printable(ann_id)}")
        x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
        if not w or not h:
            note.empty_shapes += 1
            continue

        def fill(top: int, left: int, window: tuple[int, int], rle=rle) -> np.ndarray:
            return mask_utils.decode(rle)[top : top + window[0], left : left + window[1]].astype(bool)

        cells.append(Cell(y, x, h, w, fill))
    return cells


def coco_rle(annotation: dict, height: int, width: int, what: str) -> dict:
    """The annotation's mask as a compressed RLE of the image's size, after checking that it is one:
    pycocotools trusts its input (a NaN vertex or a 100000x100000 RLE exhausts memory, corrupt counts
    write past the mask)."""
    from pycocotools import mask as mask_utils

    segmentation = annotation.get("segmentation")
    usage = "a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE {size, counts}"
    if isinstance(segmentation, list) and segmentation and all(isinstance(poly, list) for poly in segmentation):
        for poly in segmentation:
            try:
                values = np.asarray(poly, dtype=np.float64)
            except (TypeError, ValueError):
                raise AnnotationError(f"{what}: a polygon holds something other than numbers") from None
            if values.ndim != 1 or len(values) < 6 or len(values) % 2:
                raise AnnotationError(f"{what}: a polygon needs an even count of at least 6 numbers (3 x, y points), "
                                      f"got {values.size}")
            if not np.isfinite(values).all() or np.abs(values).max() > MAX_COORDINATE:
                raise AnnotationError(f"{what}: polygon coordinates must be finite numbers within ±{MAX_COORDINATE:g}")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        try:
            counts = checked_counts(segmentation, height, width)
        except ValueError as exc:
            raise AnnotationError(f"{what}: {exc}") from None
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    raise AnnotationError(f"{what} has no usable segmentation ({_printable(segmentation)}): give {usage}")


def _printable(value, limit: int = 80) -> str:
    """A value from a file, safe to print: escapes (ANSI, newlines) shown as such, cut at `limit`."""
    text = repr(value) if not isinstance(value, str) else value
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# is_data_root is cellseg.data's, re-exported (scan_annotated hands such folders to read_any)
__all__ = ["read_annotated", "scan_annotated", "is_data_root", "AnnotationScan", "AnnotatedImage", "SkippedFile",
           "AnnotationError", "read_label_mask", "read_roi_set", "read_geojson"]
