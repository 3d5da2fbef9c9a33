"""Image decoding and validation shared by training, serving, batch jobs and the client.

Everything that turns bytes or a file into a 2-D float array goes through `load_grayscale`, so the
model sees the same numbers whatever the container format (TIFF, PNG, JPEG), bit depth (8/16-bit,
float) or colour layout (grayscale, RGB, RGBA) of the input.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import tifffile
from PIL import Image, PngImagePlugin, UnidentifiedImageError

# A single LIVECell image is 704x520 (0.37 MP); 64 MP covers whole-well mosaics while keeping the
# float32 working set of one request (image + 3 probability maps + labels) under ~1.5 GB.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 16
# Decoded bytes per pixel allowed at the pixel limit: 16-bit RGBA (8) or float32 RGB (12 -> refused).
MAX_BYTES_PER_PIXEL = 8
# Formats accepted: what microscopes and labs write. Others (BMP, GIF, WEBP...) are refused rather
# than decoded by whatever Pillow happens to support: a smaller surface for hostile files.
PILLOW_FORMATS = {"PNG", "JPEG", "MPO"}  # MPO: the JPEG variant many cameras write
# File names taken for images where folders are searched (batch jobs, a lab's annotations); in this
# order where they are listed in messages. Compared with the lower-cased suffix.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, Image.Image]

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Pillow's own decompression-bomb guard would fire before ours with a less useful message.
Image.MAX_IMAGE_PIXELS = None
# PNG text chunks (tEXt, zTXt, iTXt) are decompressed when the file is opened, before any size
# check, and never used here: Pillow's default of 64 MiB let a 66 KB PNG of zTXt take 68 MB.
# (Each chunk, and an iCCP profile, stays limited to PngImagePlugin.MAX_TEXT_CHUNK, 1 MiB.)
PngImagePlugin.MAX_TEXT_MEMORY = 4 * PngImagePlugin.MAX_TEXT_CHUNK
# tifffile logs what it finds wrong in a header ("incorrect StripOffsets count (1 != 188)", once per
# read) as warnings; with no logging configured, Python printed them to stderr beside the one clear
# error a batch job or the service gives for the file. They stay available to an application that
# configures logging (records still reach the root logger's handlers, as in `bentoml serve`).
logging.getLogger("tifffile").addHandler(logging.NullHandler())


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
    _check_tiff_directories(data)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return _decode_tiff_page(_single_page(tif), data, max_pixels, io.BytesIO(data))
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode TIFF (truncated or corrupt?): {exc}") from exc


def _decode_tiff_page(page: tifffile.TiffPage, data, max_pixels: int, source, frame: int = 0) -> np.ndarray:
    """One page's pixels, once every limit has passed from its header (sizes, every buffer the
    decoder allocates); LZW through libtiff. `data`: the file's bytes (or an mmap of it); `source`:
    the file again, for Pillow (a path or a file object); `frame`: the page's index."""
    _check_tiff_page(page, max_pixels)
    workers = _check_tiff_segments(page, data, max_pixels * MAX_BYTES_PER_PIXEL)
    if int(page.compression) == _LZW:
        return _decode_lzw_with_libtiff(page, source, frame)
    return np.asarray(page.asarray(maxworkers=workers))


_LZW = 5


def _decode_lzw_with_libtiff(page: tifffile.TiffPage, source, frame: int = 0) -> np.ndarray:
    """An LZW page decoded by libtiff (through Pillow) instead of imagecodecs, whose LZW decoder
    (2026.3.6) crashes the whole process on a code not yet in its table: the four bytes 80 7F 20 50
    in a strip took a service worker down. libtiff refuses such a stream with an error, decodes
    LIVECell's LZW TIFFs as fast, and is fuzzed continuously (OSS-Fuzz). A layout Pillow reads
    differently from tifffile (other shape or dtype, e.g. 16-bit RGB) is refused rather than guessed."""
    try:
        with Image.open(source) as img:
            img.seek(frame)
            img.load()
            array = pil_to_array(img)
    except Exception as exc:
        raise ImageError(f"could not decode LZW TIFF (truncated or corrupt?): {exc}") from exc
    if array.shape != tuple(page.shape) or array.dtype != page.dtype:
        raise ImageError(f"this LZW-compressed TIFF layout ({page.dtype}, shape {tuple(page.shape)}) is not "
                         "accepted: save it uncompressed or with Deflate (ZIP) compression")
    return array


