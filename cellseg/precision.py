"""Which precision answers on the machine at hand: int8 only where it agrees with fp32 here and is faster.

int8 results depend on the CPU, not only int8 speed: without VNNI, x86 int8 kernels sum products in
16-bit registers that can saturate, and a model quantised on (and measured on) a VNNI machine then
segments worse (issue 24: AP50 0.455 -> 0.322 on an AVX2-only EPYC). So wherever a model is loaded to
answer (the service, batch jobs and their Dask workers, fine-tuning, evaluation), `choose_precision`
runs fp32 and int8 on the small real images in cellseg/reference/ on this CPU and execution provider
and picks int8 only where

- its cells agree with fp32's, pooled over the reference images: foreground IoU >= MIN_FOREGROUND_IOU
  and cells matched at IoU 0.5 (F1) >= MIN_MATCHED_F1, and
- it is faster here: fp32's median time / int8's >= MIN_SPEEDUP.

Otherwise fp32 answers, and the choice says why. The check takes about a second on 2 cores
(`check_s`; docs/BENCHMARKS.md) and is done once per process. CELLSEG_PRECISION=fp32|int8 (or a
command's --precision) forces a precision; forced int8 is still checked, and the reason says when
it disagrees.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellseg.cpu import describe_cpu, int8_kernels

PRECISION_ENV = "CELLSEG_PRECISION"
PRECISIONS = ("auto", "fp32", "int8")
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
# Agreement of int8's cells with fp32's over the reference images. The U8S8 file shipped before gave
# foreground IoU 0.969 and F1 0.937 on an AMX CPU, where its validation AP50 was within 0.003 of fp32,
# and 0.809 / 0.702 on an emulated AVX2 CPU, where its AP50 fell by 0.13 (docs/METRICS.md, "int8
# across CPUs"); the bounds sit between the two.
MIN_FOREGROUND_IOU = 0.95
MIN_MATCHED_F1 = 0.85
MIN_SPEEDUP = 1.1  # int8 must be this much faster than fp32 here to be worth any difference
TIMING_ROUNDS = 3


def int8_sibling(fp32: Path) -> Path:
    """`<stem>.int8.onnx` beside an fp32 file: where export, fine-tuning and the model store put it."""
    return Path(fp32).with_suffix(".int8.onnx")


def fp32_sibling(path: Path) -> Path | None:
    """The fp32 file of an int8 one (`X.int8.onnx` -> `X.onnx`), None for a file not named so."""
    path = Path(path)
    return path.with_name(path.name[: -len(".int8.onnx")] + ".onnx") if path.name.endswith(".int8.onnx") else None


def requested_precision(given: str | None = None) -> str:
    """`given` (a command's --precision), else $CELLSEG_PRECISION, else 'auto'; checked."""
    value = (given or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if value not in PRECISIONS:
        source = "--precision" if given else PRECISION_ENV
        raise ValueError(f"{source}={value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def reference_images() -> list[np.ndarray]:
    """The real 256x256 crops in cellseg/reference/ (scripts/make_reference_images.py), raw float32."""
    from cellseg.imageio import read_image

    paths = sorted(REFERENCE_DIR.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no reference images in {REFERENCE_DIR}")
    return [read_image(p) for p in paths]


@dataclass(frozen=True)
class Agreement:
    """int8 against fp32 on the reference images (pooled over them), and both times."""

    foreground_iou: float
    matched_f1: float
    mean_abs_diff: float  # of the foreground probability, the worst image's mean
    fp32_ms: float
    int8_ms: float
    check_s: float
    images: int = 0  # reference images compared

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms if self.int8_ms else 0.0

    @property
    def agrees(self) -> bool:
        return self.foreground_iou >= MIN_FOREGROUND_IOU and self.matched_f1 >= MIN_MATCHED_F1

    def to_dict(self) -> dict:
        return {**{k: round(v, 4) for k, v in asdict(self).items()}, "speedup": round(self.speedup, 2),
                "min_foreground_iou": MIN_FOREGROUND_IOU, "min_matched_f1": MIN_MATCHED_F1,
                "min_speedup": MIN_SPEEDUP}

    def words(self) -> str:
        return (f"foreground IoU {self.foreground_iou:.3f}, cells matched F1 {self.matched_f1:.3f} on "
                f"{self.images} reference images; {self.speedup:.2f}x fp32's speed")


@dataclass(frozen=True)
class PrecisionChoice:
    """The file that answers, its precision, and why; `to_dict` is what answers and job.json carry."""

    precision: str  # fp32 | int8
    path: Path
    reason: str
    requested: str = "auto"
    cpu: str = field(default_factory=describe_cpu)
    provider: str = "CPUExecutionProvider"
    check: Agreement | None = None

    def to_dict(self) -> dict:
        return {"precision": self.precision, "file": self.path.name, "requested": self.requested,
                "reason": self.reason, "cpu": self.cpu, "provider": self.provider,
                "check": self.check.to_dict() if self.check else None}


def _cell_agreement(fp32_maps: Sequence[np.ndarray], int8_maps: Sequence[np.ndarray], params) -> tuple[float, float]:
    """(foreground IoU, F1 of cells matched at IoU 0.5) of int8's cells against fp32's, pooled over the
    images: a crop of 25 cells alone moves F1 by 0.04 per cell. Cut with the thresholds alone: the
    check is of the int8 kernels' maps, and a model's cell rules keep or drop a borderline cell on the
    smallest difference (the shipped model's rules took its foreground IoU from 0.961 to 0.951, at the
    0.95 floor, on the same maps), which would make the choice differ between machines for no fault of
    the kernels. The rules' effect on accuracy is checked where it is measured: the recorded
    validation figures (int8_validated)."""
    from cellseg.matching import matching
    from cellseg.postprocess import maps_to_labels

    params = params.without_rules()
    inter = union = tp = errors = 0
    for fp32, int8 in zip(fp32_maps, int8_maps):
        ref, test = maps_to_labels(fp32, params), maps_to_labels(int8, params)
        inter += int(np.logical_and(ref > 0, test > 0).sum())
        union += int(np.logical_or(ref > 0, test > 0).sum())
        stats = matching(ref, test)[0]
        tp, errors = tp + stats.tp, errors + stats.fp + stats.fn
    return (inter / union if union else 1.0), (2 * tp / (2 * tp + errors) if tp + errors else 1.0)


def _timed_maps(model, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
    from cellseg.inference import predict_maps

    t0 = time.perf_counter()
    maps = predict_maps(model.predict, images, batch_size=len(images))
    return maps, (time.perf_counter() - t0) * 1000


def measure_agreement(fp32_model, int8_model, images: Sequence[np.ndarray] | None = None,
                      params=None) -> Agreement:
    """Run both models on `images` (the reference images) with fp32's post-processing defaults; the
    speed from TIMING_ROUNDS alternating rounds (after the first, which warms both up), medians."""
    t0 = time.perf_counter()
    images = reference_images() if images is None else images
    params = params or fp32_model.default_params
    fp32_maps, _ = _timed_maps(fp32_model, images)
    int8_maps, _ = _timed_maps(int8_model, images)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(TIMING_ROUNDS):
        times["fp32"].append(_timed_maps(fp32_model, images)[1])
        times["int8"].append(_timed_maps(int8_model, images)[1])
    iou, f1 = _cell_agreement(fp32_maps, int8_maps, params)
    diff = max(float(np.abs(f[0] - q[0]).mean()) for f, q in zip(fp32_maps, int8_maps))
    return Agreement(iou, f1, diff, statistics.median(times["fp32"]), statistics.median(times["int8"]),
                     time.perf_counter() - t0, len(images))


def choose_precision(fp32: Path, int8: Path | None = None, requested: str | None = None,
                     providers: Sequence[str] | None = None, threads: int | None = None,
                     int8_validated: bool = True) -> PrecisionChoice:
    """The precision to answer with here (see the module's doc), checked once per process for the
    same files and settings. `int8`: the int8 file (default: fp32's sibling, where it exists).
    `int8_validated`: whether int8's recorded validation figures are within tolerance of fp32's
    (cellseg.variants.default_precision); where not, 'auto' stays with fp32 without a check."""
    from cellseg.onnx_model import available_providers

    fp32 = Path(fp32)
    int8 = Path(int8) if int8 is not None else (int8_sibling(fp32) if int8_sibling(fp32).is_file() else None)
    providers = tuple(providers or available_providers())
    return _choose_cached(fp32, _stamp(fp32), int8, _stamp(int8) if int8 else None, requested_precision(requested),
                          providers, threads, int8_validated)


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a file, so that a replaced file is checked anew within one process."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _choose_cached(fp32: Path, _fp32_stamp, int8: Path | None, _int8_stamp, requested: str,
                   providers: tuple[str, ...], threads: int | None, int8_validated: bool) -> PrecisionChoice:
    # the callers say it where their users look: the service's log, a batch job's terminal and job.json
    return _choose(fp32, int8, requested, providers, threads, int8_validated)


def _choose(fp32: Path, int8: Path | None, requested: str, providers: tuple[str, ...], threads: int | None,
            int8_validated: bool) -> PrecisionChoice:
    from cellseg.onnx_model import OnnxModel

    provider = providers[0]
    here = f"this CPU ({int8_kernels()})" if provider == "CPUExecutionProvider" else provider

    def choice(precision: str, reason: str, check: Agreement | None = None) -> PrecisionChoice:
        path = int8 if precision == "int8" and int8 is not None else fp32
        return PrecisionChoice(precision, path, reason, requested, describe_cpu(), provider, check)

    if requested == "fp32":
        return choice("fp32", "fp32 asked for")
    if int8 is None:
        if requested == "int8":
            raise FileNotFoundError(f"int8 asked for, but there is no int8 variant of {fp32} ({int8_sibling(fp32).name})")
        return choice("fp32", "no int8 variant")
    if requested == "auto" and not int8_validated:
        return choice("fp32", "int8's recorded validation accuracy is not within tolerance of fp32's")
    try:
        fp32_model = OnnxModel(fp32, threads=threads, providers=providers)
        int8_model = OnnxModel(int8, threads=threads, providers=providers)
        check = measure_agreement(fp32_model, int8_model)
    except Exception as exc:  # noqa: BLE001  (a corrupt or foreign int8 file must not stop the answers)
        if requested == "int8":
            raise
        return choice("fp32", f"the int8 file could not be checked ({type(exc).__name__}: {exc})")
    if requested == "int8":
        verdict = "agrees with" if check.agrees else "DISAGREES with"
        return choice("int8", f"int8 asked for; on {here} it {verdict} fp32 ({check.words()})", check)
    if not check.agrees:
        return choice("fp32", f"int8 disagrees with fp32 on {here} ({check.words()})", check)
    if check.speedup < MIN_SPEEDUP:
        return choice("fp32", f"int8 is not faster than fp32 on {here} ({check.words()})", check)
    return choice("int8", f"int8 agrees with fp32 on {here} and is faster ({check.words()})", check)
