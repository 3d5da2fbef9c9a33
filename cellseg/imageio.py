"""Image decoding and validation shared by training, serving, batch jobs and the client.

Everything that turns bytes or a file into a 2-D float array goes through `load_grayscale`, so the
model sees the same numbers whatever the container format (TIFF, PNG, JPEG), bit depth (8/16-bit,
float) or colour layout (grayscale, RGB, RGBA) of the input.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

# A single LIVECell image is 704x520 (0.37 MP); 64 MP covers whole-well mosaics while keeping the
# float32 working set of one request (image + 3 probability maps + labels) under ~1.5 GB.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 16
# Decoded bytes per pixel allowed at the pixel limit: 16-bit RGBA (8) or float32 RGB (12 -> refused).
MAX_BYTES_PER_PIXEL = 8
# Formats accepted: what microscopes and labs write. Others (BMP, GIF, WEBP...) are refused rather
# than decoded by whatever Pillow happens to support: a smaller surface for hostile files.
PILLOW_FORMATS = {"PNG", "JPEG", "MPO"}  # MPO: the JPEG variant many cameras write

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, Image.Image]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Pillow's own decompression-bomb guard would fire before ours with a less useful message.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The input is not a usable image (not an image, truncated, empty, wrong shape)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels (or decoded bytes) than the configured limit."""


def _check_size(height: int, width: int, max_pixels: int, decoded_bytes: int | None = None) -> None:
    """Sides, pixels and decoded bytes: called with the numbers a file's header declares, before any
    pixel is decoded, so a small file cannot make the decoder allocate gigabytes."""
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {height * width:,} pixels, over the limit of {max_pixels:,}"
        )
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels; both sides must be at least {MIN_SIDE}")
    if decoded_bytes is not None and decoded_bytes > max_pixels * MAX_BYTES_PER_PIXEL:
        raise ImageTooLargeError(
            f"image would decode to {decoded_bytes:,} bytes, over the limit of {max_pixels * MAX_BYTES_PER_PIXEL:,}"
        )


def _single_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """The one page of a TIFF, refusing stacks: a time-lapse or z-stack must not be silently cut
    to its first plane."""
    try:
        second = tif.pages.get(1) if hasattr(tif.pages, "get") else tif.pages[1]
    except IndexError:
        second = None
    if second is not None:
        raise ImageError(f"multi-page TIFF ({len(tif.pages)} pages): send one 2-D image per file; batch jobs "
                         "(`cellseg segment`) take time-lapse stacks, one frame at a time")
    try:
        page = tif.pages.first
    except IndexError:  # the first page's directory lies beyond the data
        page = None
    if not isinstance(page, tifffile.TiffPage):
        raise ImageError("could not decode TIFF (truncated or corrupt?): it has no readable image page")
    return page


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = _single_page(tif)
            # Only header fields here: nothing is decompressed until every limit has passed.
            if page.imagedepth > 1:
                raise ImageError(f"TIFF page is a {page.imagedepth}-plane volume; send one 2-D image per file")
            samples = int(page.samplesperpixel)
            if samples > 4:
                raise ImageError(f"TIFF has {samples} samples per pixel; expected gray, RGB or RGBA")
            _check_size(int(page.imagelength), int(page.imagewidth), max_pixels, decoded_bytes=int(page.nbytes))
            return np.asarray(page.asarray())
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode TIFF (truncated or corrupt?): {exc}") from exc


_PIL_BYTES_PER_BAND = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image (expected PNG, JPEG or TIFF)") from exc
    except Exception as exc:
        raise ImageError(f"could not open image: {exc}") from exc
    if img.format not in PILLOW_FORMATS:
        raise ImageError(f"{img.format} images are not accepted: send PNG, JPEG or TIFF")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageError(f"animated {img.format} with {img.n_frames} frames: send one still image")
    bands = len(img.getbands())
    _check_size(img.height, img.width, max_pixels,
                decoded_bytes=img.height * img.width * bands * _PIL_BYTES_PER_BAND.get(img.mode, 1))
    try:
        img.load()  # forces a full decode so truncated files fail here, not later
    except Exception as exc:
        raise ImageError(f"could not decode image (truncated or corrupt?): {exc}") from exc
    return pil_to_array(img)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image as an array that keeps its bit depth (16-bit PNGs stay 16-bit)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB" if img.mode != "1" else "L")
    arr = np.asarray(img)
    if img.mode.startswith("I;16") and arr.dtype != np.uint16:
        arr = arr.astype(np.uint16)
    return arr


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to an array of the file's own dtype and channels."""
    if not data:
        raise ImageError("empty input: no image bytes received")
    data = bytes(data)
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    return _decode_pillow(data, max_pixels)


