"""What the napari widget does, without Qt: choose a model, segment frames, keep the network's maps
to re-threshold, measure, save corrections as training examples and run a fine-tune.

Every step calls the runtime `cellseg segment` and the service use (model choice per CPU, tiling,
8-bit maps, post-processing, measurements, CSV layout), so a cell found in napari is the cell a
batch job finds in the same file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.batch import frame_name
from cellseg.cell_filter import CellFilter
from cellseg.imageio import to_grayscale
from cellseg.inference import Segmentation, decode_maps, encode_map, predict_maps
from cellseg.instances import label_png_bytes
from cellseg.onnx_model import default_model_path
from cellseg.outputs import cells_csv, image_record
from cellseg.pixelsize import UM_PER_UNIT, PixelSize, given_pixel_size, read_pixel_size
from cellseg.postprocess import PostprocessParams
from cellseg.summary import summary_csv, summary_row
from cellseg.targets import relabel_sequential

SHIPPED, FILE, REGISTERED, SERVER = "shipped model", "ONNX file", "registered model", "cellseg server"
MODEL_KINDS = (SHIPPED, FILE, REGISTERED, SERVER)
REPO = Path(__file__).resolve().parent.parent.parent
# The thresholds a user may change in the widget; a server applies only those its API takes.
THRESHOLDS = ("fg_threshold", "seed_threshold", "min_size")


@dataclass(frozen=True)
class ModelChoice:
    """Which model segments: the shipped one, an ONNX file (e.g. a fine-tune's model.onnx), a model in
    the BentoML store by tag, or a running cellseg service by URL."""

    kind: str = SHIPPED
    target: str = ""  # the file, tag or URL; unused for the shipped model

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind != SHIPPED and not self.target.strip():
            what = {FILE: "an ONNX file", REGISTERED: "a model tag (e.g. livecell-unet:latest)",
                    SERVER: "the service's URL (e.g. http://localhost:3000)"}[self.kind]
            raise ValueError(f"{self.kind}: give {what}")


@dataclass
class FrameResult:
    """One segmented frame: the network's maps as the 8-bit codes the service uses (None from a
    server, which returns cells only), the labels and each cell's score."""

    codes: np.ndarray | None
    labels: np.ndarray
    scores: np.ndarray | None
    cell_filter: CellFilter | None = None  # the model's, which scored the cells: it scores painted ones too


class LocalModel:
    """An ONNX model run in this process, in the precision `cellseg segment` would choose on this CPU."""

    def __init__(self, path: Path, threads: int | None = None):
        from cellseg.onnx_model import OnnxModel
        from cellseg.variants import choose_for_model

        choice = choose_for_model(Path(path))
        self.model = OnnxModel(choice.path, threads=threads, spin=False)  # no busy-waiting: napari's UI shares the cores
        self.description = f"{choice.path.name}: {choice.precision}"
        self.reason = choice.reason  # why this precision on this CPU (the widget's tooltip)
        self.default_params = self.model.default_params

    def segment(self, image: np.ndarray, params: PostprocessParams, original: np.ndarray | None = None) -> FrameResult:
        """Network then post-processing, as a batch job's; the maps kept as their 8-bit codes (the
        values they already hold: `predict_maps` returns the service's 8-bit maps decoded)."""
        maps = predict_maps(self.model.predict, [image], batch_size=1, tta=self.model.default_tta)[0]  # as `cellseg segment`
        seg = Segmentation.from_maps(maps, params)
        return FrameResult(encode_map(seg.probs), seg.labels, seg.scores(), params.cell_filter)


