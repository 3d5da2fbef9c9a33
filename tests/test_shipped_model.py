"""Regression guard: the shipped model keeps its targets on the validation split."""

import json

import pytest

from cellseg.onnx_model import sha256_file

pytestmark = pytest.mark.data

# The targets (the shipped model: 0.778, 0.396, 0.216 -- docs/METRICS.md).
TARGETS = {"foreground_iou": 0.75, "ap50": 0.35, "msa": 0.15}


def test_metadata_describes_inference(onnx_model):
    meta = onnx_model.metadata
    assert meta["output_channels"] == ["foreground", "boundary", "distance"]
    assert meta["normalization"]["method"] == "percentile"
    assert set(meta["postprocess"]) >= {"fg_threshold", "seed_threshold", "min_size"}
    assert meta["data_split"]["val"] and meta["training"]["command"].startswith("python -m train")
    assert "non-commercial" in meta["license"]


def test_shipped_model_meets_targets_on_validation(onnx_model, data_root, model_path, tmp_path):
    from cellseg.cli import main

    out = tmp_path / "val.json"
    assert main(["evaluate", "--model", str(model_path), "--data", str(data_root), "--split", "val",
                 "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 6 and result["model_sha256"] == sha256_file(model_path)
    for key, target in TARGETS.items():
        assert result[key] >= target, f"{key} = {result[key]:.3f} fell below the target {target}"
    # the numbers recorded in the model's metadata are the numbers we measure now
    for key in ("foreground_iou", "ap50", "msa"):
        assert result[key] == pytest.approx(onnx_model.metadata["metrics"][key], abs=1e-3)
