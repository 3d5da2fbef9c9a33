"""`python -m export cell-rules`: the rules go into both files, the int8 file names the new fp32 file,
the figures and the card follow, and the validation split stays out of the fit."""

import json
import shutil
from dataclasses import replace

import pytest

pytestmark = pytest.mark.data


def test_draws_are_training_images_only_and_disjoint(data_root):
    from cellseg.data import load_split
    from export.cell_rules import rule_draws

    tuning, held_back = rule_draws(data_root, 2)
    ids = {s.id for s in tuning} | {s.id for s in held_back}
    assert not {s.id for s in tuning} & {s.id for s in held_back}
    assert not ids & {s.id for s in load_split(data_root, "val")}
    assert ids <= {s.id for s in load_split(data_root, "train")}
    # a cell type with no training image left over (a LIVECell one) is only in the tuning draw
    assert {s.cell_type for s in held_back} < {s.cell_type for s in tuning}


def test_rules_written_into_both_files_with_their_figures_and_card(model_path, data_root, tmp_path):
    from cellseg.data import load_split
    from cellseg.onnx_model import OnnxModel, read_metadata, sha256_file
    from export.cell_rules import refresh_int8, write_rules
    from export.int8 import evaluate_file
    from export.model_card import write_model_card

    fp32, int8, card = tmp_path / "m.onnx", tmp_path / "m.int8.onnx", tmp_path / "MODEL_CARD.md"
    shutil.copy(model_path, fp32)
    shutil.copy(model_path.with_suffix(".int8.onnx"), int8)
    shutil.copy(model_path.parent / "MODEL_CARD.md", card)
    shipped = OnnxModel(fp32).default_params
    # the shipped merge alone: a different set of rules from the file's, so every field must change
    params = replace(shipped, cell_filter=None)
    rules = {"command": "python -m export cell-rules --model m.onnx", "fitted_on": ["a"], "held_back": ["b"],
             "cell_merge": {"kept": True, "reason": "cell merge kept (test)"},
             "cell_filter": {"kept": False, "reason": "cell filter not kept (test)"}}
    samples = load_split(data_root, "val")[:2]
    metrics = evaluate_file(fp32, samples, params)
    meta = write_rules(fp32, params, rules, "val", metrics, card)
    summary = refresh_int8(int8, fp32, samples, params)
    write_model_card(card, fp32, meta, sha256_file(fp32), meta["export_command"], summary)

    written, quantised = read_metadata(fp32), read_metadata(int8)
    assert OnnxModel(fp32).default_params == params and OnnxModel(int8).default_params == params
    assert written["cell_rules"] == rules and written["metrics"]["n_images"] == 2
    assert written["metrics"]["msa"] == pytest.approx(metrics["msa"])
    assert quantised["quantization"]["fp32_sha256"] == sha256_file(fp32) != sha256_file(model_path)
    assert quantised["quantization"]["reduce_range"] is True  # the recipe is kept
    assert json.loads(int8.with_suffix(".metrics.json").read_text())["n_images"] == 2
    text = card.read_text()
    # the export command is carried over from the old card; the rules and their reasons are stated
    assert written["export_command"].startswith("python -m export --checkpoint")
    assert "Cells: cell merge kept (test)." in text and "Cells: cell filter not kept (test)." in text
    assert "P(annotated)" not in text  # no filter, so scores stay mean foreground probabilities
    assert sha256_file(fp32) in text and summary["sha256"] in text and "'coef'" not in text


def test_the_card_describes_the_run_it_is_for_not_the_shipped_one(model_path, tmp_path):
    """A user's trial: the card of a 4-image, 3-minute run said it was trained on "the 487 Kaggle
    Sartorius images", that "LIVECell is represented by 11 training images of 6 cell types", and that
    rules fitted with --per-type 1 took "at most 8 per cell type": fixed text. It is counted now, and a
    --max-images run says it is a short one."""
    from cellseg.onnx_model import read_metadata, sha256_file
    from export.model_card import write_model_card

    meta = read_metadata(model_path)
    train = ["livecell:train:A172_Phase_C7_1_00d00h00m_1.tif", "livecell:train:A172_Phase_C7_1_00d04h00m_2.tif",
             "livecell:train:BT474_Phase_B3_1_00d00h00m_1.tif", "livecell:train:BT474_Phase_B3_1_00d04h00m_2.tif"]
    meta["data_split"] = {"train": train, "val": ["livecell:val:MCF7_Phase_F4_2_00d00h00m_4.tif"]}
    meta["training"]["command"] = "python -m train --max-images 4 --epochs 2 --out runs/short"
    meta["cell_rules"] = {**meta["cell_rules"], "command": "python -m export cell-rules --model m.onnx --per-type 1"}
    card = tmp_path / "MODEL_CARD.md"
    write_model_card(card, model_path, meta, sha256_file(model_path), "python -m export ...")
    text = card.read_text()
    assert "5 LIVECell images (COCO polygons)," in text and "Sartorius images (RLE" not in text.split("## Training")[1]
    assert "**A short run**" in text and "4 training images of 2 cell types" in text
    assert "(at most 1 per cell type)" in text and "the 487 Kaggle" not in text
