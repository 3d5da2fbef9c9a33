"""TIFFs whose header makes a decoder allocate far more than the file holds (issue 18, item 1), for
tests/test_imageio.py and scripts/fuzz_api.py.

Each is written by tifffile from a tiny array and then has its header patched (tile size, byte
counts...), so building one allocates nothing big. The decoder allocates from the header alone:
the issue's 4.7 MB file (a 64x64 image with one 49152x49152 Deflate tile of zeros) and
`hostile_tiffs()["tile_49152_deflate"]` (the same header, a few hundred bytes of data) made
tifffile allocate the same 4.5 GiB tile buffer.

    python scripts/hostile_tiffs.py OUT_DIR     # writes each as OUT_DIR/<name>.tif
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

_VALUE_FORMATS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the types of size tags


def tiff(array: np.ndarray, **options) -> bytes:
    """`array` written by tifffile.imwrite with `options` (tile, compression, bigtiff...)."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def patch_tags(data: bytes, values: dict[int, int]) -> bytes:
    """`data` with the first page's tags set to `values` ({tag code: value}, every value of a
    multi-valued tag), rewritten where the file stores them, in its byte order."""
    import tifffile

    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        for code, value in values.items():
            tag = page.tags[code]
            value_format = tif.byteorder + _VALUE_FORMATS[tag.dtype] * tag.count
            struct.pack_into(value_format, out, tag.valueoffset, *[value] * tag.count)
    return bytes(out)


