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
    """'int8' where its AP50 and mSA are each within INT8_TOLERANCE of fp32's (or above), else 'fp32'.
    Whether the two files are one network's is `check_int8_pair`'s to say."""
    if not int8 or not all(k in int8 and k in fp32 for k in ("ap50", "msa")):
        return "fp32"
    return "int8" if all(fp32[k] - int8[k] <= INT8_TOLERANCE for k in ("ap50", "msa")) else "fp32"


def int8_source(int8_model: Path) -> str | None:
    """The sha256 of the fp32 file an int8 file was quantized from, as `python -m export int8` records
    it (None for a file that does not say)."""
    return (read_metadata(int8_model).get("quantization") or {}).get("fp32_sha256")


def check_int8_pair(fp32_model: Path, int8_model: Path) -> None:
    """Raise ValueError where the int8 file says it was made from another fp32 file than `fp32_model`:
    its figures and cells are another network's (`export int8 ... --out` over a sibling does that)."""
    from cellseg.onnx_model import sha256_file

    made_from = int8_source(int8_model)
    if made_from is not None and made_from != sha256_file(fp32_model):
        raise ValueError(f"{int8_model} was quantized from another model (fp32 sha256 {made_from[:12]}), not from "
                         f"{fp32_model}: make its int8 again with python -m export int8 --model {fp32_model} --out "
                         f"{int8_model}")


def registered_variants(metadata: dict) -> dict[str, dict]:
    """{precision: {file, sha256, metrics}} of a model in the BentoML store, from its metadata (an old
    entry: its one fp32 file); the service and the napari plugin read registered models through it."""
    return metadata.get("variants") or {"fp32": {"file": "model.onnx", "sha256": metadata.get("sha256")}}


def int8_validated(fp32_model: Path, int8_model: Path) -> bool:
    """Whether the int8 file's recorded validation AP50 and mSA are within INT8_TOLERANCE of fp32's."""
    return default_precision(variant_metrics(fp32_model), variant_metrics(int8_model)) == "int8"


def choose_for_model(model: Path, requested: str | None = None, providers=None, threads: int | None = None):
    """The file to run for a model a command was given, and why (cellseg.precision.PrecisionChoice):
    for an fp32 file, its int8 sibling (`<stem>.int8.onnx`) where its recorded validation figures are
    within tolerance and, on this CPU, it agrees with fp32 and is faster; else the fp32 file. An int8
    file given by name is asked for (unless `requested` says otherwise) and checked against its fp32
    sibling where there is one."""
    from cellseg.precision import PrecisionChoice, choose_precision, fp32_sibling, int8_sibling, requested_precision

    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"ONNX model not found: {model}")
    fp32 = fp32_sibling(model)
    if fp32 is None:  # an fp32 file
        int8 = int8_sibling(model) if int8_sibling(model).is_file() else None
        if int8 is not None:
            try:
                check_int8_pair(model, int8)
            except ValueError as exc:
                if requested_precision(requested) == "int8":
                    raise
                return PrecisionChoice("fp32", model, f"the int8 file beside it is another model's ({exc})",
                                       requested_precision(requested))
        return choose_precision(model, int8, requested, providers, threads,
                                int8_validated=int8 is not None and int8_validated(model, int8))
    wanted = requested_precision(requested or "int8")
    if wanted == "fp32":
        if not fp32.is_file():
            raise FileNotFoundError(f"fp32 asked for, but {model} has no fp32 file beside it ({fp32.name})")
        return choose_precision(fp32, None, "fp32", providers, threads)
    if not fp32.is_file():
        return PrecisionChoice("int8", model, f"int8 file given; no fp32 file beside it ({fp32.name}) to check it against",
                               wanted)
    check_int8_pair(fp32, model)
    return choose_precision(fp32, model, wanted, providers, threads, int8_validated=int8_validated(fp32, model))
