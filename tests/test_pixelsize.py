"""Pixel sizes read from synthetic TIFFs of every kind of metadata (written with tifffile), sizes
given by the user, and the µm measurements they give."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.pixelsize import (
    SOURCE_IMAGEJ,
    SOURCE_OME,
    SOURCE_TIFF_CM,
    PixelSize,
    add_physical_measurements,
    given_pixel_size,
    parse_pixel_size,
    read_pixel_size,
)

PIXELS = np.zeros((32, 40), np.uint16)


def tiff(**options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, PIXELS, **options)
    return buffer.getvalue()


def assert_size(size: PixelSize | None, x_um: float, y_um: float, source: str) -> None:
    assert size is not None
    assert (size.x_um, size.y_um, size.source) == (pytest.approx(x_um, rel=1e-9), pytest.approx(y_um, rel=1e-9), source)


# ImageJ writes µm as "micron" or escaped as "\\u00B5m" (its description is ASCII)
@pytest.mark.parametrize("unit, um_per_unit", [("um", 1), ("micron", 1), ("\\u00B5m", 1), ("nm", 1e-3), ("mm", 1e3)])
def test_imagej_unit_and_resolution(unit, um_per_unit):
    """ImageJ writes pixels per unit in the resolution tags and the unit in its description."""
    data = tiff(imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": unit})
    assert_size(read_pixel_size(data), 0.65 * um_per_unit, 0.65 * um_per_unit, SOURCE_IMAGEJ)


def test_imagej_anisotropic_pixels_and_a_path(tmp_path):
    path = tmp_path / "cells.tif"
    path.write_bytes(tiff(imagej=True, resolution=(1 / 0.65, 1 / 0.5), metadata={"unit": "micron"}))
    assert_size(read_pixel_size(path), 0.65, 0.5, SOURCE_IMAGEJ)
    assert_size(read_pixel_size(str(path)), 0.65, 0.5, SOURCE_IMAGEJ)


def test_imagej_without_a_length_unit_has_no_size():
    assert read_pixel_size(tiff(imagej=True, resolution=(2.0, 2.0))) is None  # ImageJ's "pixel"
    assert read_pixel_size(tiff(imagej=True, resolution=(72.0, 72.0), metadata={"unit": "inch"})) is None


@pytest.mark.parametrize("metadata, x_um, y_um", [
    ({"PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 650, "PhysicalSizeYUnit": "nm"}, 0.65, 0.65),
    ({"PhysicalSizeX": 0.65, "PhysicalSizeY": 0.7}, 0.65, 0.7),  # OME's default unit is µm
    ({"PhysicalSizeX": 0.325, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.000325, "PhysicalSizeYUnit": "mm"},
     0.325, 0.325),
])
def test_ome_physical_sizes_with_their_units(metadata, x_um, y_um):
    assert_size(read_pixel_size(tiff(ome=True, metadata=metadata)), x_um, y_um, SOURCE_OME)


def test_ome_without_physical_sizes_or_with_a_dtd_has_none():
    assert read_pixel_size(tiff(ome=True)) is None
    assert read_pixel_size(tiff(ome=True, metadata={"PhysicalSizeX": 0.65})) is None  # y unknown
    hostile = ('<?xml version="1.0"?><!DOCTYPE OME [<!ENTITY a "0.65">]>'
               '<OME><Image><Pixels PhysicalSizeX="&a;" PhysicalSizeY="&a;"/></Image></OME>')
    assert read_pixel_size(tiff(description=hostile, metadata=None)) is None


def test_tiff_resolution_in_centimetres_counts_in_inches_does_not():
    assert_size(read_pixel_size(tiff(resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER")),
                0.5, 0.25, SOURCE_TIFF_CM)
    # 300 dpi from a scanner, or 72 from a screenshot: a print resolution, not a calibration
    assert read_pixel_size(tiff(resolution=(300, 300), resolutionunit="INCH")) is None
    assert read_pixel_size(tiff(resolution=(72, 72))) is None


def test_no_metadata_other_formats_and_garbage_have_none(tmp_path):
    assert read_pixel_size(tiff()) is None
    png = io.BytesIO()
    Image.fromarray(PIXELS.astype(np.uint8)).save(png, format="PNG", dpi=(25400 / 0.65, 25400 / 0.65))
    assert read_pixel_size(png.getvalue()) is None  # PNG pHYs: not read (see cellseg/pixelsize.py)
    assert read_pixel_size(b"II*\x00" + b"\xff" * 20) is None
    assert read_pixel_size(tmp_path / "missing.tif") is None
    assert read_pixel_size(tiff(resolution=(1e-9, 1e-9), resolutionunit="CENTIMETER")) is None  # 1e13 µm: not a pixel


def test_given_sizes_are_checked():
    assert given_pixel_size(0.65) == PixelSize(0.65, 0.65, "given (pixel_size field)")
    assert parse_pixel_size("0.65,0.5") == PixelSize(0.65, 0.5, "given (--pixel-size)")
    assert parse_pixel_size(" 2 ") == PixelSize(2.0, 2.0, "given (--pixel-size)")
    for bad in (-1, 0, math.nan, math.inf, 1e5, "abc", True, None):
        with pytest.raises(ValueError, match="pixel_size must be"):
            given_pixel_size(bad)
    for text in ("abc", "1,2,3", "", "0.5,-1"):
        with pytest.raises(ValueError, match="pixel"):
            parse_pixel_size(text)


def test_physical_measurements_scale_areas_exactly_and_lengths_by_the_geometric_mean():
    cells = [{"cell_id": 1, "area": 100, "perimeter": 40.0, "major_axis_length": 12.5, "minor_axis_length": 10.0},
             {"id": 2, "area": 7}]  # a `segment` answer's cell: area only
    assert add_physical_measurements([dict(c) for c in cells], None) == cells
    square = add_physical_measurements([dict(c) for c in cells], PixelSize(0.5, 0.5, "test"))
    assert square[0] == {**cells[0], "area_um2": 25.0, "perimeter_um": 20.0, "major_axis_length_um": 6.25,
                         "minor_axis_length_um": 5.0}
    assert square[1] == {"id": 2, "area": 7, "area_um2": 1.75}
    oblong = add_physical_measurements([dict(cells[0])], PixelSize(0.4, 0.9, "test"))[0]
    assert oblong["area_um2"] == pytest.approx(100 * 0.4 * 0.9)
    assert oblong["perimeter_um"] == pytest.approx(40 * math.sqrt(0.4 * 0.9))


def over_zero(data: bytes, codes=(282, 283)) -> bytes:
    """The TIFF with the denominators of its resolution rationals set to 0 (tifffile refuses to write them)."""
    raw = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for code in codes:
            offset = tif.pages.first.tags[code].valueoffset
            raw[offset + 4 : offset + 8] = bytes(4)
    return bytes(raw)


@pytest.mark.parametrize("options, codes", [({"resolutionunit": "CENTIMETER"}, (282, 283)),
                                            ({"imagej": True, "metadata": {"unit": "micron"}}, (282, 283)),
                                            ({"imagej": True, "metadata": {"unit": "cm"}}, (283,))])
def test_a_resolution_over_zero_is_no_calibration(options, codes):
    """Issue 27 (15): a TIFF resolution rational 1/0 was read as 1 px per unit (1 µm/px, or 1e4 µm/px in cm)."""
    data = tiff(resolution=(2.0, 2.0), **options)
    assert read_pixel_size(data) is not None  # calibrated as written
    assert read_pixel_size(over_zero(data, codes)) is None
