"""Adapt the model to a lab's own cells from a few annotated images.

    python -m train finetune ANNOTATED... --out DIR [--base MODEL] [--minutes N] [--name NAME]

ANNOTATED: image files or folders with their annotations in any format `cellseg.annotations` reads
(label masks `X_masks.png`, Fiji ROI sets `X_RoiSet.zip`, QuPath `X.geojson`, COCO json, the
LIVECell and Kaggle layouts). The run:

1. holds back part of the images (one in five, at least one, when there are three or more) and
   measures the base model on them: the "before";
2. trains the base weights on the rest, on the GPU when there is one, for what the wall-clock budget
   (`--minutes`, the whole run's) leaves after measuring and an estimate of steps 3-4; a checkpoint
   is written every minute, so `--resume` continues a stopped run within its budget;
3. keeps the base's post-processing thresholds unless another set wins on the training images by a
   margin and the held-back images confirm it; the sets tried include larger minimum cell sizes,
   from the smallest cells the lab annotated; then learns which cut cells the lab's annotators would
   draw, and which touching cells are one (`--cell-rules`, train/cell_rules.py); the lab's rule, or
   none, replaces the base's own (the shipped model has both) only where it beats it on the training
   images and the held-back images confirm it;
4. exports `DIR/model.onnx` (fp32, with the thresholds, whether it runs with test-time augmentation
   by default (`--tta`; without the flag, as the base does) and where it came from in its metadata) and
   `DIR/model.int8.onnx`, measures both on the held-back images (the "after") and writes
   `DIR/metrics.json` and `DIR/MODEL_CARD.md`.

`python -m export register --model DIR/model.onnx --name NAME` then puts it in the BentoML store, and
`cellseg segment --model DIR/model.onnx` runs it in batch jobs.

The run ends with its verdict (train/verdict.py): better, not better or can't tell. Exit status:
0 better or can't tell; 2 usage error (nothing trained); 4 an output could not be written (resume
with --resume); 5 not better than the base on the held-back images (register refuses it without --force).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cellseg.annotations import AnnotationError, scan_annotated  # noqa: E402
from cellseg.cli import bounded_number  # noqa: E402
from cellseg.data import Sample  # noqa: E402
from cellseg.evaluate import evaluate_segmentations, format_table  # noqa: E402
from cellseg.inference import Segmentation, predict_maps  # noqa: E402
from cellseg.onnx_model import OnnxModel, default_tta, read_metadata  # noqa: E402
from cellseg.postprocess import PostprocessParams  # noqa: E402
from cellseg.tuning import params_grid, rank_params  # noqa: E402
from cellseg.variants import choose_for_model  # noqa: E402
from export.int8 import calibration_arrays, quantize, record_verdict, within_pixels  # noqa: E402
from export.model_card import thresholds_only, write_finetune_card  # noqa: E402
from export.onnx_export import export_checked, finetune_metadata, write_exported  # noqa: E402
from export.register import check_name  # noqa: E402
from train.cell_rules import FILTER_CUTOFFS, MERGE_CUTOFFS, RuleFit, fit_cell_filter, fit_cell_merge, mean_msa  # noqa: E402
from train.dataset import CropDataset  # noqa: E402
from train.loop import freeze_encoder, lr_factor, save_checkpoint, torch_predictor, train_step  # noqa: E402
from train.model import load_weights, weights_architecture  # noqa: E402
from train.speed import ThreadChooser, choose_precision, describe_device, to_layout  # noqa: E402
from train.verdict import judge  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE = REPO / "models" / "livecell-unet.safetensors"
CHECKPOINT = "finetune.pt"
EXIT_WRITE_FAILED = 4  # as `cellseg segment`: an output could not be written
SUMMARY_KEYS = ("ap50", "ap75", "msa", "foreground_iou", "count_error")
# Thresholds tried on the training images: the two that decide what is a cell and where one cell ends
# (foreground, seed), and the hysteresis peak that stops thin processes seeding cells of their own.
THRESHOLD_GRID = {"fg_threshold": (0.5, 0.6, 0.7), "seed_threshold": (0.2, 0.3, 0.4, 0.5), "seed_peak": (0.0, 0.35, 0.5)}


# A threshold change must win on the training images by this much (selection score: mean of AP50 and
# mSA) and not lose on the held-back ones: 8 images reward noise otherwise (issue 29 saw the re-pick
# switch off seed_peak and lose on unseen astrocytes).
THRESHOLD_MARGIN = 0.01
# The threshold search may take at most this share of the budget: on dense SH-SY5Y images one
# candidate costs about half a second per image (watershed + COCO scoring), and the whole grid on 8
# images took 157 s of a 5-minute run. Candidates nearest the base's are tried first.
THRESHOLD_SEARCH_SHARE = 0.15


class FinetuneError(ValueError):
    """The run cannot start: no image left to train on, no base weights, or no checkpoint to resume."""


MAX_MINUTES = 7 * 24 * 60  # a week: beyond it a number is a typo, not a budget


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotated", nargs="+", type=Path, metavar="ANNOTATED",
                   help="annotated images: files or folders (label masks, Fiji ROI sets, QuPath GeoJSON, COCO)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the model, its metrics and card: new or empty (or --overwrite, or --resume)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its files")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE,
                   help="weights to start from (.safetensors; default: the shipped model's)")
    p.add_argument("--minutes", type=bounded_number(float, 0.05, MAX_MINUTES), default=10.0,
                   help="wall-clock budget of the whole run: measuring, training, export, int8 (default 10)")
    p.add_argument("--name", default="cellseg-finetuned", help="model name (metadata, model store, page)")
    p.add_argument("--hold-out", type=bounded_number(int, 0), default=None,
                   help="images held back to measure before/after (default: one in five, at least one when "
                        "there are three or more images, none below three)")
    p.add_argument("--measure-on", nargs="+", type=Path, metavar="ANNOTATED", default=None,
                   help="annotated images kept for measuring only (e.g. another plate or day than the training "
                        "images: a fairer before/after); then every ANNOTATED image trains and --hold-out is unused")
    p.add_argument("--crop", type=bounded_number(int, 32, 2048), default=256, help="side of the training crops, px (default 256)")
    p.add_argument("--batch-size", type=bounded_number(int, 1, 512), default=8, help="crops per training step (default 8)")
    p.add_argument("--lr", type=bounded_number(float, 1e-7, 1.0), default=3e-4, help="peak learning rate (a third of training's)")
    p.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="train only the decoder and head: faster steps, the encoder's features kept")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-train keeps the base's network weights and only picks thresholds and the cell "
                        "rules for these images: a minute or two instead of a fine-tune. For cells the base already "
                        "knows, training did not carry to other plates (unseen astrocytes mSA 0.127 -> 0.102 in 15 "
                        "minutes) and --no-train kept the shipped model's own thresholds and rules (docs/METRICS.md, "
                        "issue 29)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="the model runs with test-time augmentation by default (4 mirrorings averaged: about 4x "
                        "the network time) and its thresholds and cell rules are picked on such maps; the "
                        "after-measurement uses it too. Default: as the base runs (the shipped model: off). The "
                        "base's thresholds and cell rules were fitted on its own kind of maps: with the shipped "
                        "model's rules, TTA lowered unseen astrocytes in all three settings measured, while it "
                        "lifted them before the base had rules (docs/METRICS.md, issue 29)")
    p.add_argument("--cell-rules", action=argparse.BooleanOptionalAction, default=True,
                   help="learn from these images which touching cells are one (merged) and which cut cells their "
                        "annotators would draw at all (the others dropped): logistic regressions over the maps and "
                        "shapes, each kept only where it beats the base's own rule (the shipped model has both) on "
                        "the training images, each image cut by a rule fitted on the others, and the held-back "
                        "images confirm it; no rule at all is a candidate too, where the base has one; "
                        "--no-cell-rules keeps the base's (docs/METRICS.md, issue 29)")
    p.add_argument("--replay", nargs="+", type=Path, metavar="ANNOTATED",
                   help="annotated images of what the base already knows (e.g. its own training data), mixed "
                        "into the training crops only (never held back, measured or used for thresholds and "
                        "rules), so that training does not forget them (docs/METRICS.md)")
    p.add_argument("--replay-share", type=bounded_number(float, 0.01, 0.99), default=0.5,
                   help="share of the training crops drawn from --replay images (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-back draw, the crops and the weights' init (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to train on (default: cuda where there is one, else cpu)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="training arithmetic; auto: bf16 where the device does it natively (AVX-512 bf16, AMX, "
                        "a GPU), else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW layout (channels_last with bf16 is about 2x faster on CPUs, docs/BENCHMARKS.md)")
    p.add_argument("--threads", type=bounded_number(int, 1, 1024), default=max(1, os.cpu_count() or 1),
                   help="CPU threads for training at most (default: every core; every 2 minutes it also tries "
                        "fewer and keeps the fastest)")
    p.add_argument("--resume", action="store_true", help=f"continue from DIR/{CHECKPOINT} within its budget")
    return p.parse_args(argv)


class Budget:
    """The run's wall-clock budget (`--minutes`), counted from the command's start: measuring,
    training, threshold choice, export, int8 and the after-measurements all spend it."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.spent()


