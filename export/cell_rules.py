"""Fit the shipped model's cell rules and write them into the model and its int8 twin.

    python -m export cell-rules --model models/livecell-unet.onnx

The rules are the ones `python -m train finetune` learns from a lab's images (train/cell_rules.py:
which touching cells are one, then which cut cells annotators draw at all), fitted here on the
training-split images that picked the shipped thresholds (at most `--per-type` of each cell type, the
draw scripts/tune_postprocess.py makes), without TTA, as the model serves. Each rule is kept where its
leave-one-image-out mSA beats none and a second, disjoint draw of training images (the held-back
images here) confirms it. The validation split is not looked at until the rules are chosen; then
both files get the new defaults (the int8 file's metadata names the new fp32 sha256), their
validation figures, `<stem>.metrics.json` and the model card are rewritten. Re-running refits from
the thresholds alone, so the command gives the same files twice.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tqdm import tqdm

from cellseg.data import Sample, default_data_root, load_split, subsample_per_type
from cellseg.evaluate import format_table
from cellseg.inference import predict_maps
from cellseg.onnx_model import OnnxModel, read_metadata, sha256_file
from cellseg.postprocess import PostprocessParams
from export.int8 import evaluate_file

CONFIRM_SEED = 1  # the held-back draw; the tuning draw is subsample_per_type's default seed 0


def rule_draws(data: Path, per_type: int) -> tuple[list[Sample], list[Sample]]:
    """(the tuning draw, a disjoint draw of other training images): cell types with no image left
    over (the LIVECell ones, 1-3 training images each) are not in the second."""
    train = load_split(data, "train")
    tuning = subsample_per_type(train, per_type)
    taken = {s.id for s in tuning}
    return tuning, subsample_per_type([s for s in train if s.id not in taken], per_type, seed=CONFIRM_SEED)


def fit_model_rules(model: OnnxModel, tuning: list[Sample], held_back: list[Sample]) -> tuple[PostprocessParams, dict]:
    """The model's thresholds with the rules that are kept, and what each rule's pick said."""
    from train.finetune import Split, pick_cell_rules  # training-side code: scikit-learn, torch

    thresholds = model.default_params.without_rules()

    def maps(samples: list[Sample], what: str):
        return [predict_maps(model.predict, [s.image()])[0] for s in tqdm(samples, desc=f"network, {what}")]

    params, choices = pick_cell_rules(Split(tuning, held_back), maps(tuning, "tuning images"),
                                      maps(held_back, "held-back images"), thresholds)
    return params, {field: choice.to_dict() for field, choice in choices.items()}


def export_command(meta: dict, card: Path) -> str:
    """The command that exported the network (the card's 'Export:' line for files made before it was kept)."""
    if meta.get("export_command"):
        return meta["export_command"]
    found = re.search(r"^Export: `([^`]*)`", card.read_text(), re.MULTILINE) if card.is_file() else None
    return found.group(1) if found else "python -m export"


def write_rules(fp32: Path, params: PostprocessParams, rules: dict, split: str, metrics: dict, card: Path) -> dict:
    """The new defaults, what chose them and the validation figures into the fp32 file's metadata."""
    from export.onnx_export import set_metadata

    meta = read_metadata(fp32)
    meta["export_command"] = export_command(meta, card)
    meta["postprocess"] = params.to_dict()
    meta["cell_rules"] = rules
    meta["metrics"] = {"split": split, **{k: v for k, v in metrics.items() if k not in ("per_image", "cpu")}}
    set_metadata(fp32, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export cell-rules", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.onnx"), help="the fp32 file")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--per-type", type=int, default=8, help="training images per cell type in each draw")
    p.add_argument("--split", default="val", help="split evaluated into the metadata and model card")
    p.add_argument("--card", type=Path, help="model card to rewrite (default: MODEL_CARD.md beside --model)")
    args = p.parse_args(argv)
    command = "python -m export cell-rules " + " ".join(sys.argv[2:] if argv is None else argv)
    fp32, card = args.model, args.card or args.model.parent / "MODEL_CARD.md"
    int8 = fp32.with_suffix(".int8.onnx")

    tuning, held_back = rule_draws(args.data, args.per_type)
    print(f"fitting cell rules on {len(tuning)} training images, confirming on {len(held_back)} others", flush=True)
    params, choices = fit_model_rules(OnnxModel(fp32), tuning, held_back)
    for choice in choices.values():
        print(f"  {choice['reason']}", flush=True)
    rules = {"command": command, "fitted_on": [s.id for s in tuning], "held_back": [s.id for s in held_back],
             **choices}

    samples = load_split(args.data, args.split)
    metrics = evaluate_file(fp32, samples, params)  # <stem>.metrics.json too
    print(format_table(metrics))
    meta = write_rules(fp32, params, rules, args.split, metrics, card)
    summary = None
    if int8.is_file():
        summary = refresh_int8(int8, fp32, samples, params)
    from export.model_card import write_model_card

    write_model_card(card, fp32, meta, sha256_file(fp32), meta["export_command"], summary)
    print(f"cell rules written into {fp32}" + (f" and {int8}" if summary else "") + f"; model card {card}")
    return 0


def refresh_int8(int8: Path, fp32: Path, samples: list[Sample], params: PostprocessParams) -> dict:
    """The int8 file takes the fp32 file's new metadata (its recipe and the new fp32 sha256) and is
    scored again with the rules: its cells are what the rules judge, so its figures move too."""
    from export.int8 import Int8Recipe, int8_summary, record_recipe

    quantization = read_metadata(int8)["quantization"]
    recipe = Int8Recipe(**{k: quantization[k] for k in Int8Recipe().to_dict()})
    record_recipe(int8, fp32, recipe)
    metrics = evaluate_file(int8, samples, params)
    print(format_table(metrics))
    return int8_summary(int8, recipe, metrics)


if __name__ == "__main__":
    sys.exit(main())