# --- TIFF: the header itself, checked before tifffile reads it ---
#
# When it opens a file, tifffile reads every entry of the first directory (IFD), and of the
# second when asked whether there is one; some values (strip and tile offsets and byte counts, bits
# per sample...) become Python tuples of ~36 bytes per 2- or 4-byte number, and nothing stops
# thousands of entries from pointing at one array (a 50 KB file of 500 such entries took 192 MB).
# Counting pages follows the chain of directories, and a loop of 100 or more directories never ends
# (a 63 KB file grew the service by 50 MB a second). So, before tifffile: those two directories
# may not declare more bytes of values than the file holds (values never overlap in a real file),
# nor more than MAX_TIFF_NUMBERS numbers; the chain may not loop nor run past MAX_TIFF_PAGES.

MAX_TIFF_NUMBERS = 1 << 20  # a 64 MP image in 16x16 tiles has 250,000 offsets and as many byte counts
MAX_TIFF_PAGES = 1000
_TIFF_MAX_ENTRIES = 4096  # tifffile's own limit: a directory with more ends the chain
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                    16: 8, 17: 8, 18: 8}
_TIFF_BYTE_TYPES = {1, 2, 6, 7}  # BYTE, ASCII, SBYTE, UNDEFINED: read as bytes or text, not numbers
_TIFF_RATIONALS = {5, 10}  # two numbers each


class _TiffLayout(NamedTuple):
    """Classic TIFF or BigTIFF, in either byte order."""
    byteorder: str
    offset: str  # struct code of offsets and value counts
    entry_count: str  # struct code of a directory's number of entries
    entry_size: int
    inline_size: int  # values this small sit in their entry, not elsewhere in the file

    @classmethod
    def of(cls, data: bytes) -> _TiffLayout:
        byteorder = "<" if data[:2] == b"II" else ">"
        if data[2:4] in (b"+\x00", b"\x00+"):
            return cls(byteorder, "Q", "Q", 20, 8)
        return cls(byteorder, "I", "H", 12, 4)

    def read(self, data: bytes, code: str, position: int) -> int | None:
        """The number at `position`, None past the end of the file."""
        fmt = self.byteorder + code
        if position < 0 or position + struct.calcsize(fmt) > len(data):
            return None
        return struct.unpack_from(fmt, data, position)[0]


def _check_tiff_directories(data, max_pages: int = MAX_TIFF_PAGES, frame: int = 0) -> None:
    """The chain of directories and the values of those tifffile reads (the first two, and the
    frame's), before tifffile opens the file. `data`: its bytes, or an mmap of it."""
    layout = _TiffLayout.of(data)
    directories = _tiff_directory_offsets(data, layout, max_pages)
    if len(directories) > max_pages:
        raise ImageError(f"multi-page TIFF (more than {max_pages:,} pages): send one 2-D image per file"
                         if max_pages == MAX_TIFF_PAGES else f"stack of more than {max_pages:,} frames")
    for offset in {*directories[:2], *directories[frame:frame + 1]}:
        _check_tiff_directory_values(data, layout, offset)


def _tiff_directory_offsets(data, layout: _TiffLayout, max_pages: int = MAX_TIFF_PAGES) -> list[int]:
    """Where the file's directories start, following the chain as tifffile does (it stops at a
    zero offset, one past the file, or an unreadable directory), up to one past `max_pages`."""
    offsets: list[int] = []
    seen: set[int] = set()  # a list's `in` made one walk of a 10,000-page stack take 0.4 s
    offset = layout.read(data, layout.offset, 4 if layout.offset == "I" else 8) or 0
    while 0 < offset < len(data) and len(offsets) <= max_pages:
        if offset in seen:  # tifffile misses loops of 100+
            raise ImageError("corrupt TIFF: its chain of image directories loops back on itself")
        entries = layout.read(data, layout.entry_count, offset)
        if entries is None or entries > _TIFF_MAX_ENTRIES:
            break
        offsets.append(offset)
        seen.add(offset)
        next_offset = offset + struct.calcsize(layout.entry_count) + entries * layout.entry_size
        offset = layout.read(data, layout.offset, next_offset) or 0
    return offsets