@dataclass(frozen=True)
class Costs:
    """Seconds per image measured on the "before": the network, and one post-processing candidate
    (watershed + scoring), which the later steps repeat."""
    network: float
    candidate: float


def reserve_after_training(costs: Costs, train_images: int, measured_images: int, candidates: int,
                           calibration: int, tta: bool = False, cell_rules: bool = False) -> float:
    """Seconds to keep for what follows training: the network on the training images, the candidates
    tried on them, fp32 and int8 on the held-back images (confirmation and "after": network and one
    candidate each), int8 calibration (about one and a half network passes per `calibration` image),
    10 s for export and the checks, and a quarter for safety. The final minutes are reported as
    measured (`phases_seconds` in metrics.json). With `tta` every network pass but calibration's is four.
    The cell rules (`cell_rules`: merge, then filter) cut the training images once more each and score
    each per cutoff, and the held-back ones twice each."""
    passes = 4 if tta else 1
    network = costs.network * (passes * (train_images + 3 * measured_images) + 1.5 * calibration)
    rule_candidates = (2 + len(MERGE_CUTOFFS) + len(FILTER_CUTOFFS)) if cell_rules else 0
    scoring = costs.candidate * (train_images * (candidates + rule_candidates)
                                 + (3 + 4 * bool(cell_rules)) * measured_images)
    return 1.25 * (10.0 + network + scoring)