class ServerModel:
    """A running cellseg service (`cellseg.Client`): the network runs there, on its GPU if it has one.
    It sends labels, not maps, so new thresholds are a new request."""

    def __init__(self, url: str):
        from cellseg.batch import server_settings
        from cellseg.client import Client

        settings = server_settings(url, {})  # the model and thresholds the server applies, as a batch job asks
        self.client = Client(url)
        precision = settings.get("precision", {}).get("precision", "precision not reported")
        self.description = f"{settings['server']}: model sha256 {str(settings['model_sha256'])[:12]}, {precision}"
        self.reason = settings.get("precision", {}).get("reason") or "the server's choice"
        self.default_params = PostprocessParams(**{k: v for k, v in settings["params"].items()
                                                   if k in PostprocessParams.__dataclass_fields__})

    def segment(self, image: np.ndarray, params: PostprocessParams, original: np.ndarray | None = None) -> FrameResult:
        """`original`: the frame's own pixels, sent as a batch job sends a frame (its dtype, not float)."""
        result = self.client.segment(image if original is None else original, **{k: getattr(params, k) for k in THRESHOLDS})
        return FrameResult(None, result.labels, np.array([cell.score for cell in result.cells], dtype=np.float32))


def labels_from_codes(codes: np.ndarray, params: PostprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) from cached 8-bit maps: thresholds changed without running the network again."""
    seg = Segmentation.from_maps(decode_maps([codes])[0], params)
    return seg.labels, seg.scores()


def registered_model_file(tag: str) -> Path:
    """The fp32 ONNX file of a model in the BentoML store (its int8 sibling, where validated, is
    chosen per CPU as for any file), checked against the sha256 the store recorded."""
    import bentoml

    from cellseg.onnx_model import verify_sha256
    from cellseg.variants import registered_variants

    try:
        model = bentoml.models.get(tag)
    except Exception as exc:  # noqa: BLE001  (bentoml raises its own NotFound and tag errors)
        raise ValueError(f"no model {tag!r} in the BentoML store ({exc}); register one with python -m export register") from None
    variants = registered_variants(model.info.metadata)
    path = Path(model.path_of(variants["fp32"]["file"]))
    verify_sha256(path, variants["fp32"]["sha256"])
    return path


def file_params(path: Path) -> PostprocessParams:
    """The thresholds an ONNX file carries in its metadata (read without loading the network)."""
    from cellseg.onnx_model import read_metadata

    return PostprocessParams(**read_metadata(path).get("postprocess", {}))


def load_model(choice: ModelChoice, threads: int | None = None) -> LocalModel | ServerModel:
    if choice.kind == SERVER:
        return ServerModel(choice.target)
    if choice.kind == REGISTERED:
        return LocalModel(registered_model_file(choice.target), threads)
    path = default_model_path() if choice.kind == SHIPPED else Path(choice.target).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    return LocalModel(path, threads)


def frame_pixels(data, frame: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(raw float32 (H, W) image the runtime takes, the frame's own pixels) of a layer: (T, H, W) or
    (T, H, W, C) layers give frame `frame`; (H, W) and RGB(A) layers are one frame. A colour frame's
    own pixels are its luminance, as a batch job would send it to a server."""
    pixels = np.asarray(data[frame] if frame is not None else data)
    image = to_grayscale(pixels).astype(np.float32, copy=False)
    return image, (pixels if pixels.ndim == 2 else image)


def frames_of(shape: Sequence[int], rgb: bool, scope: str, current: int) -> list[int | None]:
    """The frames to segment: None for a 2-D image; for a stack, the current one or all of them."""
    spatial = 3 if rgb else 2
    if len(shape) == spatial:
        return [None]
    if len(shape) != spatial + 1:
        raise ValueError(f"expected a 2-D image or a (T, Y, X) time-lapse, got a layer of shape {tuple(shape)}")
    return list(range(shape[0])) if scope == "all frames" else [current]


def check_frames_are_times(path: str | None, frames: list[int | None]) -> None:
    """Refuse to segment every plane of a stack whose file says its planes are not time points (Z-slices,
    channels), as `cellseg segment` refuses the file: the planes would be labelled and tracked as frames.
    `path`: the file the layer was opened from (None where napari does not know one: nothing to check)."""
    from cellseg.imageio import ImageError, stack_info

    if len(frames) < 2 or not path or Path(path).suffix.lower() not in (".tif", ".tiff") or not Path(path).is_file():
        return
    try:
        stack_info(path)
    except ImageError as exc:
        raise ValueError(f"{Path(path).name}: {exc}. To segment the plane shown as a 2-D image, choose "
                         "'current frame'") from exc


