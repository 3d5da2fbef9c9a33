"""LIVECell cell segmentation as a BentoML service.

Two services in one process tree:
- `CellSegmentation` (HTTP front): decodes and validates uploads, normalises and tiles them,
  post-processes the network's maps into cells, and renders JSON / PNG answers. Async, so many
  requests wait on the network at once and can be batched.
- `UNet`: ONNX Runtime with a batchable `predict`; BentoML's adaptive batching groups the pieces
  (whole images or tiles) of concurrent requests into one call.

No torch anywhere: everything shared with batch jobs and evaluation comes from `cellseg`.
Run: `bentoml serve service:CellSegmentation` (after `python -m export register`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.resources
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Annotated, Any

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from bentoml.validators import ContentType
from pydantic import Field
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cellseg.admission import Overloaded, PixelBudget, batch_without_wait_memory
from cellseg.answer_envelope import AnswerEnvelope
from cellseg.batch import Item, read_item, upload_item
from cellseg.formats import imagej_roi_zip, qupath_geojson
from cellseg.imageio import MAX_STACK_FRAMES, ImageError, ImageTooLargeError, declared_pixels, read_image
from cellseg.inference import (
    ImagePlan,
    Segmentation,
    decode_maps,
    merge_outputs,
    predict_codes,
    split_image,
    tta_expand,
    tta_reduce,
)
from cellseg.instances import (
    TooManyCellsError,
    binary_png_bytes,
    confluence,
    instances_from_labels,
    label_png_bytes,
    overlay_png_bytes,
)
from cellseg.memory import MMAP_FROM_1MIB, configure_allocator, release_idle_memory, release_memory
from cellseg.onnx_model import OnnxModel, available_providers, default_tta, verify_sha256
from cellseg.outputs import cell_measurements
from cellseg.pixelsize import (
    MAX_UM,
    MIN_UM,
    SOURCE_GIVEN_FIELD,
    PixelSize,
    add_physical_measurements,
    given_pixel_size,
    read_pixel_size,
)
from cellseg.postprocess import PostprocessParams
from cellseg.precision import PrecisionChoice, choose_precision, requested_precision
from cellseg.report import page_report
from cellseg.series_items import MAX_BATCH_NAMES_BYTES, check_batch_names, place_upload
from cellseg.upload_guard import UploadGuard
from cellseg.variants import registered_variants

logger = logging.getLogger("cellseg.service")
# BentoML's server logging passes WARNING and up from other loggers; the startup line (which model and
# precision answer, and why) is INFO, not a warning, and must still show, so this logger says INFO.
logger.setLevel(logging.INFO)
configure_allocator()  # image-sized arrays go back to the system after a request: see cellseg/memory.py
MODEL_TAG = os.environ.get("CELLSEG_MODEL_TAG") or "livecell-unet:latest"  # set but empty: the default too
# Which variant of the registered model the network runs: auto (default), fp32 or int8. auto runs int8
# only where its validation accuracy was within 0.01 AP50 and mSA of fp32 (the model's metadata) and,
# checked at startup on this CPU, its cells agree with fp32's and it is faster (cellseg/precision.py).
PRECISION = requested_precision()
# Largest accepted image (pixels); larger images get a 413. Images over 1024 px a side are tiled.
MAX_PIXELS = int(os.environ.get("CELLSEG_MAX_PIXELS", 16_000_000))
# Largest accepted request body, enforced while it streams in (UploadGuard). 96 MiB holds a 16 MP
# image even as uncompressed 16-bit RGB; the body is held in memory until it has been checked.
MAX_UPLOAD_BYTES = int(os.environ.get("CELLSEG_MAX_UPLOAD_BYTES", 96 * 1024 * 1024))
# After its first seconds, an upload must arrive at an average rate, or it gets a 408 (slow clients
# would otherwise hold request slots indefinitely).
UPLOAD_GRACE_S = float(os.environ.get("CELLSEG_UPLOAD_GRACE_S", 10))
MIN_UPLOAD_BYTES_PER_S = float(os.environ.get("CELLSEG_MIN_UPLOAD_BYTES_PER_S", 32 * 1024))
# Network pixels in work at once (TTA counts 4x); more waits in arrival order, up to QUEUE_TIMEOUT_S,
# then gets a 503 with Retry-After. At 32 MP (two 16 MP images at once) eight concurrent 16 MP reports
# peaked at 2.7 GB for the whole service (scripts/bench_burst.py); the network runs one call at a time
# anyway, so one 16 MP image at a time costs little speed and keeps a pod within its memory. The queue
# timeout leaves an admitted request time to finish within the 300 s traffic timeout.
PIXEL_BUDGET = int(os.environ.get("CELLSEG_PIXEL_BUDGET", 16_000_000))
QUEUE_TIMEOUT_S = float(os.environ.get("CELLSEG_QUEUE_TIMEOUT_S", 180))
# Small requests (up to SMALL_REQUEST_PIXELS network pixels: a LIVECell image is 0.36 MP, 1.4 MP with TTA)
# take their pixels from a lane of their own, so they never queue behind large images for admission;
# it adds SMALL_LANE_PIXELS to what may be in work at once. And a large image's pieces go to the
# network NETWORK_CHUNK_PIXELS at a time, one call after another, so other requests' pieces run
# between them instead of after all of them: a 16 MP image held the network ~20 s in one go, and a
# 256x256 request behind four of them waited up to 77 s (issue 27).
SMALL_REQUEST_PIXELS = int(os.environ.get("CELLSEG_SMALL_REQUEST_PIXELS", 2_000_000))
SMALL_LANE_PIXELS = int(os.environ.get("CELLSEG_SMALL_LANE_PIXELS", 4_000_000))
NETWORK_CHUNK_PIXELS = int(os.environ.get("CELLSEG_NETWORK_CHUNK_PIXELS", 1_500_000))
PREDICT_ATTEMPTS = 3
IDLE_TRIM_SECONDS = 1.0  # free memory goes back to the system after this long without a request
ORT_THREADS = int(os.environ.get("CELLSEG_ORT_THREADS", os.cpu_count() or 1))
# Network calls of up to this many pixels keep ONNX Runtime's memory for the next call (about 2x faster);
# larger ones give it back when they end. 800,000 holds two 704x520 images (padded to 704x544).
ARENA_KEEP_PIXELS = int(os.environ.get("CELLSEG_ARENA_KEEP_PIXELS", 800_000))

# Post-processing parameters: None means "the model's default" (from its metadata). Their values are
# checked by `check_form_fields` before the request reaches BentoML (a clear 400); the bounds here
# document them in the OpenAPI page. The thresholds' bounds are exclusive, which OpenAPI 3.0 (BentoML's)
# says as minimum + exclusiveMinimum: true; pydantic's gt/lt would write 3.1's numeric form, which 3.0
# validators refuse.
EXCLUSIVE = {"exclusiveMinimum": True, "exclusiveMaximum": True}
FgThreshold = Annotated[float | None, Field(default=None, ge=0, le=1, json_schema_extra=EXCLUSIVE,
                                            description="foreground probability threshold, strictly between 0 and 1")]
SeedThreshold = Annotated[float | None, Field(default=None, ge=0, le=1, json_schema_extra=EXCLUSIVE,
                                              description="cell-core (seed) threshold, strictly between 0 and 1")]
MinSize = Annotated[int | None, Field(default=None, ge=0, le=1_000_000, description="drop cells smaller than this (px)")]
Tta = Annotated[bool | None, Field(default=None, description="test-time augmentation: average over 4 mirrorings "
                                                               "(about 4x the network time); default: the model's own "
                                                               "(off for the shipped model; on for a model fine-tuned "
                                                               "with --tta)")]
CellRules = Annotated[bool | None, Field(default=None, description="the model's cell rules: merge touching cells "
                                                                   "annotators drew as one, drop cells they would not "
                                                                   "draw (default: on where the model has them); "
                                                                   "false cuts cells with the thresholds alone")]
# Where measurements are answered, the pixel size that turns them into µm: given, or else the image's own.
PixelSizeUm = Annotated[float | None, Field(default=None, ge=MIN_UM, le=MAX_UM,
                                            description="µm per pixel (square pixels); overrides the image's metadata "
                                                        "(OME-TIFF, ImageJ, TIFF resolution in cm). Measurements then "
                                                        "add µm values (area_um2, ...)")]
# A frame of a multi-page TIFF time-lapse (0-based), for /report only: the web page sends a stack once
# per frame, each answer measured and named as a batch job's frame (cellseg.batch.upload_item).
FrameIndex = Annotated[int | None, Field(default=None, ge=0, le=MAX_STACK_FRAMES - 1,
                                         description="0-based frame of a multi-page TIFF time-lapse; 0 also takes "
                                                     "a single image. The answer's stack says which of how many")]
BatchNames = Annotated[list[str] | None, Field(default=None, description=(
    "the names of the files segmented with this one (the web page's batch), by which a file named as a "
    "time point of a plate series (README: 'Plates, wells and time points from file names') is placed "
    "as a batch job of those files places it; without it, as a batch of this file alone"))]
POSTPROCESS_FIELDS = ("fg_threshold", "seed_threshold", "min_size")
COMMON_FIELDS = (*POSTPROCESS_FIELDS, "tta", "cell_rules")
MEASURING_FIELDS = (*COMMON_FIELDS, "pixel_size")
ENDPOINT_FIELDS = {"/segment": MEASURING_FIELDS, "/overlay": COMMON_FIELDS, "/mask": (*COMMON_FIELDS, "binary"),
                   "/rois": COMMON_FIELDS, "/geojson": MEASURING_FIELDS,
                   "/report": (*MEASURING_FIELDS, "frame", "batch_names")}
PngFile = Annotated[Path, ContentType("image/png")]
ZipFile = Annotated[Path, ContentType("application/zip")]


class ClientGone(Exception):
    """The client closed its connection: the rest of its work is dropped."""


def network_chunks(pieces: list[np.ndarray], max_pixels: int) -> list[list[np.ndarray]]:
    """Consecutive groups of pieces of at most `max_pixels` each (a piece larger than that alone)."""
    chunks: list[list[np.ndarray]] = []
    pixels = max_pixels
    for piece in pieces:
        if pixels + piece.size > max_pixels:
            chunks.append([])
            pixels = 0
        chunks[-1].append(piece)
        pixels += piece.size
    return chunks


class RequestError(Exception):
    """A problem with the request itself; becomes a 4xx JSON answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _form_value(text: str) -> Any:
    """A multipart text value as BentoML will read it (JSON where it parses, else the raw string)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_form_fields(path: str, fields: dict[str, str]) -> None:
    """Reject unknown or invalid parameters with one clear message, before any work is done."""
    allowed = ENDPOINT_FIELDS[path]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; {path} accepts image, {', '.join(allowed)}")
    values = {name: _form_value(text) for name, text in fields.items()}
    for name in ("fg_threshold", "seed_threshold"):
        if name in values and (isinstance(values[name], bool) or not isinstance(values[name], (int, float))
                               or not math.isfinite(values[name])):  # NaN too, however it is spelt
            raise ValueError(f"{name} must be a number, got {fields[name]!r}")
    if "min_size" in values and (isinstance(values["min_size"], bool) or not isinstance(values["min_size"], int)):
        raise ValueError(f"min_size must be a whole number of pixels, got {fields['min_size']!r}")
    for name in ("binary", "tta", "cell_rules"):
        if name in values and not isinstance(values[name], bool):
            raise ValueError(f"{name} must be true or false, got {fields[name]!r}")
    if "frame" in values and (isinstance(values["frame"], bool) or not isinstance(values["frame"], int)
                              or not 0 <= values["frame"] < MAX_STACK_FRAMES):
        raise ValueError(f"frame must be a whole number from 0 to {MAX_STACK_FRAMES - 1}, got {fields['frame']!r}")
    if "batch_names" in values:
        check_batch_names(values["batch_names"])
    if "pixel_size" in values:
        given_pixel_size(values["pixel_size"])  # a number, finite, within MIN_UM .. MAX_UM µm per pixel
    PostprocessParams().with_overrides(**{k: values.get(k) for k in POSTPROCESS_FIELDS})  # ranges


def choose_variant(model_ref, requested: str = PRECISION, threads: int | None = None) -> tuple[PrecisionChoice, dict]:
    """The precision this process serves (checked on this CPU: cellseg/precision.py) and its variant's
    {file, sha256, metrics}. Each file is checked against the sha256 the store recorded first: a
    corrupt int8 file makes fp32 answer, and says so; a corrupt fp32 file stops the service."""
    metadata = model_ref.info.metadata
    variants = registered_variants(metadata)
    fp32 = Path(model_ref.path_of(variants["fp32"]["file"]))
    verify_sha256(fp32, variants["fp32"]["sha256"])
    int8 = None
    if "int8" in variants and requested != "fp32":
        int8 = Path(model_ref.path_of(variants["int8"]["file"]))
        try:
            verify_sha256(int8, variants["int8"]["sha256"])
        except (OSError, ValueError) as exc:
            if requested == "int8":
                raise
            choice = PrecisionChoice("fp32", fp32, f"the int8 file is unusable ({exc})", requested)
            logger.warning("serving fp32: %s", choice.reason)
            return choice, variants["fp32"]
    choice = choose_precision(fp32, int8, requested, available_providers(), threads,
                              int8_validated=metadata.get("default_precision") == "int8")
    return choice, variants[choice.precision]


def model_card_figures(metadata: dict, variant: dict) -> dict:
    """The served variant's AP50 and mSA from its model card, and the images they were measured on
    (the page shows them beside the model's name)."""
    metrics = variant.get("metrics") or {}
    return {**{k: round(float(metrics[k]), 3) for k in ("ap50", "msa") if k in metrics},
            "measured_on": metadata.get("metrics_on", "validation split")}


def upload_name(path: Path) -> str:
    """The file name the client sent. BentoML stores an upload as a NamedTemporaryFile whose suffix is
    that name (tempfile's 'tmp' + 8 random characters, then the name); the web page's test checks it."""
    return re.sub(r"^tmp[a-z0-9_]{8}", "", path.name) or "image"


class StageClock:
    """Where one request's time went, sent back as a Server-Timing header (browsers' developer tools
    show it; scripts/bench_server.py reads it): queue (waiting for the pixel budget: the image's size is
    read from its header, the pixels wait), decode (upload to normalised network inputs), network
    (the call to the UNet service, batching wait and transfer included), cells (maps to labels and
    scores), encode (the answer's format) and total."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - t0) * 1000

    def header(self) -> str:
        total = (time.perf_counter() - self.start) * 1000
        stages = {**self.stages, "encode": max(0.0, total - sum(self.stages.values())), "total": total}
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in stages.items())


# The clock of the request being answered (each request runs in its own asyncio task and context).
REQUEST_CLOCK: contextvars.ContextVar[StageClock] = contextvars.ContextVar("request_clock")
REQUEST_RESOURCES: contextvars.ContextVar[contextlib.AsyncExitStack] = contextvars.ContextVar("request_resources")
REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("request")  # the request's starlette Request


def json_response(answer: Any) -> Any:
    """A JSON answer encoded here, as compact JSON. Handing BentoML the dict instead costs more per
    request: it validates it with pydantic and derives the response's media type from a JSON schema it
    builds anew each time. Other answers (PNG, zip, errors) pass through, and so does a dict that holds
    NaN or infinity, which JSON cannot carry (BentoML writes them as null)."""
    if not isinstance(answer, dict):
        return answer
    try:
        body = json.dumps(answer, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return answer
    return Response(body.encode("utf-8"), media_type="application/json")


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, Overloaded):
        return JSONResponse({"error": str(exc), "status": 503, "retry_after_s": exc.retry_after_s}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after_s)})
    status = exc.status if isinstance(exc, RequestError) else 413 if isinstance(exc, ImageTooLargeError) else 400
    return JSONResponse({"error": str(exc), "status": status}, status_code=status)


# BentoML (1.4.30 on) replaces its client session to a dependency every `max_requests` calls or
# `max_age` seconds (defaults 100 and 300 s) by closing the old one while calls are still in flight on
# it: those calls fail with "Server disconnected" (7 at once under 16 clients), and now and then one
# hangs until the traffic timeout (a 504 after 300 s, seen in scripts/bench_server.py). The front and
# the network process run side by side, so nothing is gained by new sessions: practically never.
NO_SESSION_REFRESH = {"max_requests": 2**62, "max_age": 1e12}
batch_without_wait_memory()  # before the network process builds its batcher: see cellseg/admission.py



@bentoml.service(workers=1, traffic={"timeout": 300, "max_concurrency": 256}, runner_connection=NO_SESSION_REFRESH)
class UNet:
    """The network on ONNX Runtime (CUDA provider where present, else CPU)."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        t0 = time.perf_counter()
        self.choice, self.variant = choose_variant(self.model_ref, threads=ORT_THREADS)
        configure_allocator(mmap_threshold=MMAP_FROM_1MIB)  # ONNX Runtime's arena blocks go back when it shrinks
        # the arena keeps a call of two LIVECell images warm; a larger call (a big image's 1024x1024
        # tiles) gives its memory back when it ends
        self.model = OnnxModel(self.choice.path, threads=ORT_THREADS, providers=available_providers(),
                               arena_keep_pixels=ARENA_KEEP_PIXELS, spin=False)
        logger.info("model %s: serving %s (%s), on %s [%s]; loaded and checked in %.1f s", self.model_ref.tag,
                    self.choice.precision, self.choice.reason, self.choice.cpu, self.choice.provider,
                    time.perf_counter() - t0)

    @bentoml.api
    def info(self) -> dict:
        """The precision this process serves, its file's sha256, and why (the front's model block)."""
        return {**self.choice.to_dict(), "sha256": self.variant["sha256"], "metrics": self.variant.get("metrics")}

    # Batch size counts network inputs (whole images up to 1024x1024 px, or tiles). 8 LIVECell images
    # take ~1.5 s on 2 cores; a 60 s latency budget means the dispatcher never sheds load (503) at
    # 16 concurrent clients, it only waits.
    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=60_000)
    def predict(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """Normalised (h, w) float32 arrays -> (3, h, w) probabilities (foreground, boundary, distance)
        as uint8 codes (cellseg.inference.encode_map): a quarter of the bytes to send back."""
        try:
            return predict_codes(self.model.predict, pieces)
        finally:
            release_memory()  # the network's activations: freed, and given back to the system


# The web page: one static HTML file (plain JavaScript and CSS, nothing from a CDN) that calls /report.
WEB_PAGE = importlib.resources.files("cellseg") / "web" / "index.html"
web_ui = Starlette(routes=[Route("/", lambda request: HTMLResponse(WEB_PAGE.read_text(encoding="utf-8")))])


@bentoml.asgi_app(web_ui, path="/ui")
@bentoml.service(workers=1, traffic={"timeout": 300, "max_concurrency": 64})
class CellSegmentation:
    """Instance segmentation of cells in phase-contrast images (LIVECell U-Net)."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)
    unet = bentoml.depends(UNet)

    def __init__(self) -> None:
        info = self.model_ref.info
        self.defaults = PostprocessParams(**info.metadata.get("postprocess", {}))
        self.default_tta = default_tta(info.metadata)  # a fine-tuned model's thresholds were picked with TTA
        self.model_info: dict | None = None  # asked of the network process (`_model_info`), which chose the precision
        # CPU-bound decode / watershed run in threads so the event loop keeps accepting requests.
        self.cpu = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.budget = PixelBudget(PIXEL_BUDGET, QUEUE_TIMEOUT_S)
        self.small_lane = PixelBudget(SMALL_LANE_PIXELS, QUEUE_TIMEOUT_S)
        self.in_flight = 0  # requests being answered
        self.idle_trim: asyncio.TimerHandle | None = None  # the pending trim once none is

    def _params(self, fg_threshold, seed_threshold, min_size, cell_rules: bool | None = None) -> PostprocessParams:
        try:
            params = self.defaults.with_overrides(fg_threshold=fg_threshold, seed_threshold=seed_threshold,
                                                  min_size=min_size)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return params.without_rules() if cell_rules is False else params

    def _read(self, image: Path, frame: Item | None = None) -> np.ndarray:
        size = image.stat().st_size
        if size == 0:
            raise RequestError("empty upload: the 'image' file has no bytes")
        if size > MAX_UPLOAD_BYTES:
            raise RequestError(f"upload is {size:,} bytes, over the limit of {MAX_UPLOAD_BYTES:,}", status=413)
        if frame is not None and frame.frame is not None:  # only that page is decoded, with the same limits
            return read_item(frame, max_pixels=MAX_PIXELS)[0]
        return read_image(image, max_pixels=MAX_PIXELS)

    def _tta(self, tta: bool | None) -> bool:
        return self.default_tta if tta is None else tta

    async def _segment(self, image: Path, params: PostprocessParams, tta: bool | None = None,
                       frame: Item | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw image, labels, scores) for one upload (of its frame `frame`, a stack's: see /report). The
        CPU work before and after the network runs in one worker thread each, so the event loop only
        moves requests along. `tta` None: the model's own default."""
        tta = self._tta(tta)
        clock = REQUEST_CLOCK.get(None) or StageClock()
        with clock.stage("queue"):
            await self._admit(image, tta)
        with clock.stage("decode"):
            raw, pieces, plan = await anyio.to_thread.run_sync(self._read_and_split, image, frame, limiter=self.cpu)
        with clock.stage("network"):  # with tta, the mirrored pieces are batched with everything else in flight
            codes = await self._predict(tta_expand(pieces) if tta else pieces)
        with clock.stage("cells"):
            labels, scores = await anyio.to_thread.run_sync(self._cells, codes, plan, params, tta, limiter=self.cpu)
        return raw, labels, scores

    async def _pixel_size(self, image: Path, given: float | None) -> PixelSize | None:
        """The size the request gave, else the one the image's metadata states (header only), else None.
        Asked once the image has been admitted and decoded: a hostile header is then already refused."""
        if given is not None:
            try:
                return given_pixel_size(given, source=SOURCE_GIVEN_FIELD)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
        return await anyio.to_thread.run_sync(read_pixel_size, image, limiter=self.cpu)

    async def _admit(self, image: Path, tta: bool) -> None:
        """Wait for this image's pixels in the budget, held until the request is answered. The size
        comes from the file's header, so nothing is decoded before the request is admitted."""
        pixels = await anyio.to_thread.run_sync(declared_pixels, image, limiter=self.cpu)
        cost = self.budget.capacity if pixels is None else pixels * (4 if tta else 1)
        lane = self.small_lane if cost <= SMALL_REQUEST_PIXELS else self.budget
        await REQUEST_RESOURCES.get().enter_async_context(lane.admit(cost))
        await self._check_client()  # a client that hung up while it waited: its image is not decoded

    def _read_and_split(self, image: Path, frame: Item | None = None) -> tuple[np.ndarray, list[np.ndarray], ImagePlan]:
        raw = self._read(image, frame)
        return (raw, *split_image(raw))

    @staticmethod
    def _cells(codes: list[np.ndarray], plan: ImagePlan, params: PostprocessParams,
               tta: bool) -> tuple[np.ndarray, np.ndarray]:
        """The network's 8-bit maps back to one probability map (un-mirrored, stitched), then cells
        and their scores."""
        outputs = decode_maps(codes)
        probs = merge_outputs(tta_reduce(outputs) if tta else outputs, plan)
        seg = Segmentation.from_maps(probs, params)  # with a cell filter, its scores come with its cut
        return seg.labels, seg.scores()

    async def _predict(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """The network's maps of `pieces`, sent NETWORK_CHUNK_PIXELS at a time (see there); before
        each chunk after the first, the work stops if the client has hung up."""
        outputs: list[np.ndarray] = []
        for chunk in network_chunks(pieces, NETWORK_CHUNK_PIXELS):
            if outputs:
                await self._check_client()
            outputs += await self._predict_call(chunk)
        return outputs

    @staticmethod
    async def _check_client() -> None:
        """Raise ClientGone where the request's client has closed its connection."""
        request = REQUEST.get(None)
        if request is not None and await request.is_disconnected():
            raise ClientGone("the client closed the connection")

    async def _predict_call(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """Call the UNet service, retrying connection drops (aiohttp's ServerDisconnectedError). Their
        cause, BentoML's periodic session refresh, is switched off (NO_SESSION_REFRESH); the retry
        stays for a network process that restarts. The call is idempotent, so a retry is safe."""
        for attempt in range(PREDICT_ATTEMPTS):
            try:
                return await self.unet.to_async.predict(pieces)
            except ServiceUnavailable as exc:  # the network's batcher shed the call: a 503 for the client
                raise Overloaded(f"the network is overloaded ({exc})", retry_after_s=10) from exc
            except aiohttp.ClientConnectionError as exc:
                if attempt == PREDICT_ATTEMPTS - 1:
                    raise
                logger.warning("connection to UNet dropped (%r); retrying (%d/%d)", exc, attempt + 2, PREDICT_ATTEMPTS)
                await anyio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _model_info(self) -> dict:
        """Which model answers, in which precision and why: the network process chose it at startup,
        on its CPU; asked once, then kept."""
        if self.model_info is None:
            info = self.model_ref.info
            served = await self.unet.to_async.info()
            self.model_info = {"name": info.tag.name, "version": info.tag.version, "sha256": served["sha256"],
                               "precision": served["precision"], "precision_reason": served["reason"],
                               "requested": served["requested"], "cpu": served["cpu"], "provider": served["provider"],
                               "check": served["check"], "metrics": model_card_figures(info.metadata, served)}
        return self.model_info

    async def __is_ready__(self) -> bool:
        """/readyz: ready once the network process has loaded the model and said which precision it serves."""
        try:
            await self._model_info()
        except Exception as exc:  # noqa: BLE001  (not ready yet: the network process is still starting)
            logger.debug("not ready: %r", exc)
            return False
        return True

    async def _guarded(self, work, ctx=None) -> Any:
        """`work()`'s answer, or the refusal its error gets. Given the API's context (which gives the
        request, to see whether its client is still there), the answer's status is set on it too:
        BentoML gives an API that takes a context the context's status, not the Response's."""
        answer = await self._answer(work, ctx)
        if ctx is not None and isinstance(answer, Response):
            ctx.response.status_code = answer.status_code
        return answer

    async def _answer(self, work, ctx) -> Any:
        self.in_flight += 1
        if self.idle_trim is not None:
            self.idle_trim.cancel()
            self.idle_trim = None
        clock = StageClock()
        REQUEST_CLOCK.set(clock)
        REQUEST.set(getattr(ctx, "request", None))
        try:
            async with contextlib.AsyncExitStack() as resources:  # what the request holds until answered
                REQUEST_RESOURCES.set(resources)
                answer = json_response(await work())
            if isinstance(answer, Response):
                answer.headers["Server-Timing"] = clock.header()
            return answer
        except TooManyCellsError as exc:
            return self._refused(RequestError(f"{exc}: use /segment (one RLE mask per cell) or higher thresholds",
                                              status=422))
        except (RequestError, ImageError, Overloaded) as exc:
            return self._refused(exc)
        except ClientGone:
            logger.warning("request dropped: its client closed the connection before the answer")
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        finally:
            self.in_flight -= 1
            # Memory goes back to the system once the service has been idle for a moment: trimming
            # between the requests of a burst, or of one client's back-to-back calls, would only make
            # the next request fault the same pages in again (about 10 ms of CPU per request).
            if self.in_flight == 0:
                self.idle_trim = asyncio.get_running_loop().call_later(IDLE_TRIM_SECONDS, release_idle_memory)

    @staticmethod
    def _refused(exc: Exception) -> JSONResponse:
        response = error_response(exc)
        logger.warning("request refused (HTTP %d): %s", response.status_code, exc)  # no traceback: not a defect
        return response

    @bentoml.api(route="/model")
    async def model(self) -> dict:
        """Which model answers, before any image is sent: name, version, the sha256 of the file served,
        its precision (fp32 or int8) and why (checked at startup on this server's CPU: int8 answers only
        where its cells agree with fp32's there and it is faster), the CPU and execution provider, and
        the served file's AP50 / mSA from its model card. Every JSON answer carries the same block."""
        return await self._model_info()

    @bentoml.api
    async def segment(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                      seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                      tta: Tta = None, cell_rules: CellRules = None, pixel_size: PixelSizeUm = None) -> dict:
        """Cells as JSON: count, confluence (% of pixels covered) and per cell id, area, bbox [x, y, w, h],
        centroid [x, y], score and COCO RLE mask; plus the model's name, version and sha256. Where a pixel
        size is known (the pixel_size field, else the image's metadata) each cell adds area_um2, and
        pixel_size says which size and from where ({x_um, y_um, source}, or null)."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            raw, labels, scores = await self._segment(image, params, tta)
            size = await self._pixel_size(image, pixel_size)
            cells = await anyio.to_thread.run_sync(instances_from_labels, labels, scores, limiter=self.cpu)
            return {"model": await self._model_info(), "width": int(raw.shape[1]), "height": int(raw.shape[0]),
                    "count": len(cells), "confluence": round(confluence(labels), 3),
                    "params": {**params.to_dict(), "tta": self._tta(tta)},
                    "pixel_size": size.to_dict() if size else None,
                    "cells": add_physical_measurements(cells, size)}
        return await self._guarded(work, ctx)

    @bentoml.api
    async def mask(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                   seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                   binary: bool = False, tta: Tta = None, cell_rules: CellRules = None) -> PngFile:
        """PNG mask: 16-bit label image (0 = background, 1..N cells), or 8-bit 0/255 with binary=true.
        An image with more than 65,535 cells gets a 422: use /segment or binary=true."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            _, labels, _ = await self._segment(image, params, tta)
            encode = binary_png_bytes if binary else label_png_bytes
            try:
                png = await anyio.to_thread.run_sync(encode, labels, limiter=self.cpu)
            except TooManyCellsError as exc:
                raise RequestError(f"{exc}: use /segment (one RLE mask per cell) or binary=true", status=422) from exc
            return Response(png, media_type="image/png", headers={"X-Cell-Count": str(int(labels.max()))})
        return await self._guarded(work, ctx)

    @bentoml.api
    async def overlay(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                      seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                      tta: Tta = None, cell_rules: CellRules = None) -> PngFile:
        """PNG of the image with every cell's outline drawn, for people to look at."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            raw, labels, _ = await self._segment(image, params, tta)
            png = await anyio.to_thread.run_sync(overlay_png_bytes, raw, labels, limiter=self.cpu)
            return Response(png, media_type="image/png", headers={"X-Cell-Count": str(int(labels.max()))})
        return await self._guarded(work, ctx)

    @bentoml.api
    async def rois(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                   seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                   tta: Tta = None, cell_rules: CellRules = None) -> ZipFile:
        """ImageJ/Fiji ROI set: a .zip of .roi files, one per cell, named cell-00042 (its label id): a polygon, or a
        composite ROI for a cell of several pieces or with holes (open with Fiji's ROI Manager)."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            _, labels, _ = await self._segment(image, params, tta)
            data = await anyio.to_thread.run_sync(imagej_roi_zip, labels, limiter=self.cpu)
            return Response(data, media_type="application/zip", headers={
                "X-Cell-Count": str(int(labels.max())), "Content-Disposition": 'attachment; filename="RoiSet.zip"'})
        return await self._guarded(work, ctx)

    @bentoml.api
    async def geojson(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                      seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                      tta: Tta = None, cell_rules: CellRules = None, pixel_size: PixelSizeUm = None) -> dict:
        """QuPath GeoJSON (as JSON): a FeatureCollection of detections, one per cell (a Polygon with its holes, or a
        MultiPolygon for a cell of several pieces), with each cell's measurements (in µm too where a pixel size is
        known). Save it as cells.geojson and drag it onto the image in QuPath."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            raw, labels, scores = await self._segment(image, params, tta)
            size = await self._pixel_size(image, pixel_size)

            def collect() -> dict:  # the cells' measurements as the page's and the batch job's GeoJSON have them
                return qupath_geojson(labels, cell_measurements(raw, labels, scores, size))

            return await anyio.to_thread.run_sync(collect, limiter=self.cpu)
        return await self._guarded(work, ctx)


    @bentoml.api
    async def report(self, image: Path, ctx: bentoml.Context, fg_threshold: FgThreshold = None,
                     seed_threshold: SeedThreshold = None, min_size: MinSize = None,
                     tta: Tta = None, cell_rules: CellRules = None, pixel_size: PixelSizeUm = None,
                     frame: FrameIndex = None, batch_names: BatchNames = None) -> dict:
        """Everything the web page (/ui) shows and offers, from one segmentation: count, confluence,
        per-cell measurements (area, centroid, perimeter, eccentricity, score...; in µm too where a pixel
        size is known, and pixel_size says which and from where), their units, the image rendered to
        8-bit PNG with transparent outline and filled-cell layers, base64 downloads: label PNG, CSV,
        COCO JSON, ImageJ ROI zip, QuPath GeoJSON and the image's summary.csv, and summary (that row).
        With frame, the upload may be a multi-page TIFF time-lapse: that frame is segmented, named
        <stem>_t0003 as a batch job names it, and stack says {name, frame, frames, time_s} (null for a
        single image, whose frame is 0). A file whose name places it in a plate and a series (LIVECell,
        Incucyte, NIS-Elements names) gets the series, well and time columns of a batch job of the files
        batch_names lists (the web page sends its batch's names; without it, a batch of this file alone)."""
        async def work():
            params = self._params(fg_threshold, seed_threshold, min_size, cell_rules)
            name = PurePath(upload_name(image)).stem or "image"
            item, frames = (Item(image, name), 1) if frame is None else await anyio.to_thread.run_sync(
                upload_item, image, name, frame, MAX_PIXELS, limiter=self.cpu)
            placed = place_upload(item, upload_name(image), batch_names or ())
            raw, labels, scores = await self._segment(image, params, tta, item)
            size = await self._pixel_size(image, pixel_size)
            result = await anyio.to_thread.run_sync(page_report, raw, labels, scores, upload_name(image), size,
                                                    placed.name, placed.record_fields() or None, frames,
                                                    limiter=self.cpu)
            return {"model": await self._model_info(), "params": {**params.to_dict(), "tta": self._tta(tta)}, **result}
        return await self._guarded(work, ctx)


def document_error_responses() -> None:
    """Declare the service's real error answers in the OpenAPI document BentoML generates.

    BentoML documents 400/404/500 for every API with its own body schema; this service answers
    ``{"error": message, "status": code}`` with 400 (bad image or parameter), 408 (upload too slow),
    413 (over a size limit), 415 (not a multipart upload), 422 (too many cells for a 16-bit label PNG)
    and 503 (busy, with Retry-After). BentoML 1.4 has no
    public hook for per-API responses, so the shared table it builds them from is extended here,
    at import, before any document is generated.
    """
    from _bentoml_sdk.service import openapi as bentoml_openapi
    from bentoml._internal.service.openapi.specification import MediaType, Schema
    from bentoml._internal.service.openapi.specification import Response as SpecResponse

    body = Schema(type="object", required=["error"], properties={
        "error": Schema(type="string", description="what was wrong, in words"),
        "status": Schema(type="integer", description="the HTTP status, repeated"),
    })
    answers = {400: "Bad request: not a usable image, or an invalid parameter",
               408: "Upload too slow (under the minimum average rate after the grace period)",
               413: "Upload or image over the size limit", 415: "Not a multipart/form-data upload",
               422: "Result does not fit the requested format (over 65,535 cells for a label PNG)",
               503: "Busy: waited too long for its turn; retry after the Retry-After header's seconds"}
    for status, description in answers.items():
        bentoml_openapi.error_responses[status] = SpecResponse(
            description=description, content={"application/json": MediaType(schema=body)})


document_error_responses()

# Every answer of the service's own layers: errors as JSON (the router's 404 and 405 were plain text) and a
# Server-Timing header (cellseg/answer_envelope.py). Added first: of the middlewares a service adds, the
# first is the outermost, so this one also sees the upload guard's refusals (BentoML's own 429 and 504
# come from middlewares outside them all).
CellSegmentation.add_asgi_middleware(AnswerEnvelope)
# Checks every upload while it streams in, before BentoML parses it: size limit, one file field,
# no text-as-URL (BentoML would download it), known and valid parameters. See cellseg/upload_guard.py.
CellSegmentation.add_asgi_middleware(UploadGuard, paths=list(ENDPOINT_FIELDS), max_bytes=MAX_UPLOAD_BYTES,
                                     check_fields=check_form_fields, grace_s=UPLOAD_GRACE_S,
                                     min_bytes_per_s=MIN_UPLOAD_BYTES_PER_S,
                                     text_limits={"batch_names": MAX_BATCH_NAMES_BYTES})
