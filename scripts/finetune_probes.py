r"""Six probes of why fine-tuning does not lift unseen astrocytes (issue 29), inference only.

    python scripts/finetune_probes.py interpolate runs/ab-full/astro-k10/model/model.onnx --type astro
    python scripts/finetune_probes.py offset --type astro
    python scripts/finetune_probes.py tta --type astro
    python scripts/finetune_probes.py base-rules [--per-type 30] [--tta] [--image-features]
    python scripts/finetune_probes.py network runs/e18-replay-lr1e4/astro-k10/model/model.onnx --type astro
    python scripts/finetune_probes.py int8 runs/e15-crop384/astro-k10/model/model.onnx --type astro \
        --lab runs/e15-crop384/astro-k10/astro

`interpolate` (WiSE-FT, Wortsman et al. 2022): every weight of a fine-tuned ONNX model moved back
towards the base's, w = a * fine-tuned + (1 - a) * base for a = 0, 0.25, ..., 1 (the two files must
be exports of the same architecture), each measured with the base's thresholds. Where a fine-tune
over-fits its few images, a blend often keeps what it learnt and what the base knew.

`offset`: are the base's cells systematically smaller or larger than the annotated ones? For every
annotated cell its best-overlapping predicted cell (IoU > 0.5): median area ratio and IoU; then the
scores with every predicted cell grown by 1..4 pixels (skimage's expand_labels).

`tta`: what the base's own network gains from post-processing picked for the type, with and without
test-time augmentation: the best mSA over a grid (fg, seed, seed_peak, seed_sigma, min_size) on 10
training-split images of the type (the draw `scripts/fewshot.py --pool train` makes), that choice
measured on the validation images, and the best the validation images themselves would pick (a
ceiling no choice made elsewhere can pass).

`base-rules`: the cell rules a fine-tune learns (train/cell_rules.py: merge, then filter), fitted
from the shipped model's thresholds alone on its own post-processing tuning images (the training split, at most 8 per
type, as scripts/tune_postprocess.py picks them; no TTA, as the shipped model serves) and measured on
the whole validation split, per source and cell type, each rule alone and both (`python -m export
cell-rules` fits the same rules and writes them into the model), and the shipped rules as they are.
Is the post-processing at its limit? `--per-type N` fits on more tuning images, `--tta` fits and
measures on test-time-augmented maps, `--image-features` adds a filter that also weighs the image's
own pixels in and around each cell (mean, spread, contrast with its surroundings, gradient, texture).

`network`: each fine-tuned network against the base's, cut with its own post-processing, with the
base's thresholds alone and with the base's thresholds and rules: does a fine-tune lose in the
network itself, or in rules fitted to the base's maps and applied to other maps?

`int8`: a fine-tuned model's int8 file made with other recipes (`export.int8.Int8Recipe`), each
against its fp32 file with the fine-tuned model's own thresholds: calibrated on the fine-tune's own
training images as the run does (`--lab`: the folder it read; which images trained, from the
run's metrics.json), on 32 images of the project's
training split, with minmax ranges, with the first and last convolutions in fp32, and with 8-bit
weights (as fast only with VNNI or AMX).

All but `base-rules` measure on the validation images of `--type` (never trained on by the shipped model).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellseg.cell_filter import FEATURES, CellFilter, cell_features  # noqa: E402
from cellseg.data import Sample, default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations  # noqa: E402
from cellseg.inference import Segmentation, predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_model_path  # noqa: E402
from cellseg.postprocess import maps_to_labels  # noqa: E402

KEYS = ("ap50", "ap75", "msa", "count_error")


def scores(samples: list[Sample], segmentations: list[Segmentation]) -> str:
    return scores_of(evaluate_segmentations(samples, segmentations))


def scores_of(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS)


def interpolate(fine_tuned: Path, base: Path, samples: list[Sample], alphas: list[float]) -> None:
    import onnx
    from onnx import numpy_helper

    base_weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(base)).graph.initializer}
    params = OnnxModel(base).default_params
    images = [s.image() for s in samples]
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in alphas:
            model = onnx.load(str(fine_tuned))
            for tensor in model.graph.initializer:
                tuned = numpy_helper.to_array(tensor)
                start = base_weights.get(tensor.name)
                if start is None or start.shape != tuned.shape or tuned.dtype.kind != "f":
                    raise SystemExit(f"{fine_tuned} and {base} are not the same architecture ({tensor.name})")
                blend = (alpha * tuned + (1 - alpha) * start).astype(tuned.dtype)
                tensor.CopyFrom(numpy_helper.from_array(blend, tensor.name))
            path = Path(tmp) / f"blend_{alpha}.onnx"
            onnx.save(model, str(path))
            maps = predict_maps(OnnxModel(path).predict, images)
            print(f"a = {alpha:.2f}: " + scores(samples, [Segmentation.from_maps(m, params) for m in maps]),
                  flush=True)


def offset(base: Path, samples: list[Sample], grow: list[int]) -> None:
    from skimage.segmentation import expand_labels

    model = OnnxModel(base)
    maps = predict_maps(model.predict, [s.image() for s in samples])
    labels = [maps_to_labels(m, model.default_params) for m in maps]
    ratios, ious, annotated, found = [], [], 0, 0
    for sample, predicted in zip(samples, labels):
        truth = sample.labels()
        annotated += len(np.unique(truth[truth > 0]))
        found += len(np.unique(predicted[predicted > 0]))
        for cell in np.unique(truth[truth > 0]):
            inside = truth == cell
            ids, counts = np.unique(predicted[inside], return_counts=True)
            if not (ids > 0).any():
                continue
            best = predicted == ids[ids > 0][np.argmax(counts[ids > 0])]
            iou = (inside & best).sum() / (inside | best).sum()
            if iou > 0.5:
                ratios.append(best.sum() / inside.sum())
                ious.append(iou)
    print(f"{found} cells predicted for {annotated} annotated; {len(ratios)} annotated cells "
          f"({len(ratios) / annotated:.0%}) matched at IoU > 0.5: median area ratio predicted/annotated "
          f"{np.median(ratios):.3f}, median IoU {np.median(ious):.3f}")
    for pixels in grow:
        grown = [Segmentation(expand_labels(lab, pixels) if pixels else lab, m) for lab, m in zip(labels, maps)]
        print(f"cells grown by {pixels} px: " + scores(samples, grown), flush=True)


def tta_and_thresholds(base: Path, samples: list[Sample], pool: list[Sample]) -> None:
    import itertools

    from cellseg.matching import mean_score_accuracy

    model = OnnxModel(base)
    params = model.default_params
    grid = [params.with_overrides(fg_threshold=fg, seed_threshold=seed, seed_peak=peak, seed_sigma=sigma, min_size=size)
            for fg, seed, peak, sigma, size in itertools.product((0.5, 0.6, 0.7), (0.2, 0.25, 0.3, 0.4),
                                                                 (0.0, 0.35, 0.5, 0.65), (1.0, 3.0), (20, 100, 300))]
    for tta in (False, True):
        msa = {}
        for name, group in (("train", pool), ("val", samples)):
            maps = predict_maps(model.predict, [s.image() for s in group], tta=tta)
            truths = [s.labels() for s in group]
            msa[name] = {p: float(np.mean([mean_score_accuracy(t, Segmentation.from_maps(m, p).labels)
                                          for t, m in zip(truths, maps)])) for p in [params, *grid]}
        picked = max(grid, key=lambda p: msa["train"][p])
        print(f"tta {tta}: the base's thresholds {msa['val'][params]:.4f}; picked on {len(pool)} training images "
              f"(fg {picked.fg_threshold}, seed {picked.seed_threshold}, peak {picked.seed_peak}, sigma "
              f"{picked.seed_sigma}, min_size {picked.min_size}) {msa['val'][picked]:.4f}; best on the validation "
              f"images themselves {max(msa['val'][p] for p in grid):.4f}", flush=True)


# The image's own pixels around and inside a cut cell (`base-rules --image-features`): whether
# annotators drew a cell might show in its phase-contrast halo and texture, which the maps smooth away.
IMAGE_FEATURES = ("image_mean", "image_std", "ring_image_mean", "ring_image_std", "contrast", "gradient_mean",
                  "ring_gradient_mean", "texture")


@dataclass(frozen=True)
class ImageCellFilter(CellFilter):
    """CellFilter's figures and IMAGE_FEATURES: a probe, not a rule a model can carry."""

    features: tuple[str, ...] = FEATURES + IMAGE_FEATURES
    FEATURES: ClassVar[tuple[str, ...]] = FEATURES + IMAGE_FEATURES