def _check_tiff_directory_values(data: bytes, layout: _TiffLayout, offset: int) -> None:
    entries = layout.read(data, layout.entry_count, offset) or 0
    first_entry = offset + struct.calcsize(layout.entry_count)
    value_bytes = numbers = 0
    for position in range(first_entry, first_entry + entries * layout.entry_size, layout.entry_size):
        kind = layout.read(data, "H", position + 2)
        count = layout.read(data, layout.offset, position + 4)
        if kind is None or count is None:
            break  # a directory cut short by the end of the file: tifffile refuses it
        size = count * _TIFF_TYPE_SIZES.get(kind, 1)
        value_bytes += size if size > layout.inline_size else 0
        if kind not in _TIFF_BYTE_TYPES:
            numbers += count * (2 if kind in _TIFF_RATIONALS else 1)
    if value_bytes > len(data):
        raise ImageError(f"corrupt TIFF: an image directory declares {value_bytes:,} bytes of values "
                         f"in a {len(data):,}-byte file")
    if numbers > MAX_TIFF_NUMBERS:
        raise ImageTooLargeError(f"TIFF image directory holds {numbers:,} numbers (strip or tile offsets, "
                                 f"byte counts...), over the limit of {MAX_TIFF_NUMBERS:,}")


# --- TIFF: every buffer tifffile allocates, bounded from the header before it allocates it ---
#
# tifffile decodes a page strip by strip or tile by tile (its "segments"): for each it allocates
# the segment's declared shape (tile length x tile width x samples x bytes per sample; a strip is
# rows per strip, clamped to the image, x image width), hands that buffer to the codec, then copies
# the segment into the output array; several segments at once when it decodes with threads. The
# pixel and byte limits above bound the output array only: a 64x64 image declaring one 49152x49152
# tile once made the service allocate 4.6 GB. The rules, all checked from the header:
# - a tile may extend at most TILE_OVERHANG px past its image (a real writer pads the image to a
#   multiple of its tile size, and tiles of small images are at most 1024 px: OME pyramids use
#   512-1024); the 49152x49152 tile of a 64x64 image is the tell-tale of the bomb;
# - one segment may not take more bytes to decode than the whole image may (max_pixels x
#   MAX_BYTES_PER_PIXEL), so a 64 MP 16-bit image in one strip (128 MB) still decodes, and the
#   segments decoded at once may not together either (fewer threads), so a decode needs at most
#   twice the decoded-byte limit, besides the file itself;
# - only codecs whose output size tifffile fixes from the segment's shape, and JPEG, whose frame
#   header is checked against the segment (JPEG 2000, PNG, WebP... in a TIFF decode to the size
#   their own header declares).

TILE_OVERHANG = 1024
# Codecs tifffile hands an output buffer of the segment's size (checked: a stream that inflates to
# more is an error, not a bigger buffer).
_SHAPE_BOUNDED_CODECS = {1: "uncompressed", 5: "LZW", 8: "Deflate", 32946: "Deflate", 32773: "PackBits",
                         34925: "LZMA", 50000: "Zstd"}
_JPEG = 7
_ACCEPTED_CODECS = ", ".join(dict.fromkeys(_SHAPE_BOUNDED_CODECS.values())) + " or JPEG"


