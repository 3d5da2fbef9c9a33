"""Python client for the cellseg service, built on `bentoml.SyncHTTPClient`.

    from cellseg import Client
    with Client("http://localhost:3000") as client:
        result = client.segment("cells.tif")          # path, NumPy array or PIL image
        print(result.count, result.confluence)
        labels = result.labels                          # (H, W) int32, 0 = background
        # areas in µm² too: the image's own pixel size (TIFF metadata), or the one given here
        print(client.segment("cells.png", pixel_size=0.65).cells[0].area_um2)
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cellseg.instances import labels_from_instances


class CellsegError(Exception):
    """The server refused the request or failed; `status` is the HTTP status, `message` its reason."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.message, self.status, self.detail = message, status, detail


@dataclass
class Cell:
    id: int
    area: int
    bbox: list[int]  # [x, y, width, height]
    centroid: list[float]  # [x, y]
    score: float
    rle: dict  # COCO RLE of the cell's mask
    area_um2: float | None = None  # where the pixel size is known (SegmentResult.pixel_size)


@dataclass
class SegmentResult:
    width: int
    height: int
    count: int
    confluence: float  # % of the image covered by cells
    cells: list[Cell]
    model: dict  # name, version, sha256
    params: dict
    pixel_size: dict | None = None  # {x_um, y_um, source} the areas in µm² used, or None: areas in pixels only
    _labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32 label image rebuilt from the cells' RLE masks (0 = background)."""
        if self._labels is None:
            self._labels = labels_from_instances([c.__dict__ for c in self.cells], self.height, self.width)
        return self._labels

    @classmethod
    def from_json(cls, data: dict) -> SegmentResult:
        """The `segment` answer; an answer that is not one (missing keys, a cell whose RLE is not the
        image's size, which would silently decode to empty labels) raises CellsegError."""
        try:
            cells = [Cell(**{k: c[k] for k in ("id", "area", "bbox", "centroid", "score", "rle")},
                          area_um2=c.get("area_um2")) for c in data["cells"]]
            result = cls(data["width"], data["height"], data["count"], data["confluence"], cells, data["model"],
                         data.get("params", {}), data.get("pixel_size"))
        except (KeyError, TypeError) as exc:
            raise CellsegError(f"the service's answer is not a segmentation (missing or malformed {exc})") from exc
        for cell in cells:
            size = cell.rle.get("size") if isinstance(cell.rle, dict) else None
            if size != [result.height, result.width]:
                raise CellsegError(f"cell {cell.id}'s mask is {size}, not the image's [height, width] = "
                                   f"{[result.height, result.width]}: the answer is inconsistent")
        return result


def _error_from(exc: Exception) -> CellsegError:
    status = getattr(getattr(exc, "error_code", None), "value", None) or getattr(exc, "error_code", None)
    text = getattr(exc, "message", None) or str(exc)
    try:
        body = json.loads(text)
        if isinstance(body, list) and body:  # BentoML wraps some errors in a one-element list
            body = body[0]
        message, detail = body.get("error", text), body.get("detail")
        if isinstance(detail, list):  # pydantic validation errors: name the parameter and the rule
            reasons = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            message = f"{message}: {reasons}"
        return CellsegError(message, body.get("status", status), detail)
    except (ValueError, AttributeError):
        return CellsegError(text, status if isinstance(status, int) else None)


def _is_transport_error(exc: Exception) -> bool:
    """Errors of the exchange itself (dropped or timed-out connections, an answer that cannot be
    decoded), as opposed to mistakes in the caller's own arguments."""
    import httpx

    return isinstance(exc, (httpx.HTTPError, httpx.StreamError, UnicodeDecodeError, json.JSONDecodeError, KeyError))