def affordable_candidates(base: PostprocessParams, costs: Costs, train_images: int, budget_seconds: float,
                          min_sizes: tuple[int, ...] = (), share: float = THRESHOLD_SEARCH_SHARE
                          ) -> list[PostprocessParams]:
    """The threshold candidates the budget affords (`share` of it), nearest the base's first; the
    base's own always."""
    allowed = int(share * budget_seconds / max(costs.candidate * train_images, 1e-6))
    return threshold_candidates(base, min_sizes)[: max(1, allowed)]


# Minimum cell sizes tried beside the base's: these percentiles of the areas of the cells the lab
# annotated. Debris and fragments of a cell are smaller than nearly every cell a person outlines; on
# astrocytes (median 675 px) the base's 20 px kept fragments of split cells that 100-300 px removes
# (issue 29 notes), while on small cells the percentiles stay near the base's.
MIN_SIZE_PERCENTILES = (1, 5)


def annotated_min_sizes(labels: list[np.ndarray], base: int) -> tuple[int, ...]:
    """Candidate minimum sizes from the annotated cells' areas: those above the base's, rounded."""
    areas = np.concatenate([np.bincount(lab.ravel())[1:] for lab in labels] or [np.zeros(0)])
    areas = areas[areas > 0]
    if areas.size == 0:
        return ()
    values = {int(round(float(np.percentile(areas, q)))) for q in MIN_SIZE_PERCENTILES}
    return tuple(sorted(v for v in values if v > base))


@dataclass
class Split:
    train: list[Sample]
    held_back: list[Sample]

    @property
    def measured_on(self) -> list[Sample]:
        """Where before/after is measured: the held-back images, or the training ones when none is."""
        return self.held_back or self.train


def check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an --out that would overwrite what the run must not: the project's shipped models/, a
    folder of the annotated inputs (or one holding them), or a non-empty folder without --overwrite."""
    out = out.resolve()
    if out == (REPO / "models").resolve():
        raise FinetuneError(f"--out {out} is the project's shipped models/ folder: give a folder of your own, "
                            "e.g. runs/my-lab")
    for given in inputs:
        folder = given.resolve() if given.is_dir() else given.resolve().parent
        if out == folder or folder.is_relative_to(out):
            raise FinetuneError(f"--out {out} holds the annotated images ({given}): give another folder")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"--out {out} is not empty: give a new folder, --overwrite to replace its files, or "
                            "--resume to continue the run in it")


def split_held_back(samples: list[Sample], seed: int, hold_out: int | None = None) -> Split:
    """A seeded choice of images held back from training to measure the result on."""
    count = hold_out if hold_out is not None else (max(1, len(samples) // 5) if len(samples) >= 3 else 0)
    if count >= len(samples):
        raise FinetuneError(f"--hold-out {count} leaves no image to train on ({len(samples)} images)")
    order = np.random.default_rng(seed).permutation(len(samples))
    held = sorted(int(i) for i in order[:count])
    return Split([s for i, s in enumerate(samples) if i not in held], [samples[i] for i in held])


def same_files(samples: list[Sample]) -> dict[str, Sample]:
    """Samples by their image file's content: a copy of an image in another folder is the same image."""
    return {hashlib.sha256(s.image_path.read_bytes()).hexdigest(): s for s in samples}


def measure_on_given(train: list[Sample], measured: list[Sample]) -> Split:
    """Every given image trains; `measured` (--measure-on) are held back, refused where they are the
    same images as training ones, copies included (a before/after on training images would flatter
    the result)."""
    trained = same_files(train)
    shared = [s.id for key, s in same_files(measured).items() if key in trained]
    if shared:
        raise FinetuneError(f"--measure-on repeats {len(shared)} training image(s) ({', '.join(shared[:3])}): "
                            "give images that are not among ANNOTATED")
    return Split(list(train), list(measured))


