"""ONNX Runtime session wrapper: loads the exported U-Net and its metadata (no torch needed)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cellseg.inference import DEFAULT_TILE_SIZE, Segmentation, segment_images
from cellseg.postprocess import PostprocessParams

METADATA_KEY = "cellseg"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "livecell-unet.onnx"
MODEL_ENV = "CELLSEG_MODEL"


def default_model_path() -> Path:
    return Path(os.environ.get(MODEL_ENV, DEFAULT_MODEL))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> str:
    """The file's sha256, after checking it equals `expected` (what the model store recorded)."""
    actual = sha256_file(path)
    if expected != actual:
        raise ValueError(f"model file {path} has sha256 {actual}, but {expected} was recorded: corrupt or replaced")
    return actual


def open_session(path: Path, options: ort.SessionOptions | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An ONNX Runtime session of the model at `path`. A file ONNX Runtime cannot load raises ValueError
    naming the file and why, not ONNX Runtime's own "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF" (a user's
    trial picked a .txt as the model in napari); a file that is no ONNX model at all is called that."""
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001  (ONNX Runtime raises its own classes, one per status code)
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        reason = str(exc).split(" : ", 3)[-1].strip()  # after "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : "
        if type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph"):
            raise ValueError(f"{path} is not an ONNX model ONNX Runtime can load ({reason}): give a .onnx file "
                             "that `python -m export` wrote, e.g. models/livecell-unet.onnx") from exc
        raise ValueError(f"ONNX Runtime could not load {path}: {reason}") from exc


def read_metadata(path: Path) -> dict:
    """The project's metadata block stored in the ONNX file (without loading the weights twice)."""
    session = open_session(path)
    return json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))


def default_tta(metadata: dict) -> bool:
    """A model's own TTA default from its metadata (ONNX or model store): absent means off."""
    return bool(metadata.get("tta", False))


def resolve_tta(requested: bool | None, metadata: dict) -> bool:
    """TTA as asked, or the model's default where the caller left it open (None)."""
    return default_tta(metadata) if requested is None else bool(requested)


def available_providers() -> list[str]:
    """GPU first where this onnxruntime build has it; CPU always."""
    preferred = ("CUDAExecutionProvider", "CPUExecutionProvider")
    available = ort.get_available_providers()
    return [p for p in preferred if p in available]


class OnnxModel:
    """The exported network: `predict` maps (N, 1, H, W) float32 to (N, 3, H, W) probabilities."""

    def __init__(self, path: str | Path | None = None, threads: int | None = None,
                 providers: Sequence[str] | None = None, arena_keep_pixels: int | None = None,
                 spin: bool = True):
        """`arena_keep_pixels`: ONNX Runtime keeps the memory of its activations between calls (its
        arena), which makes a LIVECell image's network about 2x faster than allocating it afresh each call
        (docs/BENCHMARKS.md). A call with more pixels than this (a large image's tiles) gives the
        arena's free memory back to the system when it ends, so one big request does not leave the
        process at its peak. None: never give it back (batch jobs, evaluation).

        `spin`: ONNX Runtime's worker threads busy-wait for the next call after each one. Where
        other work shares the cores (the service's HTTP front post-processing, a batch job's
        pipeline threads reading and encoding other images), that spinning takes their CPU: the
        service and batch jobs turn it off."""
        self.path = Path(path) if path else default_model_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        self.arena_keep_pixels = arena_keep_pixels
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = open_session(self.path, options, providers or available_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_channels = int(self.session.get_outputs()[0].shape[1])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict = json.loads(meta.get(METADATA_KEY, "{}"))

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @property
    def default_params(self) -> PostprocessParams:
        return PostprocessParams(**self.metadata.get("postprocess", {}))

    @property
    def default_tta(self) -> bool:
        """Whether this model runs with test-time augmentation unless told otherwise (metadata "tta"):
        fine-tuned models, whose thresholds were picked on TTA maps, say so."""
        return default_tta(self.metadata)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n, _, height, width = batch.shape
        shrink = self.arena_keep_pixels is not None and n * height * width > self.arena_keep_pixels
        # The output goes straight into an array numpy owns: left in ONNX Runtime's arena, it would
        # pin its block there and keep the arena from shrinking until the caller drops it.
        output = np.empty((n, self.output_channels, height, width), dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cpu", 0, np.float32, output.shape, output.ctypes.data)
        self.session.run_with_iobinding(binding, self._shrink if shrink else None)
        return output

    def segment(self, images: Sequence[np.ndarray], params: PostprocessParams | None = None,
                batch_size: int = 4, tile_size: int = DEFAULT_TILE_SIZE, tta: bool | None = None) -> list[Segmentation]:
        """Raw (H, W) images to segmentations, with the model's default thresholds and TTA unless given."""
        return segment_images(self.predict, images, params or self.default_params, batch_size, tile_size,
                              resolve_tta(tta, self.metadata))