def replace_first_segment(data: bytes, payload: bytes) -> bytes:
    """`data` with its first strip or tile (the file's last bytes, as tifffile writes one segment)
    replaced by `payload`, its byte count set to match."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        offset, count = page.dataoffsets[0], page.databytecounts[0]
        bytecounts_tag = 325 if page.is_tiled else 279
    assert offset + count == len(data), "the segment must end the file"
    return patch_tags(data[:offset] + payload, {bytecounts_tag: len(payload)})


def deflate_zeros(size: int) -> bytes:
    """A Deflate stream of `size` zero bytes (about 1/1000 of it), compressed piece by piece."""
    compressor, piece, parts = zlib.compressobj(9), bytes(1 << 24), []
    while size > 0:
        parts.append(compressor.compress(piece[: min(size, len(piece))]))
        size -= len(piece)
    return b"".join(parts) + compressor.flush()


def tile_bomb(tile_side: int, dtype=np.uint8, filled: bool = False, **options) -> bytes:
    """A 64x64 image declaring one `tile_side`² Deflate tile; `filled`: the tile's data really
    inflates to the whole tile (tile_side² x item size bytes of zeros; slow past ~16384)."""
    small = tiff(np.zeros((64, 64), dtype), tile=(64, 64), compression="zlib", **options)
    if filled:
        small = replace_first_segment(small, deflate_zeros(tile_side * tile_side * np.dtype(dtype).itemsize))
    return patch_tags(small, {322: tile_side, 323: tile_side})


def jpeg_frame_bomb(side: int = 8192, tiled: bool = True) -> bytes:
    """A 64x64 JPEG-compressed TIFF whose one segment is a `side`² JPEG (it decodes to its own
    frame's size, not the tile's)."""
    import imagecodecs

    layout = {"tile": (64, 64)} if tiled else {"rowsperstrip": 64}
    small = tiff(np.zeros((64, 64), np.uint8), compression="jpeg", **layout)
    return replace_first_segment(small, imagecodecs.jpeg8_encode(np.zeros((side, side), np.uint8)))


def png_in_tiff(side: int = 8192) -> bytes:
    """A 64x64 PNG-compressed TIFF tile holding a `side`² PNG."""
    import imagecodecs

    small = tiff(np.zeros((64, 64), np.uint8), tile=(64, 64), compression="png")
    return replace_first_segment(small, imagecodecs.png_encode(np.zeros((side, side), np.uint8)))


def bilevel_overlong_strip(strip_bytes: int = 2 << 20) -> bytes:
    """A 64x64 1-bit uncompressed TIFF whose one strip holds `strip_bytes` (tifffile unpacks every
    bit of it to a byte: 8x)."""
    small = tiff(np.zeros((64, 64), bool))
    return replace_first_segment(small, bytes(strip_bytes))


def directory_bomb(entries: int = 500, values: int = 10_000, code: int = 273) -> bytes:
    """A 64x64 8-bit TIFF written by hand whose directory also holds `entries` copies of tag
    `code` (StripOffsets: read into a tuple as soon as the file is opened), each declaring the
    same array of `values` distinct LONGs: tifffile builds a tuple of ints for every entry."""
    base = {256: (4, 1, 64), 257: (4, 1, 64), 258: (3, 1, 8), 259: (3, 1, 1), 262: (3, 1, 1),
            273: (4, 1, 0), 277: (3, 1, 1), 278: (4, 1, 64), 279: (4, 1, 4096)}
    table = 8 + 2 + 12 * (len(base) + entries) + 4
    pixels = table + 4 * values
    base[273] = (4, 1, pixels)
    rows = [(tag, *base[tag]) for tag in sorted(base)] + [(code, 4, values, table)] * entries
    directory = struct.pack("<H", len(rows)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) if kind == 4
        else struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in rows)
    distinct = (np.arange(values, dtype="<u4") + 2**30).tobytes()  # not the small ints Python shares
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + distinct + bytes(4096)


def looped_directories(pages: int = 150) -> bytes:
    """A `pages`-page TIFF whose last directory points back at the first: tifffile only looks for
    loops once, at its 100th page, so counting the pages of a longer loop never ends."""
    import tifffile

    data = bytearray(tiff(np.zeros((pages, 16, 16), np.uint8)))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        first, last = tif.pages[0].offset, tif.pages[-1].offset
    entries = struct.unpack_from("<H", data, last)[0]
    struct.pack_into("<I", data, last + 2 + 12 * entries, first)
    return bytes(data)


def hostile_tiffs() -> dict[str, bytes]:
    """Name -> file, one for each way a TIFF header can ask for a buffer its image does not need."""
    gray = np.zeros((64, 64), np.uint8)
    return {
        # the file: its header (49152² uint16 tile = 4.5 GiB), not its 4.7 MB of zeros
        "tile_49152_deflate": tile_bomb(49152, np.uint16),
        "tile_32768_uncompressed": patch_tags(tiff(gray, tile=(64, 64)), {322: 32768, 323: 32768}),
        "tile_16384_lzw": patch_tags(tiff(gray, tile=(64, 64), compression="lzw"), {322: 16384, 323: 16384}),
        "tile_16384_planar_rgb": patch_tags(
            tiff(np.zeros((3, 64, 64), np.uint8), tile=(64, 64), compression="zlib", planarconfig="separate",
                 photometric="rgb"), {322: 16384, 323: 16384}),
        "tile_16384_bigtiff_big_endian": tile_bomb(16384, bigtiff=True, byteorder=">"),
        "tile_8192_float64": tile_bomb(8192, np.float64),
        "jpeg_tile_holding_8192_frame": jpeg_frame_bomb(8192, tiled=True),
        "jpeg_strip_holding_8192_frame": jpeg_frame_bomb(8192, tiled=False),
        "png_tile_holding_8192_png": png_in_tiff(8192),
        "strip_bytecount_4_gb": patch_tags(tiff(gray, compression="zlib"), {279: 4_000_000_000}),
        "samples_per_pixel_65535": patch_tags(tiff(gray), {277: 65535}),
        "one_offset_array_read_500_times": directory_bomb(500, 10_000),
        "2_million_strip_byte_counts": directory_bomb(1, 2_000_000, code=279),
        "directories_looping_after_150_pages": looped_directories(150),
        # not a memory bomb: imagecodecs' LZW decoder ended the process on this code (Clear, then 508)
        "lzw_code_not_yet_in_table": replace_first_segment(tiff(gray, compression="lzw"), bytes.fromhex("807f2050")),
    }


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in hostile_tiffs().items():
        (out / f"{name}.tif").write_bytes(data)
        print(f"{name}.tif: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