def replay_apart(replay: list[Sample], split: Split) -> list[Sample]:
    """--replay's images, refused where they are the lab's own (copies included): a held-back (or
    --measure-on) image replayed in training would flatter its after-figures, and a training image
    would only weigh twice."""
    lab = {key: "held back" for key in same_files(split.held_back)}
    lab.update({key: "training" for key in same_files(split.train)})
    shared = [f"{s.id} ({lab[key]})" for key, s in same_files(replay).items() if key in lab]
    if shared:
        raise FinetuneError(f"--replay repeats {len(shared)} of the images fine-tuned or measured on "
                            f"({', '.join(shared[:3])}): replay images of what the base already knows, not your own")
    return replay


def base_postprocess(base: Path) -> PostprocessParams:
    """The base model's post-processing defaults: from the ONNX file beside its weights, if any."""
    onnx_file = base.with_suffix(".onnx")
    stored = read_metadata(onnx_file).get("postprocess") if onnx_file.is_file() else None
    return PostprocessParams(**stored) if stored else PostprocessParams()


def summary(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 4) for k in SUMMARY_KEYS if k in metrics}


def replay_weights(lab_images: int, replay_images: int, share: float) -> np.ndarray | None:
    """Sampling weights over the lab's images then the replayed ones: each lab image equally, each
    replayed image equally, the replayed ones `share` of all crops (None without any: uniform)."""
    if not replay_images:
        return None
    return np.r_[np.full(lab_images, (1 - share) / lab_images), np.full(replay_images, share / replay_images)]


def train_for_budget(model: torch.nn.Module, images: list[np.ndarray], labels: list[np.ndarray],
                     args: argparse.Namespace, out: Path, seconds: float,
                     replay: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])) -> dict:
    """Train on the (raw image, label image) pairs for `seconds` of wall clock (crops drawn and steps
    made: both are training time), at least one step, checkpointing every minute. `replay`: more
    pairs, drawn for `args.replay_share` of the crops. Returns the state."""
    precision = choose_precision(args.precision, args.device)
    model = to_layout(model.to(args.device), args.channels_last)
    model.train()
    trained = freeze_encoder(model) if args.freeze_encoder else list(model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-4)
    state = {"step": 0, "train_seconds": 0.0, "loss": None, "budget_seconds": seconds}
    checkpoint_path = out / CHECKPOINT
    if args.resume:
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        state.setdefault("budget_seconds", seconds)  # the first run's training share stays the budget
        print(f"resumed at step {state['step']}, {state['train_seconds'] / 60:.1f} of "
              f"{state['budget_seconds'] / 60:.1f} training minutes spent")

    def save() -> None:
        save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state})

    budget = state["budget_seconds"]
    warmup = 20
    # total and updates in the same float seconds: a rounded total let the bar pass it ("101%", TqdmWarning)
    bar = tqdm(total=budget, initial=min(state["train_seconds"], budget), unit="s",
               desc="fine-tuning", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}",
               mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    last_saved = time.monotonic()
    # on a CPU other work may share, the thread count that steps fastest now (train/speed.py)
    threads = ThreadChooser(args.threads) if args.device == "cpu" else None
    # 50 steps per round of fresh crops: a seed per round keeps a resumed run on the same sequence. The
    # dataset (images normalised once) is built once; it reads its seed, set below, as each crop is drawn.
    dataset = CropDataset(images + replay[0], labels + replay[1], args.crop, 50 * args.batch_size, seed=0,
                          weights=replay_weights(len(images), len(replay[0]), args.replay_share))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=0, drop_last=True)
    while state["train_seconds"] < budget or state["step"] == 0:
        dataset.seed = args.seed * 100_003 + state["step"]
        started = time.monotonic()
        for batch, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(state["step"], 0, warmup, state["train_seconds"] / budget if budget else 1.0)
            if threads:
                threads.before_step(state["step"], state["train_seconds"])
            losses = train_step(model, optimizer, batch, targets, args.device, precision, args.channels_last)
            loss = losses["total"].item()
            state["loss"] = loss if state["loss"] is None else 0.9 * state["loss"] + 0.1 * loss
            state["step"] += 1
            spent, started = time.monotonic() - started, time.monotonic()  # the crops' time included
            state["train_seconds"] += spent
            if threads:
                threads.after_step(spent, state["step"], state["train_seconds"])
                state["threads"] = threads.history
            bar.update(max(0.0, min(spent, budget - bar.n)))
            bar.set_postfix_str(f"step {state['step']}, loss {state['loss']:.3f}, "
                                f"{max(0.0, budget - state['train_seconds']) / 60:.1f} min left", refresh=False)
            if state["train_seconds"] >= budget:
                break
            if time.monotonic() - last_saved > 60:
                save()
                last_saved = time.monotonic()
    bar.close()
    save()  # the budget's end: saved once, here
    model.eval()
    return state


