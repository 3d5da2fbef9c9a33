"""Cell outlines in the formats lab tools open: an ImageJ/Fiji ROI set (written by `roifile`) and a
QuPath GeoJSON FeatureCollection (geometry by `shapely`).

Coordinates: both ImageJ and QuPath put the origin at the top-left *corner* of the first pixel, so
pixel (row r, column c) covers x in [c, c+1), y in [r, r+1) and its centre is (c + 0.5, r + 0.5).
Outlines are traced through pixel centres by marching squares at level 0.5 on the cell's mask and
given in that frame: the rings of `skimage.measure.find_contours(mask, 0.5)`, vertex for vertex (a
ring may start at another of its vertices), traced by `contourpy`'s serial contour generator (C++;
skimage assembles its rings in Python, about 4x slower).

Every piece and every hole of a cell is kept. A cell's pixels may form several pieces: pieces are
4-connected (pixels touching only at a corner belong to different pieces), which is how
`find_contours` separates them by default (`fully_connected="low"`: background is 8-connected,
foreground 4-connected) and how contourpy settles such a saddle quad (its mean, 0.5, is not above the
level; `tests/test_formats.py` checks the rings against `find_contours`). A hole is background, or
another cell, enclosed by the cell. Each boundary between the cell and the rest is one closed ring;
rings never touch (each crossing between a pixel centre of the cell and one outside belongs to exactly
one ring), so filling the rings by pixel centres with the even-odd rule gives back exactly the cell's
pixels, and so do ImageJ and QuPath, which fill by pixel centres (`tests/test_formats.py` checks it on
synthetic cells, on every annotated LIVECell cell, on a fixed sample of the Sartorius images and on
the cells the fp32 and int8 models find on the demo images).

- QuPath GeoJSON: a `Polygon` per cell, with an interior ring per hole; a `MultiPolygon` (one polygon
  per piece) for a cell of several pieces. Exterior rings run counter-clockwise and holes clockwise
  (RFC 7946, in x/y coordinates). Every geometry is valid by construction (rings never touch; the
  tests check shapely's `is_valid`), as QuPath requires.
- ImageJ ROI set: one ROI per cell, named `cell-<id>` with the label id zero-padded to five digits
  (`cell-00042`). A page of a time-lapse stack names its ROIs `t0003-cell-00042` (frame 3, 0-based,
  as the frame's files are named) and gives each the 1-based stack position 4, so that Fiji's ROI
  Manager shows them on that frame of the stack and sets of several frames merge without clashing
  names (a time point saved as a file of its own is an image of its own: plain names, no position).
  A cell of one piece without holes is a polygon ROI (type POLYGON, sub-pixel
  vertices); any other cell is one composite ROI (ImageJ's shape ROI: every ring as a closed path,
  filled with the even-odd rule), which ImageJ measures and fills as the cell. (`roifile` reads a
  composite ROI's rings with `coordinates(multi=True)`; without it, only the longest.)
"""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING

import numpy as np
import shapely
from contourpy import FillType, LineType, SerialContourGenerator, ZInterp
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon

if TYPE_CHECKING:
    from roifile import ImagejRoi

PIXEL_CENTRE = 0.5  # shift from array indices (pixel centres) to corner-origin image coordinates
ROI_NAME_DIGITS = 5  # cell-00042: names sort in label order, and the label id is the number

# ImageJ path segment codes (java.awt.geom.PathIterator), as a composite ROI stores them
SEG_MOVETO, SEG_LINETO, SEG_CLOSE = 0, 1, 4