def _check_tiff_segments(page: tifffile.TiffPage, data: bytes, byte_limit: int) -> int:
    """Refuse a page whose strips or tiles would make the decoder allocate more than `byte_limit`
    (see above); return how many segments may be decoded at once within it."""
    compression = int(page.compression)
    if compression not in _SHAPE_BOUNDED_CODECS and compression != _JPEG:
        raise ImageError(f"TIFF compression {_codec_name(compression)} is not accepted: "
                         f"use {_ACCEPTED_CODECS}")
    if page.dtype is None:
        return 1  # tifffile decodes nothing: it answers an empty array, refused as not 2-D
    if page.is_tiled:
        _check_tile_fits_image(page)
    for bytecount in page.databytecounts:
        if bytecount > len(data):
            raise ImageError(f"corrupt TIFF: a {_segment_kind(page)} declares {int(bytecount):,} bytes "
                             f"in a {len(data):,}-byte file")
    segment_bytes = _segment_decode_bytes(page, len(data))
    if segment_bytes > byte_limit:
        rows, columns, samples = _segment_shape(page)
        raise ImageTooLargeError(
            f"one TIFF {_segment_kind(page)} ({columns}x{rows} px, {samples} sample(s) of "
            f"{page.bitspersample} bits) would take {segment_bytes:,} bytes to decode, "
            f"over the limit of {byte_limit:,}")
    if compression == _JPEG:
        _check_jpeg_frames(page, data)
    return max(1, min(tifffile.TIFF.MAXWORKERS, byte_limit // max(segment_bytes, 1)))


def _codec_name(compression: int) -> str:
    try:
        return f"{tifffile.COMPRESSION(compression).name} ({compression})"
    except ValueError:
        return str(compression)


def _segment_kind(page: tifffile.TiffPage) -> str:
    return "tile" if page.is_tiled else "strip"


def _segment_shape(page: tifffile.TiffPage) -> tuple[int, int, int]:
    """Rows, columns and samples of the buffer tifffile allocates for one strip or tile."""
    samples = int(page.samplesperpixel) if page.planarconfig == 1 else 1  # planar: one sample a segment
    if page.is_tiled:
        return int(page.tilelength) * int(page.tiledepth), int(page.tilewidth), samples
    # tifffile clamps rows per strip to the image: 2**32-1 ("one strip") is common and harmless
    return min(int(page.rowsperstrip), int(page.imagelength)), int(page.imagewidth), samples


def _segment_decode_bytes(page: tifffile.TiffPage, file_size: int) -> int:
    """Bytes tifffile allocates to decode the largest strip or tile: the decoded segment, or the
    bytes read for it if more (uncompressed data is used as read), times the unpacking of packed
    samples (1-, 2-, 4-, 12-, 24-bit...: every packed value of the buffer is unpacked)."""
    rows, columns, samples = _segment_shape(page)
    itemsize = page.dtype.itemsize
    bits = page.bitspersample
    smallest_bits = min(bits) if isinstance(bits, tuple) else int(bits)
    unpacking = max(1, math.ceil(8 * itemsize / max(smallest_bits, 1)))
    largest_read = min(max(page.databytecounts, default=0), file_size)
    return max(rows * columns * samples * itemsize, largest_read) * unpacking


def _check_tile_fits_image(page: tifffile.TiffPage) -> None:
    width, length, depth = int(page.imagewidth), int(page.imagelength), int(page.imagedepth)
    tile_width, tile_length, tile_depth = int(page.tilewidth), int(page.tilelength), int(page.tiledepth)
    if tile_width > width + TILE_OVERHANG or tile_length > length + TILE_OVERHANG or tile_depth > depth:
        planes = f", {tile_depth} planes deep," if tile_depth > 1 else ""
        raise ImageTooLargeError(
            f"TIFF declares {tile_width}x{tile_length} tiles{planes} for a {width}x{length} image: "
            f"a tile may extend at most {TILE_OVERHANG} px past its image")


def _check_jpeg_frames(page: tifffile.TiffPage, data: bytes) -> None:
    """A JPEG segment decodes to the size its own frame header (SOF) declares, not to the tile's:
    each must fit its segment."""
    rows, columns, samples = _segment_shape(page)
    streams = [bytes(page.jpegtables or b""), bytes(page.jpegheader or b"")]
    streams += [data[offset:offset + count] for offset, count in zip(page.dataoffsets, page.databytecounts)]
    for stream in streams:
        frame = _jpeg_frame(stream)
        if frame is not None and (frame[0] > rows or frame[1] > columns or frame[2] > samples):
            raise ImageTooLargeError(
                f"a JPEG {_segment_kind(page)} of this TIFF declares a {frame[1]}x{frame[0]} frame of "
                f"{frame[2]} component(s), larger than its {columns}x{rows} {_segment_kind(page)} "
                f"of {samples} sample(s)")


# SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC), which share the range
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame(stream: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG stream's frame header, found as libjpeg finds it
    (marker by marker, skipping stray bytes); None when the header ends (scan data, end of image)
    without one."""
    position = 0
    while True:
        position = stream.find(b"\xff", position)
        if position < 0 or position + 1 >= len(stream):
            return None
        marker = stream[position + 1]
        if marker in (0x00, 0xFF):  # a stuffed or fill byte, not a marker
            position += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        elif marker in _JPEG_FRAME_MARKERS:
            if position + 10 > len(stream):
                return None
            rows, columns, components = struct.unpack_from(">HHB", stream, position + 5)
            return rows, columns, components
        else:
            position += 2 + int.from_bytes(stream[position + 2:position + 4], "big")


_PIL_BYTES_PER_BAND = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image (expected PNG, JPEG or TIFF)") from exc
    except Exception as exc:
        raise ImageError(f"could not open image: {exc}") from exc
    if img.format not in PILLOW_FORMATS:
        raise ImageError(f"{img.format} images are not accepted: use PNG, JPEG or TIFF")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageError(f"animated {img.format} with {img.n_frames} frames: use one still image")
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
    if data[:4] in TIFF_MAGIC:
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
        data = path.read_bytes()
        if not data:  # said of the file, not in the service's words for an empty upload
            raise ImageError("empty file (0 bytes)")
        arr = decode_image(data, max_pixels)
    gray = to_grayscale(arr)
    _check_size(*gray.shape, max_pixels)
    return gray


def declared_pixels(path: str | Path) -> int | None:
    """Width x height as the file's header declares them, without decoding a pixel (None when the
    header cannot be read: decoding will then say what is wrong). For admitting work by its size."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) in TIFF_MAGIC:
                with _mapped(path) as data:  # tifffile reads nothing a hostile header could inflate
                    _check_tiff_directories(data)
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
# A frame interval outside these is damage, not an experiment (it would make every time 0, or infinite).
MIN_INTERVAL_S, MAX_INTERVAL_S = 1e-6, 1e8
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


# A stack's frames are read one by one, each checked as a single image, so a batch job takes more
# pages than the service (MAX_TIFF_PAGES); the bound keeps walking the chain of directories cheap.
MAX_STACK_FRAMES = 10_000


@contextlib.contextmanager
def _mapped(path: str | Path):
    """The file's bytes as a read-only memory map: header checks read what they need of a
    multi-gigabyte stack without loading it."""
    with open(path, "rb") as fh:
        try:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ImageError(f"empty file: {path}") from None
        try:
            yield data
        finally:
            data.close()


def stack_info(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> StackInfo:
    """A file as a batch job reads it: a single image (anything but a multi-page TIFF) or a time-lapse
    stack whose pages are its frames. Only headers are read. Raises ImageError for a stack that is not
    a time-lapse (Z-slices, channels, several positions, pages of different sizes) and for frames over
    the limits a single image has, so that a whole stack is refused once, with one reason."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"no such file: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) not in TIFF_MAGIC:
            return SINGLE_IMAGE
    try:
        with _mapped(path) as data:
            _check_tiff_directories(data, MAX_STACK_FRAMES)  # a looping chain made counting pages endless
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
        return (f"OME-TIFF with {len(tif.series)} image series (positions or wells): cellseg takes one "
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
    return f"{what} of {found}: cellseg takes time-lapse stacks (frames only); {advice}"


def _frame_interval_s(tif: tifffile.TiffFile) -> float | None:
    """Seconds between frames as ImageJ (`finterval`, `tunit`) or OME (`TimeIncrement`) metadata state it."""
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        return _seconds(meta.get("finterval"), meta.get("tunit", "sec"))
    if tif.is_ome:
        pixels = ome_pixels_attributes(tif.ome_metadata or "")
        return _seconds(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit", "s"))
    return None


def ome_pixels_attributes(ome_xml: str) -> dict[str, str]:
    """The first image's <Pixels> attributes, whatever the OME schema version (namespace); none
    where the XML is unreadable or declares a DTD (OME-XML never needs one; refusing it keeps entity
    expansion out of an upload's header)."""
    import xml.etree.ElementTree as ET

    if "<!DOCTYPE" in ome_xml or "<!ENTITY" in ome_xml:
        return {}
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
    if factor is None:
        return None
    seconds = number * factor  # checked after the conversion: 1e308 days is not finite in seconds
    return seconds if np.isfinite(seconds) and MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S else None


def _check_tiff_page(page: tifffile.TiffPage, max_pixels: int) -> None:
    """The limits a single TIFF image has, from one page's header, before any of its pixels is decoded."""
    if page.imagedepth > 1:
        raise ImageError(f"TIFF page is a {page.imagedepth}-plane volume; use one 2-D image per file")
    samples = int(page.samplesperpixel)
    if samples > 4:
        raise ImageError(f"TIFF has {samples} samples per pixel; expected gray, RGB or RGBA")
    _check_size(int(page.imagelength), int(page.imagewidth), max_pixels, decoded_bytes=int(page.nbytes))


def read_frame(path: str | Path, frame: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Frame `frame` (0-based) of a time-lapse stack (see `stack_info`), in the file's own dtype and
    channels: only that page is decoded, never the whole stack, after the checks a single image has."""
    try:
        with _mapped(path) as data:
            _check_tiff_directories(data, MAX_STACK_FRAMES, max(frame, 0))
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
                # the same limits, buffer bounds and LZW decoder as a single image
                return _decode_tiff_page(page, data, max_pixels, str(path), frame)
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode frame {frame} of the TIFF (truncated or corrupt?): {exc}") from exc