def image_features(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, len(IMAGE_FEATURES)) for cells 1..N of `labels` on the normalised `image`."""
    from scipy import ndimage as ndi

    from cellseg.cell_filter import RING_WIDTH, square_extreme

    count = int(labels.max())
    if count == 0:
        return np.zeros((0, len(IMAGE_FEATURES)))
    ids = np.arange(1, count + 1)
    grown = square_extreme(labels, 2 * RING_WIDTH + 1, np.maximum)
    ring = np.where((grown != labels) & (labels == 0), grown, 0)  # background pixels next to a cell
    gradient = ndi.gaussian_gradient_magnitude(image, 1.0)
    local = ndi.uniform_filter(image, 5)
    texture = np.sqrt(np.maximum(ndi.uniform_filter(image**2, 5) - local**2, 0))

    def mean(values, where):
        return np.nan_to_num(ndi.mean(values, where, ids))

    inside, around = mean(image, labels), mean(image, ring)
    return np.stack([inside, ndi.standard_deviation(image, labels, ids), around,
                     np.nan_to_num(ndi.standard_deviation(image, ring, ids)), inside - around,
                     mean(gradient, labels), mean(gradient, ring), mean(texture, labels)], axis=1)


def base_rules(base: Path, data: Path, per_type: int = 8, tta: bool = False, with_image: bool = False) -> None:
    """The shipped model's two rules fitted again from its thresholds alone and measured on validation;
    with `tta`, fitted and measured on test-time-augmented maps; `per_type`: tuning images per cell
    type; `with_image`: the filter also weighs IMAGE_FEATURES."""
    import warnings
    from dataclasses import replace

    from cellseg.data import subsample_per_type
    from cellseg.preprocess import normalize
    from train.cell_rules import fit_cell_filter, fit_cell_merge, without_cells

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # ndimage's means of empty rings
    model = OnnxModel(base)
    params = model.default_params.without_rules()  # refit from the thresholds alone
    train = subsample_per_type(load_split(data, "train"), per_type)
    val = load_split(data, "val")
    train_maps = predict_maps(model.predict, [s.image() for s in train], tta=tta)
    val_maps = predict_maps(model.predict, [s.image() for s in val], tta=tta)
    merge = fit_cell_merge(train, train_maps, params)
    merged = replace(params, cell_merge=merge.rule if merge.gain > 0 else None)
    print(f"fitted on {len(train)} training images (at most {per_type} per type{', TTA maps' if tta else ''}): "
          f"merge {merge.to_dict()}", flush=True)
    if with_image:
        def featurize(sample: Sample, labels: np.ndarray, maps: np.ndarray) -> np.ndarray:
            return np.concatenate([cell_features(labels, maps), image_features(labels, normalize(sample.image()))], 1)

        fit = fit_cell_filter(train, train_maps, merged, kind=ImageCellFilter, featurize=featurize)
        print(f"filter with the image's pixels {fit.to_dict()}", flush=True)
        cut = []
        for sample, maps in zip(val, val_maps):
            labels = maps_to_labels(maps, merged)
            cut.append(without_cells(labels, fit.rule.predict(featurize(sample, labels, maps)) < fit.rule.cutoff))
        print_validation("+ merge + filter with the image's pixels", val,
                         [Segmentation(labels, maps) for labels, maps in zip(cut, val_maps)])
    cell_filter = fit_cell_filter(train, train_maps, merged)
    both = replace(merged, cell_filter=cell_filter.rule if cell_filter.gain > 0 else None)
    print(f"filter {cell_filter.to_dict()}", flush=True)
    only_filter = replace(params, cell_filter=fit_cell_filter(train, train_maps, params).rule)
    for name, chosen in (("the base's thresholds", params), ("+ merge", merged), ("+ filter alone", only_filter),
                         ("+ merge + filter", both), ("the shipped rules", model.default_params)):
        print_validation(name, val, [Segmentation.from_maps(m, chosen) for m in val_maps])


def print_validation(name: str, val: list[Sample], segmentations: list[Segmentation]) -> None:
    result = evaluate_segmentations(val, segmentations, groups=("per_source", "per_cell_type"))
    groups = {**result["per_source"], **result["per_cell_type"]}
    print(f"{name}: {len(val)} validation images AP50 {result['ap50']:.3f} mSA {result['msa']:.3f} foreground "
          f"IoU {result['foreground_iou']:.3f} count error {result['count_error']:.3f} confluence error "
          f"{result['confluence_error']:.3f}; mSA / foreground IoU / confluence error "
          + ", ".join(f"{k} {v['msa']:.3f} / {v['foreground_iou']:.3f} / {v['confluence_error']:.3f}"
                      for k, v in groups.items()), flush=True)


def network_alone(models: list[Path], base: Path, samples: list[Sample]) -> None:
    """Each fine-tuned network against the base's with the same post-processing: its own, the base's
    thresholds without rules, and the base's rules (does training lose in the network or in the
    rules fitted to the base's maps?)."""
    base_params = OnnxModel(base).default_params
    for path in [base, *models]:
        model = OnnxModel(path)
        maps = predict_maps(model.predict, [s.image() for s in samples])
        for name, params in (("own post-processing", model.default_params),
                             ("base's thresholds, no rules", base_params.without_rules()),
                             ("base's thresholds and rules", base_params)):
            print(f"{path} with {name}: {scores(samples, [Segmentation.from_maps(m, params) for m in maps])}",
                  flush=True)


