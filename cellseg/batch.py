"""Batch segmentation of files, folders and globs, locally (ONNX Runtime) or against a server.

Outputs in --out DIR (--formats picks among labels, csv, coco, rois, geojson; default labels,csv,coco):
    labels/<name>.png      labels: 16-bit label image per input (0 = background, 1..N cells)
    cells.csv              csv: one row per cell of every image (regionprops definitions, cellseg.measure);
                           in µm too (area_um2, perimeter_um, axes, the size used) where an image's pixel size
                           is known: --pixel-size, else the image's metadata (cellseg/pixelsize.py); empty
                           where it is not
    instances.coco.json    coco: COCO detections/annotations of all cells (RLE masks, scores)
    rois/<name>.zip        rois: ImageJ/Fiji ROI set, one polygon per cell, named cell-<id>
    geojson/<name>.geojson geojson: QuPath detections with the cells' measurements
    records/<name>.json    always: per-image record (source, size, pixel_size, count, confluence, cells, instances;
                           a frame's also stack, frame, time_s)
    summary.csv            always: one row per image and frame (count, confluence, median cell area in px, and
                           in µm² where the pixel size is known)
    plots/<stem>_growth.png  always, per stack: cell count and confluence against frame or time
    series.json            where names place files in wells (cellseg/series.py): layouts matched, series, and
                           the files that fit none (segmented as single images, never guessed into a well)
    wells.csv, doubling.csv, plots/wells/, plots/plate_<plate>.png
                           where files are in wells: per well and time point over fields, doubling times,
                           growth curves and a plate overview (cellseg/wells.py)
    tracks/<series>/       with --track: tracks.csv, labels of track ids, CTC layout (cellseg/track_job.py)
    errors.json            inputs that could not be processed in the last run, with the reason
    job.json               the job's settings: model sha256, post-processing parameters, tta, pixel_size (the
                           --pixel-size given, or null: each image's metadata) (and server URL; with --server,
                           the model and parameters the server reports it used), and precision: which precision
                           ran (fp32 or int8), the file, the CPU and why (cellseg/precision.py)

Every file is written atomically (temp file + rename) and an image counts as done only once its
record exists, so a killed job resumes where it stopped: finished images are skipped, the rest
are redone, and the aggregate CSV/COCO files are rebuilt from the records at the end (streamed, a
record at a time, so a job's memory does not grow with its number of images). --formats is
not a setting: a format asked for later (or a deleted per-image file) is made from the records of
the images already done, without running the network again (a record holds every cell's mask, from
which the label image is rebuilt exactly). A re-run with other settings (another model, other
parameters) into the same folder is refused unless --overwrite is given, so one folder never mixes
results of two settings. Files under the output folder are never taken as inputs, nor are annotation
masks (X_masks.*, Cellpose's naming) that a folder or glob finds or that are named beside their image;
the summary line counts them.

A multi-page TIFF is a time-lapse stack whose pages are its frames (plain multi-page TIFF, ImageJ
hyperstack, OME-TIFF; a stack of Z-slices or channels is refused): each frame is an image of its
own named <stem>_t0000, <stem>_t0001, ... (0-based, zero-padded to 4 digits), with its own outputs
and record, so a killed job resumes mid-stack. Every frame has the stack's pixel size: --pixel-size,
else the one the stack file's metadata states.

A bad input is reported in errors.json and skipped (exit status 3). A write that fails (disk full,
quota, read-only folder, permissions) stops the job instead, since every later image would fail
too: exit status 4 and one message naming the file and the reason. No half-written file stays,
finished images are kept, and the same command resumes once the cause is fixed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellseg.client import ServiceUnreachable
from cellseg.imageio import IMAGE_SUFFIXES, ImageError, StackInfo, read_frame, read_image, stack_info, to_grayscale
from cellseg.instances import labels_from_instances
from cellseg.outputs import (
    COCO_CATEGORIES,
    COCO_INFO,
    FORMATS,
    cells_csv_header,
    cells_csv_rows,
    coco_annotations,
    coco_image,
    image_record,
    per_image_files,
)
from cellseg.pixelsize import PixelSize, read_pixel_size
from cellseg.postprocess import PostprocessParams
from cellseg.series_items import SeriesOptions, place_in_series
from cellseg.summary import growth_plot_png, stack_rows, summary_csv, summary_row
from cellseg.well_outputs import write_well_outputs

DEFAULT_FORMATS = ("labels", "csv", "coco")
# Per-image files of each per-image format: folder and suffix under --out.
PER_IMAGE_FILES = {"labels": ("labels", ".png"), "rois": ("rois", ".zip"), "geojson": ("geojson", ".geojson")}


class OutputWriteError(OSError):
    """A file of the job's outputs could not be written (disk full, over quota, read-only, no
    permission, I/O error). Its `filename` is the output file, not the temp file beside it."""


class AtomicFile:
    """A file written under a temp name beside `path`, fsynced and renamed over `path` when the `with`
    block ends normally, removed when anything stops it (a full disk, an error, a kill signal turned
    exception): no half-written file stays. An OSError of its own writes comes out as an
    OutputWriteError naming `path`; other errors of the block pass through unchanged."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._fh = None

    def __enter__(self) -> AtomicFile:
        with self._as_write_error():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.tmp, "wb")  # noqa: SIM115  (closed in __exit__)
        return self

    def write(self, data: bytes) -> None:
        with self._as_write_error():
            self._fh.write(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                with self._as_write_error():
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                    self._fh.close()
                    os.replace(self.tmp, self.path)
        finally:
            if not self._fh.closed:
                with contextlib.suppress(OSError):  # the error that stopped us is the one to report
                    self._fh.close()
            _remove_quietly(self.tmp)  # nothing there after the rename; else the half-written file

    @contextlib.contextmanager
    def _as_write_error(self) -> Iterator[None]:
        try:
            yield
        except OutputWriteError:
            raise
        except OSError as exc:
            raise OutputWriteError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` in one step (see AtomicFile)."""
    with AtomicFile(path) as fh:
        fh.write(data)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # the error that made us clean up is the one to report
        path.unlink(missing_ok=True)


class JobError(ValueError):
    """The job cannot start: its output folder is unusable or holds results of other settings."""


# Settings that came after jobs were first recorded, with the value a job.json without them meant:
# a job of an earlier version read no pixel size, as a job without --pixel-size reads none of its own.
SETTINGS_ADDED_LATER = {"pixel_size": None}


# Recorded for people, not compared: why the precision was chosen holds timings of this run's check.
# The file that ran (model_sha256) is compared, so a resumed job never mixes fp32 and int8 results.
NOT_COMPARED = ("precision",)


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in {**SETTINGS_ADDED_LATER, **settings}.items() if k not in NOT_COMPARED}


def _differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """'params.min_size: 20 then, 5000 now' for each setting that differs (inside dicts: the keys that do)."""
    lines = []
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: {old!r} then, {new!r} now")
    return lines


@contextlib.contextmanager
def only_job_in(out: Path) -> Iterator[None]:
    """Hold `out` (an existing folder) for one job at a time: a second job into the same folder would
    segment the same images again and race for its tables. An advisory lock on the folder itself
    (flock: no lock file to leave behind), released when the job ends, however it ends; where the
    platform has no flock (Windows) jobs are not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"another job is writing into {out}: wait for it to end, or give another --out") from None
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


def create_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc


def prepare_output(out: Path, settings: dict, overwrite: bool) -> None:
    """Record the job's settings in `out` (created, and held by this job), refusing to mix settings in
    one folder."""
    job_file = out / "job.json"
    if job_file.is_file() and not overwrite:
        recorded, settings = _comparable(json.loads(job_file.read_text())), _comparable(settings)
        if recorded != settings:
            raise JobError(f"{out} holds results made with other settings ({'; '.join(_differences(recorded, settings))}); "
                           "use another --out, or --overwrite to redo every image with the new settings")
    elif not job_file.is_file() and any((out / "records").glob("*.json")) and not overwrite:
        raise JobError(f"{out} holds results of a job with unknown settings; use another --out or --overwrite")
    atomic_write(job_file, json.dumps(settings, indent=2, sort_keys=True).encode())


MASKS_ENDING = "_masks"  # Cellpose's naming of an image's annotation (X_masks.png, X_cp_masks.png)


def is_annotation_mask(path: Path) -> bool:
    """`X_masks.*` (any image suffix, names compared without case): the label image annotating X, as
    README's fine-tuning layout and `python -m train finetune` read it, not a micrograph to segment."""
    stem = path.stem.lower()
    return path.suffix.lower() in IMAGE_SUFFIXES and stem.endswith(MASKS_ENDING) and stem != MASKS_ENDING


def absolute(path: Path) -> Path:
    """`path` from the file system's root, `..` and `.` removed, symbolic links not followed."""
    return Path(os.path.abspath(path))


def folder_images(folder: Path) -> list[Path]:
    """Image files under `folder` (image suffixes only), in name order. Hidden files and folders are not
    taken: `.git` (where DataLad and git-annex keep every image's content under its SHA256E key),
    `.ipynb_checkpoints`, macOS's `._X.tif` resource forks."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def collect_inputs(inputs: Iterable[str], exclude: Path | None = None) -> tuple[list[Path], list[dict], list[Path]]:
    """Expand files, folders (recursively, image suffixes only, hidden ones left out) and globs; report
    what matched nothing. Files under `exclude` (the job's output folder) are skipped: outputs are never
    inputs. Annotation masks (`is_annotation_mask`) are left out and returned third, so that the job
    can say so."""
    found: list[tuple[Path, int | None]] = []  # (path, index in `folders` of the folder it was found in)
    folders: list[str] = []  # as given: a folder that yields no image is reported
    named: set[Path] = set()
    missing: list[dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [(p, len(folders)) for p in folder_images(path)]
            folders.append(item)
        elif path.is_file():
            found.append((path, None))
            named.add(absolute(path))
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if matches:
                found += [(p, None) for p in matches]
            else:
                missing.append({"path": item, "error": "no such file, folder or glob match"})
    if exclude is not None:  # by the path and by the file it leads to (outputs a DataLad save turned into links)
        outside, inside = absolute(exclude), exclude.resolve()
        found = [(p, f) for p, f in found
                 if not absolute(p).is_relative_to(outside) and not p.resolve().is_relative_to(inside)]
    # An input keeps the path it was found by, made absolute with the file's own link kept: a link's
    # target can be a content-addressed name (DataLad's SHA256E-s…--….tif) that would become the output's
    # name, and two links to one content (two blank frames) are two images. Paths that differ only by a
    # linked folder (`d` and a link to `d`) are one input, the first.
    by_place: dict[Path, Path] = {}
    yielded: set[int] = set()  # the folders that gave an image
    for p, folder in found:
        by_place.setdefault(p.parent.resolve() / p.name, absolute(p))
        if folder is not None and not is_annotation_mask(p):
            yielded.add(folder)
    unique = list(by_place.values())
    images = {(p.parent, p.stem.lower()) for p in unique if not is_annotation_mask(p)}

    def annotates_an_input(mask: Path) -> bool:
        image = mask.stem.lower().removesuffix(MASKS_ENDING)
        return bool({(mask.parent, image), (mask.parent, image.removesuffix("_cp"))} & images)

    # A mask a folder or glob finds is left out. One named as a file is segmented (the user asked for
    # that file: refusing it would surprise more than segmenting a label image) unless its image is an
    # input too: a shell's `folder/*.png` names every file, and then it is that image's annotation.
    masks = [p for p in unique if is_annotation_mask(p) and (p not in named or annotates_an_input(p))]
    left_out = set(masks)
    images_found = [p for p in unique if p not in left_out]
    for index, given in enumerate(folders):  # as a glob that matches nothing: exit 3, not a silent "0 segmented"
        if index not in yielded:
            masks_there = sum(1 for p, folder in found if folder == index and is_annotation_mask(p))
            missing.append({"path": given, "error": f"no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"
                            + (f"; {masks_there} annotation masks (X_masks.*) left out" if masks_there else "")})
    return images_found, missing, masks


def output_names(paths: list[Path], frames: dict[Path, int] | None = None) -> dict[Path, str]:
    """A file-system-safe output name per input: its stem, plus a path hash where two inputs would
    share a name: the same stem, or a stack's stem or frame names and another input's (`frames`:
    the frame count of each stack among `paths`)."""
    frames = frames or {}

    def names_of(path: Path) -> list[str]:
        count = frames.get(path, 1)
        return [path.stem] + ([frame_name(path.stem, i, count) for i in range(count)] if count > 1 else [])

    uses = collections.Counter(name for p in paths for name in names_of(p))
    return {p: p.stem if all(uses[name] == 1 for name in names_of(p))
            else f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}" for p in paths}


def frame_name(stem: str, frame: int, frames: int) -> str:
    """`<stem>_t0003` for frame 3: 0-based, zero-padded to 4 digits (enough for MAX_STACK_FRAMES; more
    only if that limit grows) so that a stack's files sort in frame order."""
    return f"{stem}_t{frame:0{max(4, len(str(frames - 1)))}d}"


@dataclass(frozen=True)
class Item:
    """One image the job segments: a file, or one frame of a time-lapse stack."""

    path: Path
    name: str  # output name: the file's, or <stem>_t0003 for frame 3 of a stack
    frame: int | None = None  # 0-based frame index; None for a file that is not a stack
    stack: str | None = None  # the stack's output name (its stem), for a frame
    time_s: float | None = None  # seconds since frame 0, where the stack's metadata gives the interval
    # Where the file's name places it in a plate (cellseg/series.py); a series' time point is a frame.
    plate: str | None = None
    well: str | None = None
    field: str | None = None
    # A time point of a series placed by its file name: `frame` is its place in the series, and the
    # whole file is that frame (not a page of a stack).
    by_name: bool = False

    @property
    def page(self) -> int | None:
        """The page of a stack to read; None where the whole file is the image."""
        return None if self.by_name else self.frame

    def record_fields(self) -> dict:
        """What a frame's record says of its place in the stack or series (nothing for a single image)."""
        place = {} if self.well is None else {"plate": self.plate, "well": self.well, "field": self.field}
        if self.frame is None:
            return place
        page = {} if self.page is None else {"page": self.page}  # a page of the stack's file: its ROIs' position
        return {"stack": self.stack, "frame": self.frame, "time_s": self.time_s} | page | place

    def failure(self, error: str) -> dict:
        """This item's entry in errors.json."""
        return {"path": str(self.path), **({"frame": self.page} if self.page is not None else {}), "error": error}


def expand_inputs(paths: list[Path]) -> tuple[list[Item], list[dict]]:
    """The items of a job, in input order: a file as one item, a time-lapse stack as one per frame.
    Only headers are read. A stack that is not a time-lapse (Z-slices, channels) or an unreadable file
    is reported once, with its reason, instead of once per frame."""
    infos: dict[Path, StackInfo] = {}
    failed = []
    for path in paths:
        try:
            infos[path] = stack_info(path)
        except (ImageError, OSError) as exc:
            failed.append({"path": str(path), "error": str(exc) or type(exc).__name__})
    usable = [p for p in paths if p in infos]
    names = output_names(usable, {p: info.frames for p, info in infos.items() if info.frames > 1})
    items = []
    for path in usable:
        info, name = infos[path], names[path]
        if info.frames == 1:
            items.append(Item(path, name))
        else:
            items += [Item(path, frame_name(name, i, info.frames), i, name, info.time_s(i)) for i in range(info.frames)]
    return items, failed


def upload_item(path: Path, name: str, frame: int, max_pixels: int | None = None) -> tuple[Item, int]:
    """The item a batch job makes of frame `frame` of the file at `path` if that file were named `name`
    (the service's uploads sit under temp names), and the file's frame count (1: not a stack): the file
    itself for frame 0 of a single image, else the stack's frame, named, placed and timed as
    `expand_inputs` does. Only headers are read; a stack that is not a time-lapse, or a frame it
    lacks, raises ImageError."""
    info = stack_info(path, **({} if max_pixels is None else {"max_pixels": max_pixels}))
    if info.frames == 1:
        if frame != 0:
            raise ImageError(f"frame {frame} asked of a single image: only a multi-page TIFF has frames")
        return Item(path, name), 1
    if not 0 <= frame < info.frames:
        raise ImageError(f"the stack has no frame {frame} (it has {info.frames} frames)")
    return Item(path, frame_name(name, frame, info.frames), frame, name, info.time_s(frame)), info.frames


@dataclass
class Result:
    labels: np.ndarray
    scores: np.ndarray | None


@dataclass
class ImageOutputs:
    """Everything one image contributes to the job, encoded: written by the pipeline, never by a backend."""

    files: dict[str, bytes]  # per-image files by format (labels, rois, geojson)
    record_json: bytes


@dataclass
class JobReport:
    done: list[str] = field(default_factory=list)  # segmented in this run
    completed: list[str] = field(default_factory=list)  # done before; per-image formats added from their records
    skipped: list[str] = field(default_factory=list)  # done before, with every requested file
    failed: list[dict] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # files whose names fit no series layout (series.json)
    masks_left_out: list[Path] = field(default_factory=list)  # annotation masks (X_masks.*) not taken as images
    earlier: list[str] = field(default_factory=list)  # images segmented here by earlier commands, kept in the tables


# What to do about a failed write, by errno; any other error: fix its cause.
WRITE_ERROR_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EROFS: "make the output folder writable",
    errno.EACCES: "make the output folder writable",
    errno.EPERM: "make the output folder writable",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


class JobStopped(Exception):
    """Writing an output failed, or the service stopped answering, so the job stopped: every later
    image would have failed the same way. The images finished before keep their outputs and records,
    so the same command resumes."""

    def __init__(self, cause: Exception, report: JobReport, errors_json_error: OutputWriteError | None):
        self.cause, self.report, self.errors_json_error = cause, report, errors_json_error
        if errors_json_error is None:
            errors_note = "errors.json lists the inputs that failed"
        else:
            errors_note = f"errors.json could not be written either ({_lower_first(errors_json_error.strerror)})"
        if isinstance(cause, OutputWriteError):
            advice = WRITE_ERROR_ADVICE.get(cause.errno, "fix the cause")
            what = f"{_lower_first(cause.strerror)} writing {cause.filename}: {advice}"
        else:  # the service: nothing answers at its address any more
            what = f"the service stopped answering ({cause}): start it again"
        super().__init__(f"{what} and run the same command again to resume (the images finished so far are kept; "
                         f"{errors_note})")


def _lower_first(text: str | None) -> str:
    return (text[:1].lower() + text[1:]) if text else "unknown error"


# What a backend knows how to do to one image: (raw float image, original) in, cells out. The
# original is the input as a server should receive it: the file, or a frame's own pixels.
Segmenter = Callable[[np.ndarray, "Path | np.ndarray"], Result]
# A backend: items in, (item, outputs or the exception) out, in any order.
Backend = Callable[[list[Item]], Iterator[tuple[Item, "ImageOutputs | Exception"]]]


def read_item(item: Item, max_pixels: int | None = None) -> tuple[np.ndarray, Path | np.ndarray]:
    """(raw float32 image, original) of a file or of one frame of a stack (only that frame is read).
    A gray frame's original keeps its own dtype (an upload as small as the file's page); a colour
    frame's is its luminance, what the server would reduce it to. `max_pixels`: the service's limit."""
    limit = {} if max_pixels is None else {"max_pixels": max_pixels}
    if item.page is None:
        return read_image(item.path, **limit), item.path
    pixels = read_frame(item.path, item.page, **limit)
    image = to_grayscale(pixels)
    return image, (pixels if pixels.ndim == 2 else image)


def image_outputs(item: Item, segment: Segmenter, formats: tuple[str, ...] = DEFAULT_FORMATS,
                  pixel_size: PixelSize | None = None) -> ImageOutputs:
    """The per-image step every backend runs (in process, in threads, on Dask workers): read the
    image or frame, segment it, measure the cells (in µm too with `pixel_size`, the one given for the
    job, or else the file's own from its metadata: a stack's, for each of its frames), encode the
    record and the requested per-image files."""
    image, original = read_item(item)
    result = segment(image, original)
    size = pixel_size or read_pixel_size(item.path)  # a stack's path: its metadata holds for every frame
    record = (image_record(image, result.labels, result.scores, item.name, str(item.path), pixel_size=size)
              | item.record_fields())
    return ImageOutputs(per_image_files(result.labels, record, formats), json.dumps(record).encode())


def _guarded(item: Item, segment: Segmenter, formats: tuple[str, ...] = DEFAULT_FORMATS,
             pixel_size: PixelSize | None = None) -> tuple[Item, ImageOutputs | Exception]:
    try:
        return item, image_outputs(item, segment, formats, pixel_size)
    except Exception as exc:  # noqa: BLE001  (one bad image must not end the job)
        return item, exc


def onnx_segmenter(models: Sequence, params: PostprocessParams, tta: bool | None) -> Segmenter:
    """Network then post-processing. A network call takes one of `models` (sessions of the same file)
    for its duration, so threads beyond their number wait for one while the others read,
    post-process and encode. `tta` None: the model's own default."""
    from cellseg.inference import Segmentation, predict_maps
    from cellseg.onnx_model import default_tta

    if tta is None:  # left open: the model's own (a fine-tuned model's is on)
        tta = default_tta(models[0].metadata)

    free: queue.SimpleQueue = queue.SimpleQueue()
    for model in models:
        free.put(model)

    def segment(image: np.ndarray, original: Path | np.ndarray) -> Result:
        model = free.get()
        try:
            maps = predict_maps(model.predict, [image], batch_size=1, tta=tta)[0]
        finally:
            free.put(model)
        seg = Segmentation.from_maps(maps, params)
        return Result(seg.labels, seg.scores())
    return segment


def _in_order(items: list[Item], work: Callable[[Item], tuple], threads: int) -> Iterator[tuple]:
    """`work(item)` of every item on `threads` threads, yielded in input order. At most one image
    waits beyond those in progress, so a long job never queues every image; when the consumer stops
    (a failed write, Ctrl-C), the images not started are dropped and only those in progress awaited."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def available_cores() -> int:
    """The cores this process may run on (a taskset or container may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Most network sessions of a local job: each holds its own activations (~120 MB for a LIVECell-size
# image), and beyond a few, Python's post-processing threads contend for the GIL; `--dask local`
# runs a process per core instead.
MAX_LOCAL_SESSIONS = 4


def local_sessions(cores: int, providers: Sequence[str], images: int | None = None) -> tuple[int, int]:
    """(network sessions, ONNX Runtime threads each) of a local job of `images` images. Every image
    goes through its own thread end to end, each thread with its own session: two 1-thread sessions
    do 2 images in the time a 2-thread one does ~1.7 (64 LIVECell-size images on 2 cores: 8.6-9.3 ->
    10.0-10.7 images/s, docs/BENCHMARKS.md), and no core waits while another post-processes. No more
    sessions than images (a job of one large image has every core in its one session); on a GPU, one."""
    if "CUDAExecutionProvider" in providers:
        return 1, cores
    sessions = max(1, min(cores, MAX_LOCAL_SESSIONS, images or cores))
    return sessions, max(1, cores // sessions)


def local_backend(model_path: Path | None, params: PostprocessParams, tta: bool | None = None,
                  formats: tuple[str, ...] = DEFAULT_FORMATS, pixel_size: PixelSize | None = None,
                  cores: int | None = None) -> Backend:
    """In this process: one thread per network session (`local_sessions`) takes an image from
    reading to encoded outputs, while the main thread writes. Results come back in input order."""
    from cellseg.onnx_model import OnnxModel, available_providers

    def run(items):
        sessions, ort_threads = local_sessions(cores or available_cores(), available_providers(), len(items))
        # No busy-waiting in ONNX Runtime's threads after each call: other images' threads need those cores.
        segment = onnx_segmenter([OnnxModel(model_path, threads=ort_threads, spin=False) for _ in range(sessions)],
                                 params, tta)
        yield from _in_order(items, lambda item: _guarded(item, segment, formats, pixel_size), sessions)
    return run


def server_settings(url: str, overrides: dict) -> dict:
    """What a server job's results depend on, as the server reports them: the sha256 of the model it
    serves and every post-processing parameter it applies (its model's defaults with `overrides`),
    and tta. Asked once, with a small synthetic image, before the job: the `segment` answer says
    which model and parameters made it. So job.json holds what a local job's holds, and a re-run
    against a server that now serves another model or other defaults is refused like any change of
    settings. Raises CellsegError where the server cannot be reached or refuses the parameters."""
    from cellseg.client import Client

    probe = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    with Client(url) as client:
        answer = client.segment(probe, **overrides)
    settings = {"server": url.rstrip("/"), "model_sha256": answer.model.get("sha256"),
                "tta": bool(answer.params.get("tta", overrides.get("tta", False)))}
    if answer.model.get("precision"):  # the server's choice, made on its CPU
        settings["precision"] = {"precision": answer.model["precision"], "reason": answer.model.get("precision_reason"),
                                 **{k: answer.model.get(k) for k in ("requested", "cpu", "provider", "check")}}
    if answer.params:
        settings["params"] = {k: v for k, v in answer.params.items() if k != "tta"}
    else:  # a server whose answers do not say: what was sent is all there is to record
        settings["params"] = {k: v for k, v in overrides.items() if k != "tta"}
        settings["params_note"] = "as sent (the rest are the server's defaults); the server did not report its own"
    return settings


def server_backend(url: str, overrides: dict, concurrency: int, formats: tuple[str, ...] = DEFAULT_FORMATS,
                   pixel_size: PixelSize | None = None) -> Backend:
    """Segment through a running service; `overrides` are the post-processing parameters to send.
    Cells are measured here, from the labels the service sends, so the pixel size never travels."""
    from cellseg.client import Client

    Client(url).close()  # fails fast, with a clear CellsegError, where the server cannot be reached
    # One client per thread: BentoML's client closes the files of each call, so a shared one
    # closes another thread's upload mid-request ("seek of closed file").
    local = threading.local()

    def segment(image: np.ndarray, original: Path | np.ndarray) -> Result:
        if not hasattr(local, "client"):
            local.client = Client(url)
        result = local.client.segment(original, **overrides)  # a frame goes as a single-page image of its own
        return Result(result.labels, np.array([c.score for c in result.cells], dtype=np.float32))

    def run(items):
        yield from _in_order(items, lambda item: _guarded(item, segment, formats, pixel_size), concurrency)
    return run


def per_image_path(out: Path, fmt: str, name: str) -> Path:
    folder, suffix = PER_IMAGE_FILES[fmt]
    return out / folder / f"{name}{suffix}"


def record_path(out: Path, name: str) -> Path:
    return out / "records" / f"{name}.json"


def write_image_outputs(out: Path, name: str, outputs: ImageOutputs) -> None:
    write_per_image_files(out, name, outputs.files)
    atomic_write(record_path(out, name), outputs.record_json)  # last: marks the image done


def write_per_image_files(out: Path, name: str, files: dict[str, bytes]) -> None:
    for fmt, data in files.items():
        atomic_write(per_image_path(out, fmt, name), data)


def missing_formats(out: Path, name: str, formats: tuple[str, ...]) -> tuple[str, ...]:
    """The requested per-image formats whose file `name` lacks."""
    return tuple(fmt for fmt in formats if fmt in PER_IMAGE_FILES and not per_image_path(out, fmt, name).is_file())


def is_done(out: Path, name: str, formats: tuple[str, ...] = DEFAULT_FORMATS) -> bool:
    """The record and every requested per-image file exist."""
    return record_path(out, name).is_file() and not missing_formats(out, name, formats)


def files_from_record(record: dict, formats: tuple[str, ...]) -> dict[str, bytes]:
    """Per-image files of an image segmented before, from its record alone: the label image is
    rebuilt from the cells' RLE masks (exactly: cells keep their ids), so the network does not run."""
    labels = labels_from_instances(record["instances"], record["height"], record["width"])
    return per_image_files(labels, record, formats)


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown output format(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
    return formats


def write_aggregates(out: Path, records: Iterable[dict], formats: tuple[str, ...] = DEFAULT_FORMATS) -> list[dict]:
    """cells.csv and instances.coco.json (as requested) and summary.csv (always) from `records`, in
    order, streamed: one record in memory at a time, so a job of tens of thousands of images (a
    LIVECell-size record takes ~0.4 MB as Python objects) fits in memory. Returns the summary rows."""
    rows = []
    with contextlib.ExitStack() as files:
        cells = files.enter_context(AtomicFile(out / "cells.csv")) if "csv" in formats else None
        coco = files.enter_context(AtomicFile(out / "instances.coco.json")) if "coco" in formats else None
        if cells:
            cells.write(cells_csv_header())
        if coco:  # images last: their small entries are kept until every annotation is written
            coco.write(f'{{"info": {json.dumps(COCO_INFO)}, "annotations": ['.encode())
        images, annotations = [], 0
        for image_id, record in enumerate(records, start=1):
            rows.append(summary_row(record))
            if cells:
                cells.write(cells_csv_rows(record))
            if coco:
                images.append(coco_image(record, image_id, f"labels/{record['name']}.png"))
                new = coco_annotations(record, image_id, annotations + 1)
                if new:
                    coco.write(((", " if annotations else "") + json.dumps(new)[1:-1]).encode())  # the list's items
                annotations += len(new)
        if coco:
            coco.write(f'], "images": {json.dumps(images)}, "categories": {json.dumps(COCO_CATEGORIES)}}}'.encode())
    atomic_write(out / "summary.csv", summary_csv(rows))
    return rows


def plot_path(out: Path, stack: str) -> Path:
    return out / "plots" / f"{stack}_growth.png"


def write_growth_plots(out: Path, rows: list[dict], changed: set[str]) -> None:
    """plots/<stem>_growth.png of each stack whose plot is missing or which has a frame in `changed`
    (segmented in this run), from the job's summary rows: drawing takes a moment, so a resumed job
    redraws only what changed."""
    for stack, frames in stack_rows(rows).items():
        path = plot_path(out, stack)
        if stack in changed or not path.is_file():
            atomic_write(path, growth_plot_png(stack, frames))


def run_job(inputs: list[str], out: Path, backend_factory: Callable[[], Backend], settings: dict,
            overwrite: bool = False, progress: bool = True, formats: tuple[str, ...] = DEFAULT_FORMATS,
            series: SeriesOptions | None = None) -> JobReport:
    """Segment every input into `out`: collect inputs, skip finished ones, run the rest through the
    backend, write each image's outputs as it arrives, then the aggregates. `settings` (model sha256
    or server, parameters) identify what the results depend on; they are recorded in job.json and
    checked on every re-run. A failed write raises JobStopped once errors.json has been tried."""
    out = Path(out)
    create_output_folder(out)  # the folder is what the job's lock holds
    with only_job_in(out):
        return _run_job(inputs, out, backend_factory, settings, overwrite, progress, formats, series)


def _run_job(inputs: list[str], out: Path, backend_factory: Callable[[], Backend], settings: dict, overwrite: bool,
             progress: bool, formats: tuple[str, ...], series: SeriesOptions | None) -> JobReport:
    report = JobReport()
    try:
        prepare_output(out, settings, overwrite)
        paths, missing, report.masks_left_out = collect_inputs(inputs, exclude=out)
        items, refused = expand_inputs(paths)
        report.failed += missing + refused
        items, placement = place_in_series(items, series or SeriesOptions())
        if placement:
            report.unmatched = placement["unmatched"]
            atomic_write(out / "series.json", json.dumps(placement, indent=2).encode())
        to_segment, to_complete = [], []
        for item in items:
            if overwrite or not record_path(out, item.name).is_file():
                to_segment.append(item)
            elif missing_formats(out, item.name, formats):
                to_complete.append(item)
            else:
                report.skipped.append(item.name)
        to_segment += complete_from_records(out, to_complete, formats, report, progress)
        segment_images(out, to_segment, backend_factory, formats, report, progress)
        # An item's place (series, well, time) is this run's reading of the names, not the record's:
        # a new --interval or --name-pattern re-places finished images without segmenting them again.
        records = (json.loads(record_path(out, item.name).read_text()) | item.record_fields() for item in items
                   if is_done(out, item.name, formats))
        # The tables cover the whole folder: images an earlier command segmented here (its settings are
        # this one's: prepare_output checked) stay in them when this command names fewer inputs.
        report.earlier = earlier_names(out, {item.name for item in items})
        earlier = (record for name in report.earlier if (record := read_record(out, name)) is not None)
        rows = write_aggregates(out, itertools.chain(records, earlier), formats)  # a record at a time, as before
        done_now = set(report.done)
        changed = {item.stack for item in to_segment if item.name in done_now}
        write_growth_plots(out, rows, changed)
        write_well_outputs(out, rows, {(i.plate or "", i.well) for i in to_segment if i.name in done_now}, atomic_write)
        write_errors(out, report.failed)
    except (OutputWriteError, ServiceUnreachable) as exc:
        raise JobStopped(exc, report, _try_write_errors(out, report.failed)) from exc
    return report


def earlier_names(out: Path, names: set[str]) -> list[str]:
    """The images segmented into `out` before (their records) that are not among `names`, in name order."""
    folder = out / "records"
    found = (path.relative_to(folder).as_posix().removesuffix(".json")
             for path in sorted(folder.rglob("*.json"))) if folder.is_dir() else ()
    return [name for name in found if name not in names]


def read_record(out: Path, name: str) -> dict | None:
    """An image's record, or None where it cannot be read (its image is segmented again when named)."""
    try:
        return json.loads(record_path(out, name).read_text())
    except (OSError, ValueError):
        return None


def complete_from_records(out: Path, items: list[Item], formats: tuple[str, ...], report: JobReport,
                          progress: bool) -> list[Item]:
    """Give images segmented before the per-image files they lack (a format asked for later, a
    deleted file), made from their records. Returns those whose record cannot give them (unreadable,
    or from a version without the needed fields): they are segmented again."""
    unusable = []
    for item in tqdm(items, desc="adding formats", unit="img", disable=not progress or not items):
        try:
            record = json.loads(record_path(out, item.name).read_text())
            if item.page is not None:  # a stack's page: records written before they said so have no `page`
                record["page"] = item.page
            files = files_from_record(record, missing_formats(out, item.name, formats))
        except (OSError, ValueError, KeyError, TypeError):  # segmenting again makes a record that can
            unusable.append(item)
            continue
        write_per_image_files(out, item.name, files)
        report.completed.append(item.name)
    return unusable


def segment_images(out: Path, items: list[Item], backend_factory: Callable[[], Backend],
                   formats: tuple[str, ...], report: JobReport, progress: bool) -> None:
    """Run `items` through the backend and write each image's outputs as they arrive. A bad image is
    reported and skipped; a failed write stops the job (OutputWriteError), since every later image
    would fail alike, and the backend starts no further image."""
    if not items:
        return
    backend = backend_factory()
    with tqdm(total=len(items), desc="segmenting", unit="img", disable=not progress) as bar, \
            contextlib.closing(backend(items)) as results:
        for item, outputs in results:
            if isinstance(outputs, ServiceUnreachable):  # not this image's fault: every later one would fail alike
                raise outputs
            if isinstance(outputs, Exception):
                report.failed.append(item.failure(str(outputs) or type(outputs).__name__))
            else:
                try:
                    write_image_outputs(out, item.name, outputs)
                except OutputWriteError as exc:
                    report.failed.append(item.failure(f"its outputs could not be written ({exc.strerror}: {exc.filename})"))
                    raise
                report.done.append(item.name)
            bar.update()


def write_errors(out: Path, failed: list[dict]) -> None:
    """errors.json in path (then frame) order: the same file whatever order a backend finished in."""
    ordered = sorted(failed, key=lambda entry: (str(entry.get("path", "")), entry.get("frame", -1)))
    atomic_write(out / "errors.json", json.dumps(ordered, indent=2).encode())


def _try_write_errors(out: Path, failed: list[dict]) -> OutputWriteError | None:
    """errors.json after a failed write, as far as the disk allows: None, or why it could not be written."""
    try:
        write_errors(out, failed)
    except OutputWriteError as exc:
        return exc
    return None