def cell_rings(labels: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Per cell id, every boundary ring of its mask (outer edges of its pieces and edges of its holes)
    as closed (N, 2) arrays of (x, y) vertices in corner-origin image coordinates."""
    padded = np.pad(labels, 1)  # one pixel of background around the image, so every ring closes
    # where each pixel centre of the padded image lies in corner-origin coordinates: contourpy
    # interpolates the vertices from these, so they come out in that frame (broadcast views, not
    # copies: two image-sized copies cost more than copying each cell's box when it is traced)
    x, y = np.meshgrid(np.arange(padded.shape[1]) - 1 + PIXEL_CENTRE, np.arange(padded.shape[0]) - 1 + PIXEL_CENTRE,
                       copy=False)
    rings: dict[int, list[np.ndarray]] = {}
    for cell_id, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        rows, cols = window  # in `padded`, the cell's box plus its one pixel of margin all round
        box = slice(rows.start, rows.stop + 2), slice(cols.start, cols.stop + 2)
        rings[cell_id] = _trace(x[box], y[box], padded[box] == cell_id)
    return rings


def _trace(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The closed rings at level 0.5 of a mask with a background margin, as (N, 2) (x, y) arrays.

    contourpy's serial tracer (C++) gives the rings `find_contours(mask, 0.5)` gives, vertex for
    vertex (a ring may start elsewhere), without skimage's pure-Python assembly of segments into
    rings. Saddle quads (two cell pixels diagonally opposite) are settled by the quad's mean, 0.5,
    which counts as below the level: the two pixels stay apart, as with `fully_connected="low"`. The
    class is built directly because `contourpy.contour_generator` spends longer checking its
    arguments than tracing a cell takes."""
    generator = SerialContourGenerator(x, y, mask.astype(np.float64), None, corner_mask=False,
                                       line_type=LineType.Separate, fill_type=FillType.OuterOffset,
                                       quad_as_tri=False, z_interp=ZInterp.Linear)
    return generator.lines(0.5)


def cell_outlines(labels: np.ndarray) -> dict[int, Polygon | MultiPolygon]:
    """Per cell id, its outline as a valid shapely geometry in corner-origin image coordinates: a
    Polygon (with a hole per enclosed region) or, for a cell of several pieces, a MultiPolygon."""
    rings = cell_rings(labels)
    cells = list(rings.values())
    simple = np.array([len(cell) == 1 for cell in cells], dtype=bool)  # one piece without holes
    geometries = np.empty(len(cells), dtype=object)
    geometries[simple] = _polygons([cell[0] for cell in cells if len(cell) == 1])
    for index in np.flatnonzero(~simple):
        geometries[index] = _nest(cells[index])
    oriented = shapely.orient_polygons(geometries)  # GeoJSON's orientation
    return dict(zip(rings, oriented))


def _polygons(shells: list[np.ndarray]) -> np.ndarray:
    """Polygons without holes, one per ring, made in one shapely call (most cells are one such
    polygon; making them one by one cost as much as a third of tracing them)."""
    if not shells:
        return np.empty(0, dtype=object)
    which = np.repeat(np.arange(len(shells)), [len(shell) for shell in shells])
    return shapely.polygons(shapely.linearrings(np.concatenate(shells), indices=which))


def _nest(rings: list[np.ndarray]) -> Polygon | MultiPolygon:
    """The region the rings enclose with the even-odd rule, as polygons with holes. Rings never touch,
    so one vertex tells whether a ring lies inside another; a ring inside an even number of others is
    a piece's outer edge, one inside an odd number is a hole of the innermost ring around it."""
    filled = np.array([Polygon(ring) for ring in rings], dtype=object)
    first_x, first_y = np.array([ring[0] for ring in rings]).T
    inside = shapely.contains_xy(filled[:, None], first_x[None, :], first_y[None, :])  # [outer, inner]
    depth = inside.sum(axis=0)
    pieces = []
    for shell in np.flatnonzero(depth % 2 == 0):
        holes = [rings[h] for h in np.flatnonzero(inside[shell] & (depth == depth[shell] + 1))]
        pieces.append(Polygon(rings[shell], holes))
    return pieces[0] if len(pieces) == 1 else MultiPolygon(pieces)


def _imagej_roi(cell_id: int, outline: Polygon | MultiPolygon, frame: int | None = None) -> ImagejRoi:
    """A polygon ROI for a cell of one piece without holes, else a composite (shape) ROI; on `frame`
    (0-based) of a time-lapse where one is given (see the module docstring)."""
    from roifile import ROI_OPTIONS, ROI_TYPE, ImagejRoi

    name = f"cell-{cell_id:0{ROI_NAME_DIGITS}d}"
    if frame is not None:
        name = f"t{frame:04d}-{name}"
    if isinstance(outline, Polygon) and not outline.interiors:
        roi = ImagejRoi.frompoints(np.asarray(outline.exterior.coords)[:-1], name=name)
        roi.roitype = ROI_TYPE.POLYGON  # frompoints says FREEHAND; the outline is a polygon
    else:
        rings = shapely.get_rings(shapely.get_parts(outline))
        path = np.concatenate([_closed_path(np.asarray(ring.coords)[:-1]) for ring in rings])
        left, top, right, bottom = outline.bounds
        # ImageJ's RoiDecoder reads a composite ROI as type RECT with a path of shape_roi_size floats
        roi = ImagejRoi(roitype=ROI_TYPE.RECT, name=name, shape_roi_size=path.size, multi_coordinates=path,
                        options=ROI_OPTIONS.OVERLAY_BACKGROUNDS | ROI_OPTIONS.OVERLAY_LABELS,
                        left=int(np.floor(left)), top=int(np.floor(top)),
                        right=int(np.ceil(right)), bottom=int(np.ceil(bottom)))
    if frame is not None:
        # the stack index, which ImageJ also reads as the frame of a hyperstack of one channel and slice
        roi.position = frame + 1
    return roi


def _closed_path(vertices: np.ndarray) -> np.ndarray:
    """One closed sub-path as ImageJ stores it: MOVETO x y, LINETO x y..., CLOSE."""
    codes = np.full((len(vertices), 1), SEG_LINETO, np.float32)
    codes[0] = SEG_MOVETO
    segments = np.hstack([codes, vertices.astype(np.float32)]).ravel()
    return np.append(segments, np.float32(SEG_CLOSE))


Outlines = dict[int, Polygon | MultiPolygon]


def imagej_roi_zip(labels: np.ndarray, outlines: Outlines | None = None, frame: int | None = None) -> bytes:
    """An ImageJ/Fiji ROI set (.zip of .roi files, one per cell, named by cell id; see the module
    docstring for polygon and composite ROIs). `outlines`: the labels' `cell_outlines`, where made already;
    `frame`: the labels' frame (0-based) in a time-lapse, for the ROIs' names and stack position."""
    buffer = io.BytesIO()
    # written in memory the way roifile.roiwrite writes a file (same entries, stored uncompressed, so
    # the same bytes) without a temporary directory; no cells gives an empty zip
    with zipfile.ZipFile(buffer, "w") as archive:
        for cell_id, outline in (outlines if outlines is not None else cell_outlines(labels)).items():
            roi = _imagej_roi(cell_id, outline, frame)
            with archive.open(f"{roi.name}.roi", "w") as entry:
                entry.write(roi.tobytes())
    return buffer.getvalue()


def qupath_geojson(labels: np.ndarray, measurements: list[dict] | None = None, classification: str = "Cell",
                   outlines: Outlines | None = None) -> dict:
    """A GeoJSON FeatureCollection of detections, as QuPath imports it: one Polygon (with holes) or
    MultiPolygon (one polygon per piece) per cell with `objectType: "detection"`, a classification,
    and the cell's measurements. `outlines`: the labels' `cell_outlines`, where made already."""
    by_id = {int(m["cell_id"]): m for m in measurements or []}
    if outlines is None:
        outlines = cell_outlines(labels)
    features = []
    for cell_id, geometry in zip(outlines, _geojson_geometries(list(outlines.values()))):
        values = {k: v for k, v in by_id.get(cell_id, {}).items() if isinstance(v, (int, float)) and k != "cell_id"}
        features.append({
            "type": "Feature",
            "id": f"cell-{cell_id}",
            "geometry": geometry,
            "properties": {"objectType": "detection", "name": f"cell {cell_id}",
                           "classification": {"name": classification, "color": [255, 110, 0]},
                           "measurements": values, "cell_id": cell_id},
        })
    return {"type": "FeatureCollection", "features": features}


def _geojson_geometries(outlines: list[Polygon | MultiPolygon]) -> list[dict]:
    """The outlines as GeoJSON geometry objects, as `shapely.geometry.mapping` writes them (the same
    JSON), with every vertex read in one call: `mapping` iterates the vertices one by one in Python,
    which cost more than tracing the outlines."""
    geometries = np.empty(len(outlines), dtype=object)
    geometries[:] = outlines
    parts, part_outline = shapely.get_parts(geometries, return_index=True)  # a Polygon is its one part
    rings, ring_part = shapely.get_rings(parts, return_index=True)  # exterior, then its holes
    xy = shapely.get_coordinates(rings)
    vertices = list(zip(xy[:, 0].tolist(), xy[:, 1].tolist()))  # tuples as in `mapping`; lists cost more to collect
    ends = np.cumsum(shapely.get_num_coordinates(rings)).tolist()
    polygons: list[list] = [[] for _ in parts]
    for part, start, end in zip(ring_part.tolist(), [0, *ends[:-1]], ends):
        polygons[part].append(vertices[start:end])
    per_outline: list[list] = [[] for _ in outlines]
    for index, polygon in zip(part_outline.tolist(), polygons):
        per_outline[index].append(polygon)
    return [{"type": "Polygon", "coordinates": polygons[0]} if isinstance(outline, Polygon)
            else {"type": "MultiPolygon", "coordinates": polygons}
            for outline, polygons in zip(outlines, per_outline)]


def geojson_bytes(collection: dict) -> bytes:
    """The collection as compact JSON (UTF-8)."""
    import json

    # json.dumps encodes in C; json.dump (into a file or buffer) runs the pure-Python encoder, 8x slower
    return json.dumps(collection, separators=(",", ":")).encode()
