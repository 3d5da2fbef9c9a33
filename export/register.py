"""Register an ONNX model in the BentoML model store (`python -m export register`)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cellseg.onnx_model import default_model_path, read_metadata, sha256_file

MODEL_NAME = "livecell-unet"
MODEL_FILE = "model.onnx"


def find_registered(sha256: str, name: str = MODEL_NAME):
    """The stored model of this name whose file has this sha256, if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # no model of that name yet
        return None
    for model in models:
        if model.info.metadata.get("sha256") == sha256:
            return model
    return None


def register(path: Path, name: str = MODEL_NAME):
    """Put `path` in the model store (idempotent: the same file returns the existing entry)."""
    import bentoml

    sha256 = sha256_file(path)
    existing = find_registered(sha256, name)
    if existing is not None:
        return existing, False
    meta = read_metadata(path)
    metrics = meta.get("metrics") or {}
    metadata = {
        "sha256": sha256,
        "file": MODEL_FILE,
        "normalization": meta.get("normalization"),
        "postprocess": meta.get("postprocess"),
        "output_channels": meta.get("output_channels"),
        "input": meta.get("input"),
        "metrics": {k: metrics[k] for k in ("foreground_iou", "ap", "ap50", "ap75", "msa", "count_error") if k in metrics},
        "license": meta.get("license"),
    }
    labels = {"task": "instance-segmentation", "dataset": "livecell", "format": "onnx",
              "architecture": "unet-" + str((meta.get("architecture") or {}).get("encoder", "unknown")),
              "license": "cc-by-nc-4.0"}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copyfile(path, model.path_of(MODEL_FILE))
    return bentoml.models.get(model.tag), True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export register", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_path(), help="ONNX file to register")
    p.add_argument("--name", default=MODEL_NAME)
    args = p.parse_args(argv)
    model, created = register(args.model, args.name)
    print(json.dumps({"tag": str(model.tag), "created": created, "sha256": model.info.metadata["sha256"],
                      "path": model.path}))
    return 0