@dataclass
class ThresholdChoice:
    params: PostprocessParams
    changed: bool
    reason: str
    candidates: list[dict]  # the best five on the training images, and the base's row

    def to_dict(self) -> dict:
        return {"changed": self.changed, "reason": self.reason, "postprocess": self.params.to_dict()}


def threshold_candidates(base: PostprocessParams, min_sizes: tuple[int, ...] = ()) -> list[PostprocessParams]:
    """The grid's combinations (with each of `min_sizes` beside the base's minimum size), the base's
    own thresholds first (always a candidate), then the nearest to them first (the sum of each
    threshold's change, and 0.01 per step of minimum size), so a shortened search tries the small
    changes."""
    sizes = (base.min_size, *sorted(set(min_sizes) - {base.min_size}))

    def distance(params: PostprocessParams) -> float:
        return (sum(abs(getattr(params, name) - getattr(base, name)) for name in THRESHOLD_GRID)
                + 0.01 * sizes.index(params.min_size))

    # the base's thresholds with each other minimum size are candidates too (the grid may not hold them)
    grid = params_grid(base, **THRESHOLD_GRID, min_size=sizes) + [base.with_overrides(min_size=v) for v in sizes[1:]]
    return [base] + sorted(dict.fromkeys(p for p in grid if p != base), key=distance)


def threshold_decision(margin: float, train_images: int, held_msa: dict[str, float] | None) -> tuple[bool, str]:
    """Whether to change to the best candidate, and why: its selection-score `margin` over the base's
    thresholds on the training images, and mean mSA of "best" and "base" on the held-back images
    (None: none held back, or not measured because the margin already failed)."""
    if margin < THRESHOLD_MARGIN:
        return False, (f"kept the base's: no candidate beat them on the {train_images} training images by "
                       f"{THRESHOLD_MARGIN} (best {margin:+.3f})")
    if held_msa is None:  # nothing to confirm a change with: one or two images reward their own noise
        return False, f"kept the base's: {margin:+.3f} on the training images, but no held-back image to confirm it"
    if held_msa["best"] < held_msa["base"]:
        return False, (f"kept the base's: {margin:+.3f} on the training images, but the held-back images did not "
                       f"confirm it (mSA {held_msa['best']:.3f} vs {held_msa['base']:.3f} with the base's)")
    return True, (f"{margin:+.3f} over the base's on the training images, confirmed on the held-back images "
                  f"(mSA {held_msa['best']:.3f} vs {held_msa['base']:.3f})")


def pick_thresholds(split: Split, train_maps: list[np.ndarray], held_maps: list[np.ndarray] | None,
                    base: PostprocessParams, candidates: list[PostprocessParams],
                    total: int | None = None, seconds: float | None = None) -> ThresholdChoice:
    """The base's thresholds, unless another candidate beats them on the training images by
    THRESHOLD_MARGIN and the held-back images confirm it (not lower mSA there); with none held back
    (fewer than three images, `held_maps` None) nothing can confirm a change, so the base's stay.
    The maps are the ones the model will serve (with TTA where it runs with it). `total`: the
    candidates there were before the budget's cut (for the reason's wording); `seconds`: the search's
    share of the budget, which stops it where the candidates cost more than estimated (the base's,
    first, is always tried)."""
    ranked = rank_params(split.train, train_maps, candidates, progress=True, seconds=seconds)
    best, best_row = ranked[0]
    base_row = next(row for params, row in ranked if params == base)
    shown = [row for _, row in ranked[:5]] + ([] if any(p == base for p, _ in ranked[:5]) else [base_row])
    margin = 0.0 if best == base else best_row["score"] - base_row["score"]
    held_msa = None
    if margin >= THRESHOLD_MARGIN and held_maps is not None:
        held_msa = {name: mean_msa(split.held_back, held_maps, params) for name, params in (("best", best), ("base", base))}
    changed, reason = threshold_decision(margin, len(split.train), held_msa)
    total = total or len(candidates)
    if len(ranked) < total:
        reason += f" ({len(ranked)} of {total} candidates tried, nearest the base's first: the budget's share)"
    return ThresholdChoice(best if changed else base, changed, reason, shown)


@dataclass
class RuleChoice:
    params: PostprocessParams  # the parameters so far, with the rule where it is kept
    kept: bool
    reason: str
    fit: dict  # train.cell_rules.RuleFit.to_dict(), and the held-back figures where measured

    def to_dict(self) -> dict:
        return {**self.fit, "kept": self.kept, "reason": self.reason}


RULE_NAMES = {"cell_merge": ("cell merge", "touching cells merged where P(one cell) >= {cutoff}"),
              "cell_filter": ("cell filter", "cells under P(annotated) {cutoff} dropped")}