def wait_until_ready(url: str, timeout: float) -> None:
    """Return once `url` answers /readyz with 200. A refused or failed connection raises at once (no
    server is there); a server that answers but is not ready yet is polled, with pauses, until
    `timeout`. BentoML's own wait polls in a tight loop for the whole request timeout."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.get(f"{url.rstrip('/')}/readyz", timeout=min(10.0, max(timeout, 1.0))).status_code
        except httpx.HTTPError as exc:
            raise CellsegError(f"cannot reach the cellseg service at {url}: {exc or type(exc).__name__}") from exc
        if status == 200:
            return
        if time.monotonic() >= deadline:
            raise CellsegError(f"the cellseg service at {url} is not ready after {timeout:.0f} s", status)
        time.sleep(0.5)


class Client:
    """Segment images with a running cellseg service. Accepts paths, NumPy arrays and PIL images.

    Raises `CellsegError` at once where no server answers at `url`, and waits up to `ready_timeout`
    seconds for one that is still starting. One client per thread: BentoML's client closes the
    files it uploaded after each call, so threads must not share one.
    """

    def __init__(self, url: str = "http://localhost:3000", timeout: float = 300, ready_timeout: float = 30):
        import bentoml

        self.url = url
        wait_until_ready(url, ready_timeout)
        try:
            self._client = bentoml.SyncHTTPClient(url, timeout=timeout, server_ready_timeout=0)
        except Exception as exc:  # e.g. no BentoML schema at that URL
            raise CellsegError(f"{url} does not look like a cellseg service: {exc}") from exc
        self._tmp = tempfile.TemporaryDirectory(prefix="cellseg-client-")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        self._tmp.cleanup()

    def is_ready(self) -> bool:
        return bool(self._client.is_ready())

    def _as_path(self, image) -> Path:
        """A file BentoML can upload. Arrays and in-memory PIL images are written losslessly first:
        BentoML's own PIL encoding needs `image.format`, which images built in memory lack."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"no such image file: {path}")
            return path
        fd, name = tempfile.mkstemp(dir=self._tmp.name)
        with open(fd, "wb") as fh:
            if isinstance(image, Image.Image):
                image.save(fh, format="PNG" if image.mode in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA") else "TIFF")
            elif isinstance(image, np.ndarray):
                import tifffile

                buffer = io.BytesIO()
                tifffile.imwrite(buffer, image)
                fh.write(buffer.getvalue())
            else:
                raise TypeError(f"expected a path, NumPy array or PIL image, got {type(image).__name__}")
        return Path(name)

    def _call(self, endpoint: str, image, **kwargs):
        path = self._as_path(image)
        params = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return getattr(self._client, endpoint)(image=path, **params)
        except Exception as exc:  # bentoml raises its own exception types per status
            if type(exc).__module__.startswith(("bentoml", "_bentoml")):
                raise _error_from(exc) from exc
            if _is_transport_error(exc):
                raise CellsegError(f"{endpoint}: the connection to the service failed "
                                   f"({type(exc).__name__}: {exc or 'no detail'})") from exc
            raise
        finally:
            if path.parent == Path(self._tmp.name):
                path.unlink(missing_ok=True)

    def segment(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None, pixel_size: float | None = None) -> SegmentResult:
        """Cells of the image. `pixel_size` (µm per pixel) overrides the size in the image's metadata;
        where either is known, every cell has `area_um2` and `result.pixel_size` says which size was used."""
        data = self._call("segment", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                          min_size=min_size, tta=tta, pixel_size=pixel_size)
        return SegmentResult.from_json(data)

    def _file(self, endpoint: str, image, **kwargs) -> bytes:
        path = Path(self._call(endpoint, image, **kwargs))  # BentoML saves file outputs to a temp file
        data = path.read_bytes()
        path.unlink(missing_ok=True)
        return data

    def _png(self, endpoint: str, image, **kwargs) -> np.ndarray:
        with Image.open(io.BytesIO(self._file(endpoint, image, **kwargs))) as img:
            return np.asarray(img)

    def mask(self, image, binary: bool = False, fg_threshold: float | None = None,
             seed_threshold: float | None = None, min_size: int | None = None, tta: bool | None = None) -> np.ndarray:
        """(H, W) label image as int32 (0 = background), or uint8 0/255 with binary=True."""
        arr = self._png("mask", image, binary=binary, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                        min_size=min_size, tta=tta)
        return arr if binary else arr.astype(np.int32)

    def rois(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
             min_size: int | None = None, tta: bool | None = None) -> bytes:
        """ImageJ/Fiji ROI set (.zip bytes: write them to RoiSet.zip and open it in Fiji)."""
        return self._file("rois", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold, min_size=min_size,
                          tta=tta)

    def geojson(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None, pixel_size: float | None = None) -> dict:
        """QuPath GeoJSON FeatureCollection of the cells (one detection per cell, with measurements; in µm
        too where `pixel_size` is given or the image's metadata has one)."""
        return self._call("geojson", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold, min_size=min_size,
                          tta=tta, pixel_size=pixel_size)

    def overlay(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB image with cell outlines."""
        return self._png("overlay", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold, min_size=min_size,
                         tta=tta)
