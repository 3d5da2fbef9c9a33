"""Physical pixel size (µm per pixel) of an image: read from its metadata, or given by the user, and
the measurements in µm and µm² it gives.

Where a size comes from, in order (the first that applies wins):
1. given: `cellseg segment --pixel-size UM` (or `X,Y`), the service's `pixel_size` form field, the
   client's `pixel_size=`, the web page's pixel-size field. A given size overrides the metadata.
2. OME-TIFF: `PhysicalSizeX`/`PhysicalSizeY` of the first `Pixels` element, with their units
   (`PhysicalSizeXUnit`, default µm as the OME schema says). Both must be there.
3. ImageJ TIFF: the description's `unit` (`yunit` where it differs) with the XResolution and
   YResolution tags, which ImageJ writes as pixels per unit.
4. Plain TIFF resolution tags with ResolutionUnit centimetre: µm/px = 10,000 / (pixels per cm).

Not read, on purpose:
- TIFF resolution in inches (ResolutionUnit 2, TIFF's default): scanners, screenshots and image
  editors write 72, 96 or 300 dpi there, a print or screen resolution, not a microscope's
  calibration; taking it would turn a 72 dpi screenshot into 353 µm pixels. ImageJ's unit `inch`
  is refused for the same reason (ImageJ sets it from such tags when it opens a file).
- PNG `pHYs` (pixels per metre, the PNG's only unit): image editors write their screen dpi there
  (2835 px/m = 72 dpi) and microscope software does not calibrate PNGs through it, so a value there
  says nothing about the specimen. JPEG: the same (JFIF density is dpi).
  For such images, give the size.
A size outside 1e-4 .. 1e4 µm/px, or a unit not known here (pixel, inch, ...), counts as none.

Measurements: pixel values stay as they are; physical ones are added beside them (`area_um2`,
`perimeter_um`, `major_axis_length_um`, `minor_axis_length_um`) when a size is known.
Anisotropic pixels (x != y): areas are exact (px x x_um x y_um). Lengths (perimeter, axes) are
measured on the pixel grid, and a length's physical value depends on its direction when pixels are
not square; they are scaled by the geometric mean sqrt(x_um * y_um), exact for square pixels and an
approximation otherwise (within the ratio sqrt(x/y) of the truth: 2.5% for pixels 5% taller than
wide). Microscope cameras have square pixels; anisotropy mostly comes from a resampled image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import tifffile

from cellseg.imageio import TIFF_MAGIC, ome_pixels_attributes

# Sane bounds for a pixel size: 0.1 nm (beyond electron microscopy) to 1 cm (a photographed plate).
MIN_UM, MAX_UM = 1e-4, 1e4

SOURCE_IMAGEJ = "ImageJ metadata"
SOURCE_OME = "OME-TIFF metadata"
SOURCE_TIFF_CM = "TIFF resolution tags (cm)"
SOURCE_GIVEN_CLI = "given (--pixel-size)"
SOURCE_GIVEN_FIELD = "given (pixel_size field)"

# µm per unit, for the unit names ImageJ and OME-XML write (lower-cased; Greek mu read as micro sign).
UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
               "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4}

# Physical measurements added to a cell, from the pixel ones, and their units (for the page's labels).
LENGTH_MEASUREMENTS = ("perimeter", "major_axis_length", "minor_axis_length")
PHYSICAL_UNITS = {"area_um2": "µm²", **{f"{key}_um": "µm" for key in LENGTH_MEASUREMENTS}}

SIGNIFICANT_DIGITS = 6  # of a physical measurement: more than any segmentation is accurate to


@dataclass(frozen=True)
class PixelSize:
    """The physical size of one pixel: x_um wide, y_um tall, and where that came from, in words."""

    x_um: float
    y_um: float
    source: str

    @property
    def area_um2(self) -> float:
        return self.x_um * self.y_um

    @property
    def length_um(self) -> float:
        """µm per pixel of length: exact for square pixels, the geometric mean otherwise (module docstring)."""
        return math.sqrt(self.x_um * self.y_um)

    def to_dict(self) -> dict:
        """The record's and the answers' `pixel_size`: {"x_um": float, "y_um": float, "source": str}."""
        return {"x_um": self.x_um, "y_um": self.y_um, "source": self.source}


def given_pixel_size(x_um: object, y_um: object | None = None, source: str = SOURCE_GIVEN_FIELD) -> PixelSize:
    """A size the user gave (y defaults to x: square pixels), checked: a number, finite, within
    MIN_UM .. MAX_UM. Raises ValueError saying what is wrong."""
    values = []
    for value in (x_um, x_um if y_um is None else y_um):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"pixel_size must be a number of µm per pixel, got {value!r}")
        if not math.isfinite(value) or not MIN_UM <= value <= MAX_UM:
            raise ValueError(f"pixel_size must be between {MIN_UM:g} and {MAX_UM:g} µm per pixel, got {value!r}")
        values.append(float(value))
    return PixelSize(values[0], values[1], source)


def parse_pixel_size(text: str, source: str = SOURCE_GIVEN_CLI) -> PixelSize:
    """`0.65` (square pixels) or `0.65,0.7` (x,y) in µm per pixel, as `--pixel-size` takes it."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(f"pixel size {text!r}: give one number (µm per pixel) or two, x,y")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"pixel size {text!r}: give one number (µm per pixel) or two, x,y") from None
    return given_pixel_size(*numbers, source=source)