def pick_rule(field: str, fit: RuleFit, split: Split, held_maps: list[np.ndarray] | None,
              params: PostprocessParams) -> RuleChoice:
    """`params` with the rule of kind `field` (cell_merge or cell_filter) changed where a candidate
    beats the rule there is (the base's own, or none) on the training images and the held-back images
    confirm it (not lower mSA). Candidates: the rule fitted on the lab's images (its leave-one-image-out
    mSA: every image cut by a rule that never saw it) and, where the base carries a rule, none (the
    base's rule never saw these images either). No margin is asked: on 4-8 astrocyte images the
    estimates were +0.002..+0.012, the thresholds' 0.01 kept the filter nowhere, and without it merge
    and filter lifted unseen astrocytes in all three settings measured (docs/metrics_notes.md, issue 29).
    Dropping the base's rule is for a lab whose cells the general rule harms; in the settings measured
    it never won (docs/metrics_notes.md)."""
    name, what = RULE_NAMES[field]
    figures = fit.to_dict()
    has_base = getattr(params, field) is not None  # a base may carry rules of its own
    current = "the base's" if has_base else "none"
    not_kept = f"{name} not kept" + (" (the base's stays)" if has_base else "")
    lab_gain = fit.gain if fit.rule is not None else None
    drop_gain = fit.gain_without_base
    if (lab_gain is None or lab_gain <= 0) and (drop_gain is None or drop_gain <= 0):
        why = fit.reason if fit.rule is None else (f"it did not beat {current} on the {len(split.train)} training "
                                                   "images, each cut by a rule fitted on the others")
        if drop_gain is not None:
            why += f"; without any {name}: {drop_gain:+.3f}"
        return RuleChoice(params, False, f"{not_kept}: {why}", figures)
    dropping = lab_gain is None or (drop_gain is not None and drop_gain > lab_gain)
    gain = drop_gain if dropping else lab_gain
    candidate = f"no {name}" if dropping else name
    if held_maps is None:
        return RuleChoice(params, False, f"{not_kept}: {candidate} gained mSA {gain:+.3f} on the training images, "
                          "but no held-back image confirms it", figures)
    changed = replace(params, **{field: None if dropping else fit.rule})
    held = {k: mean_msa(split.held_back, held_maps, p) for k, p in (("with", changed), ("without", params))}
    figures["held_back_msa"] = {k: round(v, 4) for k, v in held.items()}
    figures["candidate"] = "none" if dropping else "lab's"
    if held["with"] < held["without"]:
        return RuleChoice(params, False, f"{not_kept}: {candidate} gained mSA {gain:+.3f} on the training images, but "
                          f"the held-back images did not confirm it (mSA {held['with']:.3f} vs {held['without']:.3f} "
                          f"with {current})", figures)
    confirmed = f"confirmed on the held-back images (mSA {held['with']:.3f} vs {held['without']:.3f} with {current})"
    if dropping:
        return RuleChoice(changed, False, f"the base's {name} dropped: mSA {gain:+.3f} without it on the training "
                          f"images, {confirmed}", figures)
    return RuleChoice(changed, True, f"{name} kept ({what.format(cutoff=fit.rule.cutoff)}): mSA {gain:+.3f} on the "
                      f"training images, each cut by a rule fitted on the others, {confirmed}", figures)


def pick_cell_rules(split: Split, train_maps: list[np.ndarray], held_maps: list[np.ndarray] | None,
                    params: PostprocessParams) -> tuple[PostprocessParams, dict[str, RuleChoice]]:
    """The merge rule first (the filter then judges the merged cells), each kept on its own merits."""
    merge = pick_rule("cell_merge", fit_cell_merge(split.train, train_maps, params), split, held_maps, params)
    cell_filter = pick_rule("cell_filter", fit_cell_filter(split.train, train_maps, merge.params), split, held_maps,
                            merge.params)
    return cell_filter.params, {"cell_merge": merge, "cell_filter": cell_filter}


