"""Which precision of the shipped model runs by default: int8 where its recorded validation accuracy
is within INT8_TOLERANCE of fp32's, else fp32. One rule for the service (`python -m export register`
writes it into the model store) and for batch jobs (`cellseg segment`'s default `--model`)."""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.onnx_model import read_metadata

# int8 runs by default only when its validation AP50 and mSA are each within this of fp32's.
INT8_TOLERANCE = 0.01
METRIC_KEYS = ("foreground_iou", "ap", "ap50", "ap75", "msa", "count_error")


def variant_metrics(path: Path) -> dict:
    """Validation metrics recorded beside an ONNX file (`<stem>.metrics.json`), else in its metadata."""
    recorded = path.with_suffix(".metrics.json")
    metrics = json.loads(recorded.read_text()) if recorded.is_file() else (read_metadata(path).get("metrics") or {})
    return {k: metrics[k] for k in METRIC_KEYS if k in metrics}


def default_precision(fp32: dict, int8: dict | None) -> str:
    """'int8' where its AP50 and mSA are each within INT8_TOLERANCE of fp32's, else 'fp32'."""
    if not int8 or not all(k in int8 and k in fp32 for k in ("ap50", "msa")):
        return "fp32"
    return "int8" if all(fp32[k] - int8[k] <= INT8_TOLERANCE for k in ("ap50", "msa")) else "fp32"


def default_variant(fp32_model: Path) -> Path:
    """The file to run for `fp32_model`: its int8 sibling (`<stem>.int8.onnx`) where the rule picks
    int8, else the fp32 file itself."""
    int8_model = fp32_model.with_suffix(".int8.onnx")
    if not (fp32_model.is_file() and int8_model.is_file()):
        return fp32_model
    chosen = default_precision(variant_metrics(fp32_model), variant_metrics(int8_model))
    return int8_model if chosen == "int8" else fp32_model
