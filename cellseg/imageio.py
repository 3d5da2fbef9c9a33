"""Image decoding and validation shared by training, serving, batch jobs and the client.

Everything that turns bytes or a file into a 2-D float array goes through `load_grayscale`, so the
model sees the same numbers whatever the container format (TIFF, PNG, JPEG), bit depth (8/16-bit,
float) or colour layout (grayscale, RGB, RGBA) of the input.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

# A single LIVECell image is 704x520 (0.37 MP); 64 MP covers whole-well mosaics while keeping the
# float32 working set of one request (image + 3 probability maps + labels) under ~1.5 GB.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 16

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, Image.Image]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Pillow's own decompression-bomb guard would fire before ours with a less useful message.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The input is not a usable image (not an image, truncated, empty, wrong shape)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit."""


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels; both sides must be at least {MIN_SIDE}")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {height * width:,} pixels, over the limit of {max_pixels:,}"
        )


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = page.shape
            spatial = [s for s in shape if s not in (1, 2, 3, 4)] or list(shape)
            if len(spatial) >= 2:
                _check_size(int(spatial[0]), int(spatial[1]), max_pixels)
            return np.asarray(page.asarray())
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageError(f"could not decode TIFF (truncated or corrupt?): {exc}") from exc


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError("not a recognised image (expected PNG, JPEG or TIFF)") from exc
    except Exception as exc:
        raise ImageError(f"could not open image: {exc}") from exc
    _check_size(img.height, img.width, max_pixels)
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