def to_grayscale(arr: np.ndarray) -> np.ndarray:
    """Reduce (H,W), (H,W,C) or (C,H,W) with C in 1..4 to a float32 (H,W) array.

    RGB uses ITU-R 601 luma weights (they sum to 1, so R=G=B images keep their values); alpha
    is dropped: phase-contrast images carry no meaning in transparency.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFFs
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = arr[..., 0]  # gray or gray+alpha
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float32)
        arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2:
        raise ImageError(
            f"expected a 2-D grayscale or RGB(A) image, got an array of shape {tuple(arr.shape)}"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"unsupported pixel type {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ImageError("image contains NaN or infinite pixel values")
    return out


def read_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported source (path, bytes, array, PIL image) as a raw float32 (H,W) array."""
    if isinstance(source, Image.Image):
        arr = pil_to_array(source)
    elif isinstance(source, np.ndarray):
        arr = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        arr = decode_image(bytes(source), max_pixels)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such file: {path}")
        arr = decode_image(path.read_bytes(), max_pixels)
    gray = to_grayscale(arr)
    _check_size(*gray.shape, max_pixels)
    return gray


def declared_pixels(path: str | Path) -> int | None:
    """Width x height as the file's header declares them, without decoding a pixel (None when the
    header cannot be read: decoding will then say what is wrong). For admitting work by its size."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) in _TIFF_MAGIC:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages.first
                    return int(page.imagelength) * int(page.imagewidth)
            with Image.open(path) as img:
                return int(img.width) * int(img.height)
    except Exception:  # any unreadable header: not this function's to report
        return None


# Time-lapse stacks (batch jobs only: the service takes one 2-D image). tifffile names a series'
# axes: T time, Z depth, C channels, I or Q pages of no stated kind (a plain multi-page TIFF, or one
# tifffile wrote), Y and X the image, S the samples of a pixel (RGB). Pages of no stated kind are
# taken as frames: that is what a plain multi-page TIFF of an instrument's time-lapse holds.
FRAME_AXES = {"T", "I", "Q"}
IMAGE_AXES = {"Y", "X", "S"}
AXIS_NAMES = {"Z": "Z-slices", "C": "channels", "T": "frames", "I": "planes", "Q": "planes"}
# Time units ImageJ (`tunit`, "sec" unless written) and OME (`TimeIncrementUnit`, "s" unless written)
# use, in seconds. An interval in a unit not listed is left unknown rather than guessed.
SECONDS_PER_UNIT = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6,
                    "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
                    "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0}


@dataclass(frozen=True)
class StackInfo:
    """What a batch job needs to know of an input before reading its pixels: how many frames it has
    (1: not a stack) and the time between them, where the file's metadata says."""

    frames: int
    interval_s: float | None = None
    kind: str = "single"  # single (not a stack), tiff (plain multi-page), imagej (hyperstack) or ome

    def time_s(self, frame: int) -> float | None:
        """Seconds from the first frame to `frame` (0-based), or None where the interval is unknown."""
        return None if self.interval_s is None else round(frame * self.interval_s, 6)


SINGLE_IMAGE = StackInfo(frames=1)