def segment_frames(model, data, frames: list[int | None], params: PostprocessParams) -> Iterator[tuple[int | None, FrameResult]]:
    """(frame, result) for each frame in turn, lazily: a consumer that stops (Cancel) stops the work."""
    for frame in frames:
        image, original = frame_pixels(data, frame)
        yield frame, model.segment(image, params, original)


def layer_pixel_size(scale: Sequence[float], units: Sequence | None = None,
                     source: str | Path | None = None) -> PixelSize | None:
    """µm per pixel from a layer: its scale (y, x) in the length unit napari's `units` names (pint
    units: micrometer, nanometer...), or read as µm where the units say 'pixel' but the scale is not
    1 (readers that predate napari's units put µm there); else the pixel size in its file's metadata;
    None where nothing says (measurements in pixels only). A scale of 1 pixel is napari's default."""
    y_scale, x_scale = float(scale[-2]), float(scale[-1])
    factor = um_per_unit(units[-1]) if units else None
    if factor is not None:
        return given_pixel_size(x_scale * factor, y_scale * factor, source=f"layer scale ({units[-1]})")
    if (x_scale, y_scale) != (1.0, 1.0):
        return given_pixel_size(x_scale, y_scale, source="layer scale (read as µm)")
    if source and Path(source).is_file():
        return read_pixel_size(source)
    return None


def um_per_unit(unit) -> float | None:
    """µm per `unit` (a pint unit, as napari gives, or a name); None for pixels and unknown units."""
    name = str(unit).strip().lower()
    return UM_PER_UNIT[name] if name in UM_PER_UNIT else converted(1.0, name, "micrometer")


def converted(value: float, unit, target: str) -> float | None:
    """`value` `unit`s in `target` units (pint's names: napari's layer units are pint's, and pint comes
    with napari); None where `unit` is not of `target`'s kind (pixel, frame) or unknown."""
    try:
        import pint

        return float(pint.get_application_registry().Quantity(value, str(unit)).to(target).magnitude)
    except Exception:  # noqa: BLE001  (pint raises its own dimensionality and undefined-unit errors)
        return None


def frame_record(image: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, name: str, frame: int | None,
                 frames: int, pixel_size: PixelSize | None, time_s: float | None = None) -> dict:
    """A frame's record as a batch job writes it (cells with measurements in px, and µm where the
    size is known; the frame's time where known), named as `cellseg segment` names a stack's frames."""
    record_name = name if frame is None else frame_name(name, frame, frames)
    record = image_record(image, labels, scores, record_name, name, pixel_size=pixel_size)
    if frame is not None:
        record |= {"stack": name, "frame": frame, "time_s": time_s}
    return record


def frame_seconds(layer, frame: int | None) -> float | None:
    """Seconds since frame 0 of a (T, Y, X) layer whose time axis has a time unit (napari's `units`,
    e.g. minute, with the interval as its scale); None otherwise."""
    if frame is None or not getattr(layer, "units", None):
        return None
    interval = converted(float(layer.scale[0]), layer.units[0], "second")
    return None if interval is None else round(frame * interval, 3)


def write_tables(path: Path, records: Sequence[dict]) -> tuple[Path, Path]:
    """cells.csv (one row per cell, `cellseg segment`'s columns) at `path`, and the per-frame
    count/confluence table beside it (<stem>_summary.csv, summary.csv's columns)."""
    path = Path(path)
    summary = path.with_name(f"{path.stem}_summary.csv")
    path.write_bytes(cells_csv(records))
    summary.write_bytes(summary_csv(summary_row(record) for record in records))
    return path, summary


SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def save_training_example(folder: Path, name: str, image: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """The image (TIFF, its own values) and its corrected labels (`<name>_masks.png`, 16-bit, one number
    per cell, renumbered 1..N in the order of their values: an erased cell leaves no gap, so the file
    holds what `cellseg.annotations` reads back): the layout `python -m train finetune` reads.
    Existing files of that name are replaced (a correction saved twice is the later one)."""
    import tifffile

    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if labels.max(initial=0) == 0:
        raise ValueError("the labels layer has no cells: nothing to learn from")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = SAFE_NAME.sub("_", name).strip("._") or "image"
    image_path, mask_path = folder / f"{stem}.tif", folder / f"{stem}_masks.png"
    tifffile.imwrite(image_path, np.asarray(image))
    mask_path.write_bytes(label_png_bytes(relabel_sequential(labels.astype(np.int64))))
    return image_path, mask_path


@dataclass
class FinetuneRun:
    """`python -m train finetune` in a subprocess (torch stays out of napari's process; cancelling
    ends the process), its output streamed line by line. It starts from the shipped weights and
    learns from every example saved so far, as cellpose retrains from all of a user's corrections."""

    examples: Path
    out: Path
    minutes: float
    train: bool = True  # False: `--no-train` (the network kept; thresholds, TTA and a cell filter picked)
    lines: list[str] = field(default_factory=list)
    returncode: int | None = None
    cancelled: bool = False
    _process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "train", "finetune", str(self.examples), "--out", str(self.out),
                "--minutes", f"{self.minutes:g}", *([] if self.train else ["--no-train"])]

    def stream(self) -> Iterator[tuple[str, float]]:
        """Start the run and yield (line of output, fraction of the budget spent) until it ends."""
        if not (REPO / "train" / "finetune.py").is_file():
            raise FileNotFoundError(f"fine-tuning needs the project's checkout (train/ beside {REPO / 'cellseg'})")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        self._process = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            for line in raw.replace("\r", "\n").splitlines():  # tqdm redraws its bar with \r
                if line.strip():
                    self.lines.append(line)
                    yield line, min(1.0, (time.monotonic() - started) / (60 * self.minutes))
        self.returncode = self._process.wait()

    def run(self) -> int:
        for _ in self.stream():
            pass
        return self.returncode

    def cancel(self) -> None:
        """End the process and reap it here: the worker reading its output stops at its next line and
        never reaches `stream`'s own wait, so the exit status would otherwise stay unknown (None)."""
        if self._process and self._process.poll() is None:
            self.cancelled = True
            self._process.terminate()
            try:
                self.returncode = self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it ignored SIGTERM
                self._process.kill()
                self.returncode = self._process.wait()

    def resume_hint(self) -> str:
        """How to continue a cancelled run (from its last checkpoint, saved every minute)."""
        if not (self.out / "finetune.pt").is_file():
            return "it stopped before its first checkpoint: nothing to resume (start it again)"
        return f"to continue it: cd {shlex.quote(str(REPO))} && {shlex.join(self.command())} --resume"

    @property
    def verdict(self) -> str | None:
        """The run's last word ("VERDICT: BETTER: ..."), or None where it stopped before one."""
        return next((line for line in reversed(self.lines) if line.startswith("VERDICT:")), None)

    @property
    def error(self) -> str | None:
        """Why a run failed: its last 'error:' line, or its last line."""
        if self.returncode in (0, None) or self.verdict or self.cancelled:
            return None
        return next((line for line in reversed(self.lines) if "error" in line.lower()), self.lines[-1] if self.lines else
                    f"exit status {self.returncode}")

    @property
    def model(self) -> Path:
        return self.out / "model.onnx"


def new_run_folder(parent: Path) -> Path:
    """A fresh folder for one fine-tuning run under `parent` (runs never overwrite each other)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = Path(parent) / f"run-{stamp}", 1
    while folder.exists():
        n += 1
        folder = Path(parent) / f"run-{stamp}-{n}"
    return folder
