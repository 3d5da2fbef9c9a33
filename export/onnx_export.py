"""Checkpoint -> ONNX (dynamic batch, height, width) + checker + parity + metadata + model card."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from cellseg.data import default_data_root, load_split
from cellseg.evaluate import evaluate_segmentations, format_table
from cellseg.inference import predict_padded
from cellseg.onnx_model import METADATA_KEY, OnnxModel, sha256_file
from cellseg.postprocess import PostprocessParams
from cellseg.preprocess import NORMALIZATION, SIZE_DIVISOR, normalize
from cellseg.targets import BOUNDARY_WIDTH, OUTPUT_CHANNELS
from export.int8 import Int8Recipe, calibration_images, int8_summary, quantize
from export.model_card import write_model_card
from train.model import WithSigmoid, load_checkpoint, save_weights

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
# Most an exported model may differ from PyTorch (max |onnxruntime - pytorch| over probability maps).
PARITY_TOLERANCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/unet/best.pt"))
    p.add_argument("--out", type=Path, default=Path("models/livecell-unet.onnx"))
    p.add_argument("--data", type=Path, default=default_data_root(), help="real images for parity and evaluation")
    p.add_argument("--split", default="val", help="split evaluated into the metadata and model card")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--int8", action="store_true", help="also write a statically quantised <out>.int8.onnx")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation (metadata then holds no metrics)")
    p.add_argument("--fg-threshold", type=float, help="post-processing default stored in the metadata")
    p.add_argument("--seed-threshold", type=float, help="post-processing default stored in the metadata")
    p.add_argument("--min-size", type=int, help="post-processing default stored in the metadata")
    p.add_argument("--min-seed-size", type=int, help="post-processing default stored in the metadata")
    p.add_argument("--seed-sigma", type=float, help="post-processing default stored in the metadata")
    p.add_argument("--merge-threshold", type=float, help="post-processing default stored in the metadata")
    p.add_argument("--seed-peak", type=float, help="post-processing default stored in the metadata")
    p.add_argument("--card", type=Path, default=None, help="model card path (default: MODEL_CARD.md beside --out)")
    return p.parse_args(argv)


def export_onnx(model: torch.nn.Module, out: Path, opset: int) -> None:
    """Dynamic batch, height and width (height and width must be multiples of 32)."""
    wrapped = WithSigmoid(model).eval()
    example = torch.zeros(1, 1, 256, 256)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapped, (example,), str(out), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                      OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
        opset_version=opset, dynamo=False,
    )


def parity_check(model: torch.nn.Module, onnx_model: OnnxModel, images: list[np.ndarray]) -> float:
    """Max |ONNX Runtime - PyTorch| over probability maps of real images (batched, as served)."""
    arrays = [normalize(im) for im in images]
    wrapped = WithSigmoid(model).eval()

    @torch.no_grad()
    def torch_predict(batch):
        return wrapped(torch.from_numpy(batch)).numpy()

    ours = predict_padded(onnx_model.predict, arrays)
    reference = predict_padded(torch_predict, arrays)
    return float(max(np.abs(a - b).max() for a, b in zip(ours, reference)))


def export_checked(model: torch.nn.Module, out: Path, opset: int, parity_images: list[np.ndarray]) -> tuple[OnnxModel, float]:
    """`export_onnx`, the full onnx.checker, then `parity_check` on `parity_images` (raw real images):
    SystemExit where ONNX Runtime and PyTorch differ by more than PARITY_TOLERANCE. Returns the
    exported model, loaded, and the difference."""
    t0 = time.time()
    export_onnx(model, out, opset)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s; onnx.checker passed")
    onnx_model = OnnxModel(out)
    diff = parity_check(model, onnx_model, parity_images)
    print(f"parity on {len(parity_images)} real images: max |onnxruntime - pytorch| = {diff:.2e}")
    if diff > PARITY_TOLERANCE:
        # not kept: a file that does not compute what the network does must not be registered or served
        # (a fine-tune wrecked by its learning rate left one with no verdict beside it, which register took)
        del onnx_model
        out.unlink(missing_ok=True)
        raise SystemExit(f"parity check failed: max |onnxruntime - pytorch| = {diff} > {PARITY_TOLERANCE}; "
                         f"{out} not kept")
    return onnx_model, diff


def write_exported(model: torch.nn.Module, out: Path, metadata: dict, parity: float) -> None:
    """`metadata`, with the parity `export_checked` found (added to it), into the exported file, and the
    PyTorch weights beside it (<out>.safetensors): TorchScript (bioimage.io, QuPath, deepImageJ) is traced
    from them."""
    metadata["parity_max_abs_diff"] = parity
    set_metadata(out, metadata)
    save_weights(model, metadata["architecture"], out.with_suffix(".safetensors"))


def set_metadata(path: Path, metadata: dict) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entries = {METADATA_KEY: json.dumps(metadata), "output_channels": ",".join(metadata["output_channels"]),
               "license": metadata["license"], "producer": "cellseg export"}
    for key, value in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.doc_string = "LIVECell U-Net: (N,1,H,W) normalised phase contrast -> (N,3,H,W) probabilities"
    onnx.save(model, str(path))


LICENSE = "Weights trained on LIVECell (CC BY-NC 4.0, Sartorius): non-commercial use only."


def io_metadata(name: str, postprocess: dict, architecture: dict) -> dict:
    """What every exported model says about itself: inputs, outputs, normalisation, channels,
    post-processing defaults and architecture (what the runtime reads)."""
    return {
        "name": name,
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, "height", "width"], "dtype": "float32",
                  "size_divisor": SIZE_DIVISOR, "layout": "NCHW, grayscale"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 3, "height", "width"], "activation": "sigmoid"},
        "normalization": NORMALIZATION,
        "output_channels": list(OUTPUT_CHANNELS),
        "boundary_width": BOUNDARY_WIDTH,
        "postprocess": postprocess,
        "architecture": {"type": "smp.Unet", "encoder": architecture["encoder"],
                         "decoder_channels": list(architecture["decoder_channels"])},
    }


def finetune_metadata(name: str, base: Path, postprocess: dict, architecture: dict, images: list[str],
                      held_back: list[str], training: dict, tta: bool = False) -> dict:
    """Metadata of a model fine-tuned on a lab's images (`python -m train finetune`): where it came
    from (the base weights' sha256), on which images, the thresholds picked for them and whether it
    runs with test-time augmentation by default ("tta": every runtime path reads it)."""
    return {**io_metadata(name, postprocess, architecture), "tta": tta,
            "finetune": {"base": base.name, "base_sha256": sha256_file(base), "images": images,
                         "held_back": held_back},
            "training": training, "metrics": None,
            "license": LICENSE + " Fine-tuned from those weights: the same terms apply."}


def build_metadata(config: dict, checkpoint: dict, metrics: dict | None, split: str) -> dict:
    return {
        **io_metadata("livecell-unet", config["postprocess"], config),
        # as recorded by the run that trained the weights
        "normalization": config["normalization"],
        "output_channels": config["output_channels"],
        "boundary_width": config["boundary_width"],
        "training": {k: config.get(k) for k in ("crop", "batch_size", "epochs", "steps_per_epoch", "lr", "weight_decay",
                                                "seed", "encoder_weights", "encoder_weights_source", "balance",
                                                "init_weights", "init_weights_sha256", "minutes", "device",
                                                "precision", "data", "command")}
        | {"train_minutes": round(checkpoint["train_seconds"] / 60, 1), "best_epoch": checkpoint["epoch"] + 1},
        "data_split": {"train": config["train_images"], "val": config["val_images"]},
        "metrics": {"split": split, **{k: v for k, v in (metrics or {}).items() if k != "per_image"}} if metrics else None,
        "license": LICENSE,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    model, checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]
    config["postprocess"] = PostprocessParams(**config["postprocess"]).with_overrides(
        fg_threshold=args.fg_threshold, seed_threshold=args.seed_threshold, min_size=args.min_size,
        min_seed_size=args.min_seed_size, seed_sigma=args.seed_sigma, merge_threshold=args.merge_threshold,
        seed_peak=args.seed_peak).to_dict()
    samples = load_split(args.data, args.split)
    images = [s.image() for s in samples]
    onnx_model, diff = export_checked(model, args.out, args.opset, images[:3])

    metrics = None
    if not args.no_eval:
        # The file has no metadata yet, so pass the post-processing defaults it is about to carry.
        params = PostprocessParams(**config["postprocess"])
        metrics = evaluate_segmentations(samples, onnx_model.segment(images, params))
        print(format_table(metrics))
    command = " ".join(["python -m export", *(argv or [])])
    metadata = {**build_metadata(config, checkpoint, metrics, args.split), "export_command": command}
    write_exported(model, args.out, metadata, diff)
    if metrics:
        args.out.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
    # The learning curve (loss and validation metrics per epoch) ships with the model as evidence.
    args.out.with_suffix(".history.json").write_text(json.dumps(checkpoint["history"], indent=1))

    summary = None
    if args.int8:
        int8 = args.out.with_suffix(".int8.onnx")
        recipe = Int8Recipe()
        quantize(args.out, int8, calibration_images(args.data, recipe.calibration_images), recipe)
        qmetrics = None if args.no_eval else evaluate_segmentations(
            samples, OnnxModel(int8).segment(images, PostprocessParams(**config["postprocess"])))
        summary = int8_summary(int8, recipe, qmetrics)
        print(f"int8 model {int8} ({summary['mb']} MB):")
        if qmetrics:
            print(format_table(qmetrics))
            int8.with_suffix(".metrics.json").write_text(json.dumps(qmetrics, indent=2))
    card = args.card or args.out.parent / "MODEL_CARD.md"
    sha256 = sha256_file(args.out)
    write_model_card(card, args.out, metadata, sha256, command, summary)
    print(f"metadata written into {args.out}; model card {card}; sha256 {sha256}")
    return 0