def stack_info(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> StackInfo:
    """A file as a batch job reads it: a single image (anything but a multi-page TIFF) or a time-lapse
    stack whose pages are its frames. Only headers are read. Raises ImageError for a stack that is not
    a time-lapse (Z-slices, channels, several positions, pages of different sizes) and for frames over
    the limits a single image has, so that a whole stack is refused once, with one reason."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"no such file: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) not in _TIFF_MAGIC:
            return SINGLE_IMAGE
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) <= 1:
                return SINGLE_IMAGE  # decoding says what else may be wrong with it
            return _time_lapse_info(tif, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode TIFF (truncated or corrupt?): {exc}") from exc


def _time_lapse_info(tif: tifffile.TiffFile, max_pixels: int) -> StackInfo:
    kind = "ome" if tif.is_ome else "imagej" if tif.is_imagej else "tiff"
    pages = len(tif.pages)
    if len(tif.series) != 1:
        raise ImageError(_several_series_message(tif, kind))
    series = tif.series[0]
    # (axis, size) pairs, not a dict: a series may repeat an axis (tifffile's Q for each unnamed one)
    stacked = [(axis, int(size)) for axis, size in zip(series.axes, series.shape) if axis not in IMAGE_AXES and size > 1]
    if len(stacked) != 1 or stacked[0][0] not in FRAME_AXES:
        raise ImageError(_not_a_time_lapse_message(stacked, kind, pages))
    ((_, frames),) = stacked
    if frames != pages:  # e.g. ImageJ's files over 4 GB keep all frames behind one page
        raise ImageError(f"TIFF stack of {frames} frames in {pages} pages: batch jobs read one page per frame; "
                         "save the stack with one page per frame")
    _check_tiff_page(tif.pages.first, max_pixels)  # every frame is this size: refuse a stack once, not per frame
    return StackInfo(frames, _frame_interval_s(tif), kind)


def _several_series_message(tif: tifffile.TiffFile, kind: str) -> str:
    if kind == "ome":
        return (f"OME-TIFF with {len(tif.series)} image series (positions or wells): batch jobs take one "
                "time-lapse per file; export each position as its own file")
    shapes = ", ".join(f"{'x'.join(map(str, s.shape[::-1]))} {s.dtype}" for s in tif.series[:4])
    return (f"multi-page TIFF of {len(tif.pages)} pages that are not all alike ({shapes}"
            f"{', ...' if len(tif.series) > 4 else ''}): a time-lapse's frames must all have one size and type")


def _not_a_time_lapse_message(stacked: list[tuple[str, int]], kind: str, pages: int) -> str:
    what = {"ome": "OME-TIFF", "imagej": "ImageJ stack", "tiff": "multi-page TIFF"}[kind]
    found = " x ".join(f"{size} {AXIS_NAMES.get(axis, f'{axis} planes')}" for axis, size in stacked) or f"{pages} pages"
    advice = "split it into one time-lapse per channel or Z-slice"
    if kind == "imagej" and [axis for axis, _ in stacked] == ["Z"]:  # ImageJ saves a plain stack as slices
        advice = (f"if its slices are time points, make them frames in Fiji (Image > Properties: Slices 1, "
                  f"Frames {stacked[0][1]}) and save it again")
    return f"{what} of {found}: batch jobs take time-lapse stacks (frames only); {advice}"


def _frame_interval_s(tif: tifffile.TiffFile) -> float | None:
    """Seconds between frames as ImageJ (`finterval`, `tunit`) or OME (`TimeIncrement`) metadata state it."""
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        return _seconds(meta.get("finterval"), meta.get("tunit", "sec"))
    if tif.is_ome:
        pixels = _ome_pixels_attributes(tif.ome_metadata or "")
        return _seconds(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit", "s"))
    return None


def _ome_pixels_attributes(ome_xml: str) -> dict[str, str]:
    """The first image's <Pixels> attributes, whatever the OME schema version (namespace)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.rpartition("}")[2] == "Pixels"), None)
    return dict(pixels.attrib) if pixels is not None else {}


def _seconds(value: object, unit: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    factor = SECONDS_PER_UNIT.get(str(unit).strip().lower())
    if factor is None or not np.isfinite(number) or number <= 0:
        return None
    return number * factor


def _check_tiff_page(page: tifffile.TiffPage, max_pixels: int) -> None:
    """The limits a single TIFF image has, from one page's header, before any of its pixels is decoded."""
    if page.imagedepth > 1:
        raise ImageError(f"TIFF page is a {page.imagedepth}-plane volume; send one 2-D image per file")
    samples = int(page.samplesperpixel)
    if samples > 4:
        raise ImageError(f"TIFF has {samples} samples per pixel; expected gray, RGB or RGBA")
    _check_size(int(page.imagelength), int(page.imagewidth), max_pixels, decoded_bytes=int(page.nbytes))


def read_frame(path: str | Path, frame: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Frame `frame` (0-based) of a time-lapse stack (see `stack_info`), in the file's own dtype and
    channels: only that page is decoded, never the whole stack, after the checks a single image has."""
    try:
        with tifffile.TiffFile(path) as tif:
            try:
                if frame < 0:
                    raise IndexError(frame)
                page = tif.pages[frame]
            except IndexError:
                raise ImageError(f"the stack has no frame {frame} (it has {len(tif.pages)} pages)") from None
            first = tif.pages.first
            if (page.shape, page.dtype) != (first.shape, first.dtype):
                raise ImageError(f"frame {frame} is {page.shape} {page.dtype} where frame 0 is {first.shape} "
                                 f"{first.dtype}: a time-lapse's frames must all have one size and type")
            _check_tiff_page(page, max_pixels)
            return np.asarray(page.asarray())
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode frame {frame} of the TIFF (truncated or corrupt?): {exc}") from exc
