"""Static int8 quantisation (QDQ) of the fp32 ONNX model, calibrated on real training images.

    python -m export int8 --model models/livecell-unet.onnx --out outputs/livecell-unet.int8.onnx \
        [--per-tensor] [--calibration-images 32] [--method minmax|percentile|entropy] [--keep-head-fp32] \
        [--full-range-weights] [--evaluate [--card MODEL_CARD.md]]

Calibration images come from the training split (never validation), whole images normalised as the
runtime does, so activation ranges match what the served model sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from cellseg.data import default_data_root, load_split, subsample_per_type
from cellseg.onnx_model import METADATA_KEY, read_metadata, sha256_file
from cellseg.preprocess import normalize, pad_to, padded_size

METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Recipe:
    # Defaults: the recipe docs/int8_comparison.json picked (scripts/compare_int8.py), the closest
    # to fp32 on validation among the recipes as fast as per-tensor int8.
    per_channel: bool = True  # one weight scale per output channel instead of per tensor
    calibration_images: int = 32
    method: str = "percentile"  # how activation ranges are chosen from the calibration histograms
    keep_head_fp32: bool = False  # leave the first and last convolutions in fp32 (most sensitive)
    # 7-bit weights (-64..64): x86 int8 kernels without VNNI (AVX2, AVX-512 without VNNI) add pairs of
    # uint8 x int8 products in 16-bit registers, which 8-bit weights can overflow (255 * 127 * 2 > 32767)
    # and 7-bit ones cannot (2 * 255 * 64 = 32640); with VNNI or AMX the sum is 32-bit either way (docs/METRICS.md).
    reduce_range: bool = True
    activations: str = "uint8"  # uint8 | int8
    weights: str = "int8"  # int8 | uint8

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_images(data: Path, count: int) -> list[np.ndarray]:
    """`count` training images spread evenly over sources and cell types (fixed seed), normalised
    and padded to a multiple of 32 as the runtime does."""
    train = load_split(data, "train")
    groups = len({(s.source, s.cell_type) for s in train})
    chosen = subsample_per_type(train, -(-count // groups))
    samples = [chosen[i] for i in np.unique(np.linspace(0, len(chosen) - 1, count).round().astype(int))]
    return calibration_arrays(s.image() for s in samples)


def calibration_arrays(images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Raw images normalised and padded to a multiple of 32 as the runtime does: what `quantize`
    calibrates on. ONNX Runtime's calibrators stack each tensor's values over the calibration inputs,
    so these must share one shape: images of several sizes (a lab's crops beside full frames, portrait
    beside landscape) are cut into square tiles of the smallest side, every pixel in at least one."""
    arrays = []
    for image in images:
        x = normalize(image)
        arrays.append(pad_to(x, padded_size(x.shape[0]), padded_size(x.shape[1])))
    if len({a.shape for a in arrays}) <= 1:
        return arrays
    side = min(min(a.shape) for a in arrays)  # a multiple of 32, as every padded side is
    return [a[y : y + side, x : x + side] for a in arrays for y in tile_starts(a.shape[0], side)
            for x in tile_starts(a.shape[1], side)]


# ONNX Runtime's histogram calibrators (percentile, entropy) keep every activation of every calibration
# input until they build the histograms: about 0.8 GB per 544x704 frame for this network (measured:
# peak RSS 2.0 GB with 2 frames, 3.6 GB with 4), so 32 frames need ~26 GB. Fine-tuning calibrates
# within this many pixels (~6 GB), so a lab's 40 images do not exhaust a workstation's memory.
MAX_CALIBRATION_PIXELS = 3_000_000