def int8_recipes(fine_tuned: Path, samples: list[Sample], data: Path, lab_folder: Path) -> None:
    import json

    from cellseg.imageio import read_image
    from export.int8 import Int8Recipe, calibration_arrays, calibration_images, evaluate_file, quantize, within_pixels

    params = OnnxModel(fine_tuned).default_params
    trained_on = json.loads((fine_tuned.parent / "metrics.json").read_text())["images"]  # "lab:<file name>"
    lab = within_pixels([read_image(lab_folder / name.split(":", 1)[1]) for name in trained_on])
    print(f"fp32: {scores_of(evaluate_file(fine_tuned, samples, params))}", flush=True)
    recipes = {"as the run makes it": (lab, Int8Recipe()), "32 training-split images": (None, Int8Recipe()),
               "minmax ranges": (lab, Int8Recipe(method="minmax")),
               "first and last convolutions fp32": (lab, Int8Recipe(keep_head_fp32=True)),
               "8-bit weights": (lab, Int8Recipe(reduce_range=False))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (images, recipe) in recipes.items():
            out = Path(tmp) / "model.int8.onnx"
            quantize(fine_tuned, out, calibration_arrays(images or calibration_images(data, 32)), recipe)
            print(f"int8, {name}: {scores_of(evaluate_file(out, samples, params))}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("interpolate", "offset", "tta", "base-rules", "int8", "network"))
    p.add_argument("fine_tuned", nargs="*", type=Path,
                   help="interpolate, int8: the fine-tuned model.onnx; network: one or more")
    p.add_argument("--base", type=Path, default=default_model_path())
    p.add_argument("--type", default="astro", help="cell type measured on (validation split)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--lab", type=Path, help="int8: the annotated folder the fine-tune read")
    p.add_argument("--per-type", type=int, default=8, help="base-rules: tuning images per cell type")
    p.add_argument("--tta", action="store_true", help="base-rules: fit and measure on test-time-augmented maps")
    p.add_argument("--image-features", action="store_true",
                   help="base-rules: also a filter that weighs the image's own pixels")
    args = p.parse_args(argv)
    samples = [s for s in load_split(args.data, "val") if s.cell_type == args.type]
    print(f"{len(samples)} validation {args.type} images")
    if args.probe in ("interpolate", "int8", "network") and not args.fine_tuned:
        p.error(f"{args.probe} needs the fine-tuned model.onnx")
    if args.probe in ("interpolate", "int8") and len(args.fine_tuned) > 1:
        p.error(f"{args.probe} takes one fine-tuned model.onnx")
    if args.probe == "int8" and args.lab is None:
        p.error("int8 needs --lab, the annotated folder the fine-tune read")
    if args.probe == "interpolate":
        interpolate(args.fine_tuned[0], args.base, samples, [0.0, 0.25, 0.5, 0.75, 1.0])
    elif args.probe == "int8":
        int8_recipes(args.fine_tuned[0], samples, args.data, args.lab)
    elif args.probe == "network":
        network_alone(args.fine_tuned, args.base, samples)
    elif args.probe == "offset":
        offset(args.base, samples, [0, 1, 2, 3, 4])
    elif args.probe == "base-rules":
        base_rules(args.base, args.data, args.per_type, args.tta, args.image_features)
    else:
        pool = [s for s in load_split(args.data, "train") if s.cell_type == args.type]
        pool = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))][:10]  # fewshot.py's draw
        tta_and_thresholds(args.base, samples, pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
