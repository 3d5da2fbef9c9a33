"""Python client for the cellseg service (httpx; bounded in time and answer size, errors as CellsegError).

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


class ServiceUnreachable(CellsegError):
    """Nothing answers at the service's address (connection refused, no such host): not about one
    image, so a batch job stops instead of failing every image left."""


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
            try:
                self._labels = labels_from_instances([c.__dict__ for c in self.cells], self.height, self.width)
            except (ValueError, TypeError, KeyError) as exc:  # a damaged RLE: refused, not painted past the image
                raise CellsegError(f"the service's answer holds a damaged cell mask ({exc})") from None
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
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (result.width, result.height)) \
                or result.width * result.height > MAX_ANSWER_PIXELS:
            raise CellsegError(f"the service's answer gives an image of {result.width!r:.20} x {result.height!r:.20} "
                               f"pixels: not a size this client accepts (at most {MAX_ANSWER_PIXELS:,} pixels)")
        for cell in cells:
            size = cell.rle.get("size") if isinstance(cell.rle, dict) else None
            if size != [result.height, result.width]:
                raise CellsegError(f"cell {cell.id}'s mask is {size}, not the image's [height, width] = "
                                   f"{[result.height, result.width]}: the answer is inconsistent")
        return result


def _error_from(status: int, text: str) -> CellsegError:
    """The service's error answer ({"error", "status"}; BentoML's own as a list or with pydantic's
    `detail`) as a CellsegError."""
    try:
        body = json.loads(text)
        if isinstance(body, list) and body:  # BentoML wraps some errors in a one-element list
            body = body[0]
        message, detail = body.get("error", text), body.get("detail")
        if isinstance(detail, list):  # pydantic validation errors: name the parameter and the rule
            reasons = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            message = f"{message}: {reasons}"
        return CellsegError(str(message)[:2000], body.get("status", status), detail)
    except (ValueError, AttributeError, TypeError):
        return CellsegError(text[:2000] or f"HTTP {status}", status)


# What /readyz answers while a service starts: BentoML's 503 until its model has loaded, and a proxy's or
# load balancer's 502/504 in front of a process not listening yet. Anything else will not turn into 200.
STARTING_STATUSES = (502, 503, 504)


def wait_until_ready(url: str, timeout: float) -> None:
    """Return once `url` answers /readyz with 200. A refused or failed connection raises at once (no
    server is there), and so does an answer no starting service gives (a 404: another server); one
    that is starting (`STARTING_STATUSES`) is polled, with pauses, until `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.get(f"{url.rstrip('/')}/readyz", timeout=min(10.0, max(timeout, 1.0))).status_code
        except httpx.HTTPError as exc:
            kind = ServiceUnreachable if isinstance(exc, httpx.ConnectError) else CellsegError
            raise kind(f"cannot reach the cellseg service at {url}: {exc or type(exc).__name__}") from exc
        if status == 200:
            return
        if status not in STARTING_STATUSES:  # something answers there, but not a cellseg service starting
            raise CellsegError(f"{url} answers, but not as a cellseg service (/readyz: HTTP {status}): check the "
                               "address and port (`bentoml serve` prints them)", status)
        if time.monotonic() >= deadline:
            raise CellsegError(f"the cellseg service at {url} is not ready after {timeout:.0f} s", status)
        time.sleep(0.5)


# What a call may bring back: the largest answer (a 16 MP report is ~60 MB of JSON) and image (pixels).
MAX_ANSWER_BYTES = 512 * 2**20
MAX_ANSWER_PIXELS = 64_000_000



def one_image(array: np.ndarray) -> np.ndarray:
    """An array as one 2-D image to upload: (H, W) gray; (H, W, C) with C = 1 or 2 (gray, gray + alpha:
    the gray plane) or 3 or 4 (RGB, RGBA); channels first, (1, H, W), (3, H, W) or (4, H, W), as the
    service reads a channels-first TIFF. Anything else raises ValueError naming its shape, here, instead
    of reaching the server as a stack of pages; so does (2, H, W), two frames as likely as gray + alpha."""
    if array.ndim == 3 and array.shape[-1] > 4 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first
    if array.ndim == 3 and array.shape[-1] <= 2:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return array
    raise ValueError(f"an array of shape {array.shape} is not one image: give (H, W) gray, (H, W, 3) RGB or "
                     "(H, W, 4) RGBA (channels first works too); for a stack, send one plane at a time "
                     "(image[t]), or run `cellseg segment` on its file")


class Client:
    """Segment images with a running cellseg service. Accepts paths, NumPy arrays and PIL images.

    Raises `CellsegError` at once where no server answers at `url`, and waits up to `ready_timeout`
    seconds for one that is still starting. Every call raises only CellsegError for what the server
    or the connection does, and ends within `timeout` seconds in all (a server trickling its answer
    byte by byte included), with at most `max_answer_bytes` read (decompressed); redirects are not
    followed. One client per thread.
    """

    def __init__(self, url: str = "http://localhost:3000", timeout: float = 300, ready_timeout: float = 30,
                 max_answer_bytes: int = MAX_ANSWER_BYTES):
        import httpx

        self.url, self.timeout, self.max_answer_bytes = url.rstrip("/"), float(timeout), max_answer_bytes
        wait_until_ready(self.url, ready_timeout)
        # per-operation limits; the whole call's deadline is kept by `_exchange`
        self._http = httpx.Client(base_url=self.url, follow_redirects=False, headers={"Accept-Encoding": "gzip, identity"},
                                  timeout=httpx.Timeout(min(self.timeout, 60.0)))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def is_ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except Exception:  # noqa: BLE001
            return False

    @staticmethod
    def _upload(image) -> tuple[str, bytes, str]:
        """(file name, bytes, media type) of a path, an array (lossless TIFF) or a PIL image (PNG/TIFF)."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if path.is_dir():  # one image per call; folders are a batch job's
                raise IsADirectoryError(f"{path} is a folder: segment takes one image (a path, an array or a PIL "
                                        f"image); for a folder, run `cellseg segment {path} --out DIR --server URL`")
            if not path.is_file():
                raise FileNotFoundError(f"no such image file: {path}")
            return path.name, path.read_bytes(), "application/octet-stream"
        buffer = io.BytesIO()
        if isinstance(image, Image.Image):
            lossless_png = image.mode in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")
            image.save(buffer, format="PNG" if lossless_png else "TIFF")
            return ("image.png", buffer.getvalue(), "image/png") if lossless_png else \
                ("image.tif", buffer.getvalue(), "image/tiff")
        if isinstance(image, np.ndarray):
            import tifffile

            image = one_image(image)
            tifffile.imwrite(buffer, image, photometric="rgb" if image.ndim == 3 else "minisblack")
            return "image.tif", buffer.getvalue(), "image/tiff"
        raise TypeError(f"expected a path, NumPy array or PIL image, got {type(image).__name__}")

    @staticmethod
    def _fields(params: dict) -> dict[str, str]:
        """Form fields as the service reads them (JSON values: 0.5, 30, true)."""
        return {k: json.dumps(v) for k, v in params.items() if v is not None}

    def _exchange(self, endpoint: str, **request) -> tuple[bytes, str]:
        """(body, media type) of one POST, within the call's deadline and the answer's size bound,
        in a worker thread: the caller waits at most `timeout`, whatever the server does; the worker
        stops at its next chunk once the deadline has passed."""
        import concurrent.futures

        deadline = time.monotonic() + self.timeout
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        future = pool.submit(self._post, endpoint, deadline, request)
        try:
            return future.result(timeout=self.timeout + 1)
        except concurrent.futures.TimeoutError:
            raise CellsegError(f"{endpoint}: no complete answer within {self.timeout:.0f} s") from None
        finally:
            pool.shutdown(wait=False)

    def _post(self, endpoint: str, deadline: float, request: dict) -> tuple[bytes, str]:
        import zlib

        import httpx

        try:
            with self._http.stream("POST", f"/{endpoint}", **request) as response:
                if response.is_redirect:
                    raise CellsegError(f"{endpoint}: the service answered a redirect to "
                                       f"{response.headers.get('location', '?')[:200]!r}, which is not followed",
                                       response.status_code)
                encoding = response.headers.get("content-encoding", "identity").lower()
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else \
                    zlib.decompressobj() if encoding == "deflate" else None
                body = bytearray()
                # a response built in memory (httpx.MockTransport) arrives already read
                chunks = iter([response.content]) if response.is_stream_consumed else response.iter_raw()
                for chunk in chunks:
                    if time.monotonic() > deadline:
                        raise CellsegError(f"{endpoint}: no complete answer within {self.timeout:.0f} s")
                    if inflate is not None:
                        chunk = inflate.decompress(chunk, self.max_answer_bytes + 1 - len(body))
                    body += chunk
                    if len(body) > self.max_answer_bytes:
                        raise CellsegError(f"{endpoint}: the answer is over {self.max_answer_bytes:,} bytes")
                media_type = response.headers.get("content-type", "")
                if response.status_code >= 400:
                    raise _error_from(response.status_code, bytes(body).decode("utf-8", "replace"))
                return bytes(body), media_type
        except CellsegError:
            raise
        except (httpx.HTTPError, httpx.StreamError, zlib.error, OSError) as exc:
            kind = ServiceUnreachable if isinstance(exc, httpx.ConnectError) else CellsegError
            raise kind(f"{endpoint}: the connection to the service failed "
                       f"({type(exc).__name__}: {exc or 'no detail'})") from exc

    def _call(self, endpoint: str, image, **params) -> tuple[bytes, str]:
        name, data, media_type = self._upload(image)
        return self._exchange(endpoint, files={"image": (name, data, media_type)}, data=self._fields(params))

    def _json(self, endpoint: str, image=None, **params) -> dict:
        body, media_type = self._call(endpoint, image, **params) if image is not None else \
            self._exchange(endpoint, json={})
        try:
            answer = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CellsegError(f"{endpoint}: the service's answer is not JSON ({type(exc).__name__})") from None
        if not isinstance(answer, dict):
            raise CellsegError(f"{endpoint}: the service's answer is not a JSON object")
        return answer

    def model(self) -> dict:
        """Which model answers, in which precision and why (POST /model)."""
        return self._json("model")

    def segment(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None, cell_rules: bool | None = None,
                pixel_size: float | None = None) -> SegmentResult:
        """Cells of the image. `pixel_size` (µm per pixel) overrides the size in the image's metadata;
        where either is known, every cell has `area_um2` and `result.pixel_size` says which size was used."""
        data = self._json("segment", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                          min_size=min_size, tta=tta, cell_rules=cell_rules, pixel_size=pixel_size)
        return SegmentResult.from_json(data)

    def _png(self, endpoint: str, image, **params) -> np.ndarray:
        """A PNG answer, decoded under the runtime's limits (a PNG bomb is refused, not decoded)."""
        from cellseg.imageio import ImageError, decode_image

        body, _ = self._call(endpoint, image, **params)
        try:
            return decode_image(body, max_pixels=MAX_ANSWER_PIXELS)
        except ImageError as exc:
            raise CellsegError(f"{endpoint}: the service's answer is not a usable PNG ({exc})") from None

    def mask(self, image, binary: bool = False, fg_threshold: float | None = None,
             seed_threshold: float | None = None, min_size: int | None = None, tta: bool | None = None,
             cell_rules: bool | None = None) -> np.ndarray:
        """(H, W) label image as int32 (0 = background), or uint8 0/255 with binary=True."""
        arr = self._png("mask", image, binary=binary, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                        min_size=min_size, tta=tta, cell_rules=cell_rules)
        return arr if binary else arr.astype(np.int32)

    def rois(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
             min_size: int | None = None, tta: bool | None = None, cell_rules: bool | None = None) -> bytes:
        """ImageJ/Fiji ROI set (.zip bytes: write them to RoiSet.zip and open it in Fiji)."""
        return self._call("rois", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold, min_size=min_size,
                          tta=tta, cell_rules=cell_rules)[0]

    def geojson(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None, cell_rules: bool | None = None,
                pixel_size: float | None = None) -> dict:
        """QuPath GeoJSON FeatureCollection of the cells (one detection per cell, with measurements; in µm
        too where `pixel_size` is given or the image's metadata has one)."""
        return self._json("geojson", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                          min_size=min_size, tta=tta, cell_rules=cell_rules, pixel_size=pixel_size)

    def overlay(self, image, fg_threshold: float | None = None, seed_threshold: float | None = None,
                min_size: int | None = None, tta: bool | None = None, cell_rules: bool | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB image with cell outlines."""
        return self._png("overlay", image, fg_threshold=fg_threshold, seed_threshold=seed_threshold, min_size=min_size,
                         tta=tta, cell_rules=cell_rules)