def read_pixel_size(source: str | Path | bytes) -> PixelSize | None:
    """The pixel size a TIFF's metadata states (OME-XML, ImageJ, resolution tags in cm), or None:
    for other formats, files without one, and anything unreadable (the image's decoder reports
    that). Reads headers only, never pixel data."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if data[:4] not in TIFF_MAGIC:
                return None
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                return _tiff_pixel_size(tif)
        with open(source, "rb") as fh:
            if fh.read(4) not in TIFF_MAGIC:
                return None
        with tifffile.TiffFile(source) as tif:
            return _tiff_pixel_size(tif)
    except Exception:  # noqa: BLE001  (metadata is optional: a corrupt header means no known size)
        return None


def _tiff_pixel_size(tif: tifffile.TiffFile) -> PixelSize | None:
    for reader in (_ome_pixel_size, _imagej_pixel_size, _centimetre_pixel_size):
        size = reader(tif)
        if size is not None:
            return size
    return None


def _um_per_unit(unit: object) -> float | None:
    if not isinstance(unit, str):
        return None
    name = unit.strip().lower().replace("\\u00b5", "µ").replace("\u03bc", "µ")  # ImageJ's escape, Greek mu
    return UM_PER_UNIT.get(name)


def _sane(x_um: float, y_um: float, source: str) -> PixelSize | None:
    """The size, float noise of rational tags rounded off, or None where it cannot be a pixel's."""
    if not all(math.isfinite(v) and MIN_UM <= v <= MAX_UM for v in (x_um, y_um)):
        return None
    return PixelSize(float(f"{x_um:.9g}"), float(f"{y_um:.9g}"), source)


def _resolution(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """Pixels per unit in X and Y from the page's rational tags; None where either is missing or n/0.
    (tifffile reads n/0 as n and a missing tag as 1: a made-up calibration.)"""
    values = []
    for code in (282, 283):  # XResolution, YResolution
        tag = page.tags.get(code)
        value = tag.value if tag is not None else None
        if not (isinstance(value, tuple) and len(value) == 2 and value[1]):
            return None
        values.append(value[0] / value[1])
    return values[0], values[1]


def _per_resolution(unit_um: float | None, pixels_per_unit: float) -> float | None:
    if unit_um is None or not pixels_per_unit or not math.isfinite(pixels_per_unit):
        return None
    return unit_um / pixels_per_unit


def _ome_pixel_size(tif: tifffile.TiffFile) -> PixelSize | None:
    pixels = ome_pixels_attributes(tif.ome_metadata or "")
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        unit_um = _um_per_unit(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if value is None or unit_um is None:
            return None
        sizes.append(float(value) * unit_um)
    return _sane(*sizes, SOURCE_OME)


def _imagej_pixel_size(tif: tifffile.TiffFile) -> PixelSize | None:
    metadata = tif.imagej_metadata
    if not metadata or "unit" not in metadata:
        return None
    resolution = _resolution(tif.pages.first)
    if resolution is None:
        return None
    x_res, y_res = resolution
    x_um = _per_resolution(_um_per_unit(metadata["unit"]), x_res)
    y_um = _per_resolution(_um_per_unit(metadata.get("yunit", metadata["unit"])), y_res)
    return None if x_um is None or y_um is None else _sane(x_um, y_um, SOURCE_IMAGEJ)


def _centimetre_pixel_size(tif: tifffile.TiffFile) -> PixelSize | None:
    page = tif.pages.first
    if page.resolutionunit != tifffile.RESUNIT.CENTIMETER:
        return None  # inches (TIFF's default) or none: see the module docstring
    resolution = _resolution(page)
    if resolution is None:
        return None
    x_res, y_res = resolution
    x_um, y_um = _per_resolution(1e4, x_res), _per_resolution(1e4, y_res)
    return None if x_um is None or y_um is None else _sane(x_um, y_um, SOURCE_TIFF_CM)


def _significant(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def add_physical_measurements(cells: list[dict], size: PixelSize | None) -> list[dict]:
    """Add `area_um2` and, for the lengths a cell has, `perimeter_um`, `major_axis_length_um` and
    `minor_axis_length_um`, to every cell (in place, and returned); nothing where no size is known."""
    if size is None:
        return cells
    for cell in cells:
        cell["area_um2"] = _significant(cell["area"] * size.area_um2)
        for key in LENGTH_MEASUREMENTS:
            if key in cell:
                cell[f"{key}_um"] = _significant(cell[key] * size.length_um)
    return cells