def export_models(model, out: Path, metadata: dict, train_images: list[np.ndarray],
                  measured_images: list[np.ndarray]) -> tuple[Path, Path, float]:
    fp32 = out / "model.onnx"
    _, diff = export_checked(model.cpu(), fp32, 18, measured_images[:2])
    write_exported(model, fp32, metadata, diff)
    int8 = out / "model.int8.onnx"
    # calibrated on the user's training images, as many as the calibrator's memory allows
    quantize(fp32, int8, calibration_arrays(within_pixels(train_images)))
    return fp32, int8, diff


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.minutes)  # from the command's start: scanning and decoding count too
    command = "python -m train finetune " + " ".join(sys.argv[2:] if argv is None else argv)
    try:
        check_name(args.name)  # what `export register --name` will ask of it: refused now, not after the run
        scan = scan_annotated(args.annotated)  # FileNotFoundError when nothing annotated is found
        print(scan.summary(), flush=True)
        samples = scan.samples
        if args.measure_on:
            if args.hold_out is not None:
                raise FinetuneError("give --measure-on or --hold-out, not both")
            measured = scan_annotated(args.measure_on)
            print(f"measured on: {measured.summary()}", flush=True)
            split = measure_on_given(samples, measured.samples)
        else:
            split = split_held_back(samples, args.seed, args.hold_out)
        replay = []
        if args.replay:
            replay = replay_apart(scan_annotated(args.replay).samples, split)
            print(f"replayed in training, {args.replay_share:.0%} of the crops: {len(replay)} images", flush=True)
        if args.resume and not (args.out / CHECKPOINT).is_file():
            raise FinetuneError(f"--resume: no {CHECKPOINT} in {args.out}")
        check_out(args.out, [*args.annotated, *(args.measure_on or []), *(args.replay or [])],
                  args.overwrite or args.resume)
        if not args.base.is_file():
            raise FinetuneError(f"base weights not found: {args.base}")
        if args.tta is None:  # the kind of maps the base's own thresholds and rules were picked on
            onnx_file = args.base.with_suffix(".onnx")
            args.tta = onnx_file.is_file() and default_tta(read_metadata(onnx_file))
    except (FinetuneError, AnnotationError, OSError, ValueError) as exc:
        print(f"python -m train finetune: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        return run(args, command, samples, split, budget, replay)
    except OSError as exc:  # a full disk, a read-only folder: one line; the last checkpoint stays for --resume
        print(f"python -m train finetune: error: could not write {exc.filename or args.out}: "
              f"{exc.strerror or exc}; fix it and run the same command with --resume", file=sys.stderr)
        return EXIT_WRITE_FAILED


def machine_load_note(threads: int) -> str:
    """Where other work shared the CPU during training (1-minute load average beyond this run's own
    threads), a note for the verdict: its steps/minute are then not what this machine can do."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return ""
    cores = os.cpu_count() or 1
    others = load - min(threads, cores)
    if others < 0.5 * cores:
        return ""
    return (f"other work shared the CPU while it trained (load {load:.1f} on {cores} cores): fewer steps than "
            "this machine makes idle")


def run(args: argparse.Namespace, command: str, samples: list[Sample], split: Split, budget: Budget,
        replay: Sequence[Sample] = ()) -> int:
    """Measure, train, pick thresholds, export and measure again (the module's steps 1-4), all within
    the budget: training gets what measuring leaves, less what the steps after it are estimated to take."""
    print(f"{len(samples)} annotated images: training on {len(split.train)}, measuring on "
          f"{len(split.held_back)} held back{'' if split.held_back else ' (none: measured on the training images)'}; "
          f"{args.minutes} minutes in all on {describe_device(args.device)}", flush=True)
    phases: dict[str, float] = {}

    def phase_done(name: str, since: float) -> float:
        phases[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    mark = time.monotonic()
    base_params = base_postprocess(args.base)
    measured = split.measured_on
    train_images = [s.image() for s in split.train]  # decoded once for training, thresholds, calibration...
    measured_images = [s.image() for s in split.held_back] or train_images  # ... and measuring (split.measured_on)
    model = load_weights(args.base)
    network_started = time.monotonic()  # the network alone: decoding and loading above are done once
    maps = predict_maps(torch_predictor(model, "cpu"), measured_images)
    network_seconds = time.monotonic() - network_started
    scoring_started = time.monotonic()
    before = evaluate_segmentations(measured, [Segmentation.from_maps(m, base_params) for m in maps])
    print("before (base model, its thresholds):\n" + format_table(before), flush=True)
    scoring_seconds = time.monotonic() - scoring_started
    mark = phase_done("before", mark)
    costs = Costs(network_seconds / len(measured), scoring_seconds / len(measured))
    min_sizes = annotated_min_sizes([s.labels() for s in split.train], base_params.min_size)
    # without training the search may take most of the budget: nothing else needs it
    search_share = THRESHOLD_SEARCH_SHARE if args.train else 0.6
    candidates = affordable_candidates(base_params, costs, len(split.train), budget.seconds, min_sizes, search_share)
    load_note = ""
    if args.train:
        reserve = reserve_after_training(costs, len(split.train), len(split.held_back), len(candidates),
                                         len(within_pixels(train_images)),  # the images export_models calibrates on
                                         args.tta, args.cell_rules)
        train_seconds = max(0.0, budget.left() - reserve)
        print(f"training for {train_seconds / 60:.1f} of the {args.minutes} minutes ({reserve / 60:.1f} kept for "
              "thresholds, export, int8 and measuring)", flush=True)
        state = train_for_budget(model, train_images, [s.labels() for s in split.train], args, args.out, train_seconds,
                                 ([s.image() for s in replay], [s.labels() for s in replay]))
        load_note = machine_load_note(args.threads)  # about the training: none to speak of without it
    else:
        print("no training (--no-train): the base's network, with thresholds picked for these images", flush=True)
        model.eval()
        state = {"step": 0, "train_seconds": 0.0, "loss": None, "budget_seconds": 0.0}
    mark = phase_done("training", mark)
    predictor = torch_predictor(model, args.device)  # the maps the model will serve: with TTA where it runs so
    train_maps = predict_maps(predictor, train_images, tta=args.tta)
    held_maps = predict_maps(predictor, measured_images, tta=args.tta) if split.held_back else None
    choice = pick_thresholds(split, train_maps, held_maps, base_params, candidates,
                             len(threshold_candidates(base_params, min_sizes)), search_share * budget.seconds)
    params = choice.params
    print(f"thresholds: {choice.reason}: {thresholds_only(params.to_dict())}", flush=True)
    mark = phase_done("thresholds", mark)
    rules: dict[str, RuleChoice] = {}
    if args.cell_rules:
        params, rules = pick_cell_rules(split, train_maps, held_maps, params)
        for choice_ in rules.values():
            print(f"cells: {choice_.reason}", flush=True)
        mark = phase_done("cell_rules", mark)
    model = model.cpu().float()
    steps_per_minute = state["step"] / max(state["train_seconds"] / 60, 1e-9)
    metadata = finetune_metadata(
        name=args.name, base=args.base, postprocess=params.to_dict(), architecture=weights_architecture(args.base),
        images=[s.id for s in split.train], held_back=[s.id for s in split.held_back], tta=args.tta,
        training={"minutes": args.minutes, "train_minutes": round(state["train_seconds"] / 60, 2),
                  "steps": state["step"], "steps_per_minute": round(steps_per_minute, 1),
                  "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
                  "freeze_encoder": args.freeze_encoder, "trained": args.train,
                  "replay": {"images": [s.id for s in replay], "share": args.replay_share} if replay else None,
                  "thread_probes": state.get("threads", []),
                  "seed": args.seed, "device": describe_device(args.device),
                  "precision": choose_precision(args.precision, args.device), "command": command})
    fp32, int8, diff = export_models(model, args.out, metadata, train_images, measured_images)
    mark = phase_done("export_int8", mark)
    after = {name: evaluate_segmentations(measured, OnnxModel(path).segment(measured_images, params))  # its TTA default
             for name, path in (("fp32", fp32), ("int8", int8))}
    kind = "fine-tuned" if args.train else "the base's network, post-processing picked for these images"
    print(f"after ({kind}, fp32):\n" + format_table(after["fp32"]), flush=True)
    mark = phase_done("after", mark)
    results = {
        "name": args.name, "base": str(args.base), "base_sha256": metadata["finetune"]["base_sha256"],
        "measured_on": "held_back" if split.held_back else "training images (fewer than 3 images: none held back)",
        "images": metadata["finetune"]["images"], "held_back": metadata["finetune"]["held_back"],
        "before": summary(before), "after": {k: summary(v) for k, v in after.items()},
        "int8_loss": {k: round(after["fp32"][k] - after["int8"][k], 4) for k in ("ap50", "msa")},
        "postprocess": params.to_dict(), "base_postprocess": base_params.to_dict(),
        "thresholds": choice.to_dict(), "threshold_candidates": choice.candidates, "tta": args.tta,
        **{field: rules[field].to_dict() if field in rules else {"kept": False, "reason": "not fitted (--no-cell-rules)"}
           for field in RULE_NAMES},
        "training": metadata["training"], "parity_max_abs_diff": diff,
        "command": command,
    }
    verdict = judge(before["per_image"], after["fp32"]["per_image"], bool(split.held_back),
                    state["step"] if args.train else None,
                    note=load_note, same_source=not args.measure_on)
    results["verdict"] = verdict.to_dict()
    record_verdict(fp32, int8, results["verdict"])  # in the files themselves: a copied model carries it
    # what `python -m export register` and batch jobs read to pick the precision to serve
    for path, metrics in ((fp32, after["fp32"]), (int8, after["int8"])):
        path.with_suffix(".metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k != "per_image"}, indent=2))
    # int8's figures above come from this CPU; whether int8 may answer here at all is the runtime's check
    here = choose_for_model(fp32)
    results["precision_here"] = here.to_dict()
    print(f"on this CPU: {here.precision} would answer ({here.reason})", flush=True)
    phase_done("precision_check", mark)
    results["phases_seconds"] = phases
    results["minutes_total"] = round(budget.spent() / 60, 1)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_finetune_card(args.out / "MODEL_CARD.md", results, fp32, int8)
    over = f", {-budget.left() / 60:.1f} min over its budget" if budget.left() < 0 else ""
    print(f"wrote {fp32}, {int8}, {args.out / 'metrics.json'}, {args.out / 'MODEL_CARD.md'} "
          f"in {results['minutes_total']} min{over}; {state['step']} training step{'s' if state['step'] != 1 else ''} "
          f"({steps_per_minute:.0f}/min); register with: "
          f"python -m export register --model {fp32} --name {args.name}", flush=True)
    print(verdict.line(), flush=True)  # the last word: better, not better (exit 5) or can't tell
    return verdict.exit_status