def within_pixels(images: list[np.ndarray], max_pixels: int = MAX_CALIBRATION_PIXELS,
                  most: int = Int8Recipe.calibration_images) -> list[np.ndarray]:
    """At most `most` of `images`, spread over the list (not its first plate only), as many as fit in
    `max_pixels` (at least one)."""
    mean_pixels = sum(image.size for image in images) / max(len(images), 1)
    count = max(1, min(len(images), most, int(max_pixels // max(mean_pixels, 1))))
    return [images[i] for i in np.linspace(0, len(images) - 1, count).round().astype(int)] if images else []


def tile_starts(length: int, side: int) -> list[int]:
    """Where tiles of `side` start along `length` to cover it: side apart, the last one at the end."""
    starts = list(range(0, length - side + 1, side))
    return starts if starts[-1] + side == length else [*starts, length - side]


def head_and_stem_nodes(model_path: Path) -> list[str]:
    """Names of the first and the last Conv nodes of the graph."""
    convs = [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type == "Conv"]
    return [convs[0], convs[-1]] if convs else []


def quantize(fp32: Path, out: Path, images: list[np.ndarray], recipe: Int8Recipe = Int8Recipe()) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: x[None, None].astype(np.float32)} for x in images])

        def get_next(self):
            return next(self.batches, None)

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[recipe.method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    try:
        quantize_static(str(prepared), str(out), Reader(), activation_type=types[recipe.activations],
                        weight_type=types[recipe.weights], per_channel=recipe.per_channel,
                        reduce_range=recipe.reduce_range, calibrate_method=method,
                        nodes_to_exclude=head_and_stem_nodes(prepared) if recipe.keep_head_fp32 else None,
                        extra_options={"CalibMovingAverage": False})
    finally:
        prepared.unlink(missing_ok=True)
        for extra in out.parent.glob("augmented_model*.onnx"):
            extra.unlink()
    record_recipe(out, fp32, recipe)


def record_recipe(int8: Path, fp32: Path, recipe: Int8Recipe) -> None:
    """The fp32 model's metadata (post-processing defaults...) plus how the int8 file was made."""
    write_int8_metadata(int8, {**read_metadata(fp32), "quantization": {"format": "QDQ static", **recipe.to_dict(),
                                                                      "fp32_sha256": sha256_file(fp32)}})


def write_int8_metadata(int8: Path, metadata: dict) -> None:
    """`metadata` as the int8 file's cellseg metadata, its other entries kept."""
    model = onnx.load(str(int8))
    kept = [e for e in model.metadata_props if e.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend([*kept, onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(metadata))])
    onnx.save(model, str(int8))


def record_verdict(fp32: Path, int8: Path, verdict: dict) -> None:
    """A fine-tune's verdict into both files' metadata (`finetune.verdict`): `export register` reads it
    there, so a copied model.onnx that the run found not better is refused without its metrics.json.
    The int8 file's metadata is fp32's plus its recipe, and names fp32's sha256: both follow."""
    from export.onnx_export import set_metadata

    kept = {k: verdict[k] for k in ("outcome", "line", "images", "msa_before", "msa_after") if k in verdict}
    metadata = read_metadata(fp32)
    metadata["finetune"] = {**metadata.get("finetune", {}), "verdict": kept}
    set_metadata(fp32, metadata)
    quantization = {**read_metadata(int8).get("quantization", {}), "fp32_sha256": sha256_file(fp32)}
    write_int8_metadata(int8, {**metadata, "quantization": quantization})


def int8_summary(int8: Path, recipe: Int8Recipe, metrics: dict | None) -> dict:
    """What the model card says of an int8 file (export.model_card._int8_text)."""
    return {"file": int8.name, "mb": round(int8.stat().st_size / 1e6, 1), "sha256": sha256_file(int8),
            "recipe": recipe.to_dict(), "metrics": metrics and {k: v for k, v in metrics.items() if k != "per_image"}}


def evaluate_file(path: Path, samples: list, params=None) -> dict:
    """An ONNX file scored on `samples` one image at a time (as `cellseg evaluate`), with its own
    post-processing defaults or `params`, written beside it as <stem>.metrics.json (what `register`
    reads) with the CPU it ran on."""
    from tqdm import tqdm

    from cellseg.cpu import describe_cpu
    from cellseg.evaluate import evaluate_segmentations
    from cellseg.onnx_model import OnnxModel

    model = OnnxModel(path)
    segmentations = [model.segment([s.image()], params)[0] for s in tqdm(samples, desc=f"evaluating {path.name}")]
    metrics = {**evaluate_segmentations(samples, segmentations), "cpu": describe_cpu()}
    path.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate_int8(int8: Path, data: Path) -> dict:
    """The int8 file on the validation split with its own post-processing defaults (`cellseg evaluate --split val`)."""
    return evaluate_file(int8, load_split(data, "val"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/livecell-unet.onnx"))
    p.add_argument("--out", type=Path, required=True, help="the int8 file to write, e.g. outputs/livecell-unet.int8.onnx")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument("--calibration-images", type=int, default=Int8Recipe.calibration_images)
    p.add_argument("--method", choices=METHODS, default=Int8Recipe.method)
    p.add_argument("--keep-head-fp32", action="store_true")
    p.add_argument("--full-range-weights", action="store_true",
                   help="8-bit weights (default: 7-bit, exact on CPUs without VNNI; see Int8Recipe.reduce_range)")
    p.add_argument("--evaluate", action="store_true",
                   help="also score it on the validation split and write <out stem>.metrics.json beside it")
    p.add_argument("--card", type=Path, help="a model card whose '## int8 variant' section to rewrite (with --evaluate)")
    args = p.parse_args(argv)
    recipe = Int8Recipe(not args.per_tensor, args.calibration_images, args.method, args.keep_head_fp32,
                        reduce_range=not args.full_range_weights)
    quantize(args.model, args.out, calibration_images(args.data, recipe.calibration_images), recipe)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) with {recipe.to_dict()}")
    if args.evaluate:
        from cellseg.evaluate import format_table

        metrics = evaluate_int8(args.out, args.data)
        print(format_table(metrics))
        if args.card:
            from cellseg.variants import variant_metrics
            from export.model_card import replace_int8_section

            replace_int8_section(args.card, int8_summary(args.out, recipe, metrics), variant_metrics(args.model))
            print(f"rewrote the int8 section of {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
