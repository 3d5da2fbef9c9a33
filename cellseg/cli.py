"""The `cellseg` command: `cellseg evaluate ...`, `cellseg segment ...` and `cellseg track ...` (also
`python -m cellseg`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.data import default_data_root
from cellseg.onnx_model import default_model_path, resolve_tta
from cellseg.pixelsize import SOURCE_GIVEN_CLI, PixelSize, parse_pixel_size
from cellseg.postprocess import PostprocessParams
from cellseg.precision import PRECISIONS
from cellseg.timelapse_cli import add_series_args, add_track_parser, series_options, track_segmented

if TYPE_CHECKING:
    from cellseg.annotations import AnnotationScan
    from cellseg.batch import JobReport

EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_WRITE_FAILED = 4  # an output could not be written, or the server stopped answering: the job stopped, resumable
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it): the job stopped, resumable
EXIT_STATUSES = """exit status:
  0  every input was segmented (or was already done)
  2  usage error: bad option, unusable --out, other settings than --out's results, server unreachable
  3  some inputs failed (listed on stderr and in errors.json); the others are done
  4  an output could not be written (disk full, quota, read-only, permissions), or the --server
     stopped answering: the job stopped; finished images are kept, so fix the cause and run the same
     command again to resume
  130 interrupted (Ctrl-C): finished images are kept; run the same command again to resume"""
DEFAULT_CONCURRENCY = 4  # requests in flight to a --server: enough to fill its adaptive batches
POSTPROCESS_KEYS = ("fg_threshold", "seed_threshold", "min_size")


def add_postprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fg-threshold", type=float, help="foreground probability threshold (default: model's)")
    p.add_argument("--seed-threshold", type=float, help="cell-core threshold for watershed seeds (default: model's)")
    p.add_argument("--min-size", type=int, help="drop cells smaller than this many pixels (default: model's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average the network's maps over 4 mirrorings (4x the network time); "
                        "default: the model's own (off for the shipped model; on for a model fine-tuned with --tta)")
    p.add_argument("--cell-rules", action=argparse.BooleanOptionalAction, default=None,
                   help="the model's cell rules: merge touching cells annotators drew as one, drop cells they would "
                        "not draw (default: on where the model has them, as the shipped model does); --no-cell-rules "
                        "cuts cells with the thresholds alone (more of the cell-covered area, more false cells)")


def postprocess_params(args: argparse.Namespace, defaults: PostprocessParams) -> PostprocessParams:
    params = defaults.with_overrides(**{key: getattr(args, key) for key in POSTPROCESS_KEYS})
    return params.without_rules() if getattr(args, "cell_rules", None) is False else params


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cellseg.cpu import describe_cpu
    from cellseg.data import subsample_per_type
    from cellseg.evaluate import evaluate_segmentations, format_per_image, format_table
    from cellseg.onnx_model import OnnxModel

    model = OnnxModel(args.model)
    precision = "int8" if model.metadata.get("quantization") else "fp32"
    print(f"scoring {args.model} ({precision}, sha256 {model.sha256[:12]}) on {describe_cpu()}")
    params = postprocess_params(args, model.default_params)
    tta = resolve_tta(args.tta, model.metadata)
    samples, split, annotations = evaluation_samples(args.data, args.split)
    if args.per_type:
        samples = subsample_per_type(samples, args.per_type)
    t0 = time.time()
    segs = []
    for sample in tqdm(samples, desc="evaluating", unit="img", disable=args.quiet):
        segs += model.segment([sample.image()], params, batch_size=args.batch_size, tta=tta)
    result = evaluate_segmentations(samples, segs)
    result.update({"model": str(args.model), "model_sha256": model.sha256, "precision": precision, "cpu": describe_cpu(),
                   "data": str(args.data), "split": split,
                   "postprocess": params.to_dict(), "tta": tta, "per_type": args.per_type,
                   "seconds": round(time.time() - t0, 1)})
    if annotations:
        result["annotations"] = annotations.as_dict()
    print(format_table(result))
    if args.per_image:
        print("\n" + format_per_image(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def evaluation_samples(data: Path, split: str | None) -> tuple[list, str, AnnotationScan | None]:
    """Samples to evaluate on: a split of a LIVECell/Kaggle data root (default `val`), or every image of a
    lab's annotations (a folder or file that `cellseg.annotations` reads; split `all`), with the split used
    and the report of what was read."""
    from cellseg.annotations import scan_annotated
    from cellseg.data import is_data_root, load_split

    if not Path(data).exists() or is_data_root(Path(data)):  # a missing path: read_any's error says how to set it
        split = split or "val"
        return load_split(data, split), split, None
    if split not in (None, "all"):
        raise ValueError(f"--split {split} names images of the LIVECell/Kaggle data; {data} is read as a lab's "
                         "annotations, all of which are evaluated: leave --split out")
    scan = scan_annotated([data])
    print(scan.summary())
    return scan.samples, "all", scan


def cmd_segment(args: argparse.Namespace) -> int:
    from cellseg.batch import JobStopped, local_backend, parse_formats, run_job, server_backend, server_settings

    formats = parse_formats(args.formats)
    pixel_size = args.pixel_size  # None: each image's own, from its metadata

    if args.server and args.dask:
        raise ValueError("--dask runs the model on Dask workers and --server on a service: choose one")
    if args.concurrency is not None and not args.server:
        raise ValueError("--concurrency sets the requests in flight to a --server; without --server the model runs "
                         "in this process and uses every core itself (--dask local:N for N workers)")
    if args.server:
        # Only what the user set is sent; the server fills in its model's defaults.
        overrides = {k: getattr(args, k) for k in POSTPROCESS_KEYS if getattr(args, k) is not None}
        postprocess_params(args, PostprocessParams())  # validate here rather than once per image remotely
        for key in ("tta", "cell_rules"):  # left open, the server's model decides
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        factory = lambda: server_backend(args.server, overrides, args.concurrency or DEFAULT_CONCURRENCY, formats,  # noqa: E731
                                                 pixel_size)
        settings = server_settings(args.server, overrides)
    else:
        from cellseg.onnx_model import read_metadata, sha256_file
        from cellseg.variants import choose_for_model

        choice = choose_for_model(args.model, args.precision)
        print(f"model {choice.path}: {choice.precision} ({choice.reason}; {choice.cpu})", file=sys.stderr)
        metadata = read_metadata(choice.path)
        params = postprocess_params(args, PostprocessParams(**metadata.get("postprocess", {})))
        tta = resolve_tta(args.tta, metadata)
        sha256 = sha256_file(choice.path)
        if args.dask:
            from cellseg.dask_backend import dask_backend

            factory = lambda: dask_backend(args.dask, choice, sha256, params, tta, formats,  # noqa: E731
                                           pixel_size)
        else:
            factory = lambda: local_backend(choice.path, params, tta, formats, pixel_size=pixel_size)  # noqa: E731
        # The backend is not a setting: local and Dask runs give the same bytes and may share a folder.
        # The file's sha256 names the precision too; "precision" says why it was chosen (not compared).
        settings = {"model_sha256": sha256, "params": params.to_dict(), "tta": tta,
                    "precision": choice.to_dict()}
    # A given size changes every µm value; metadata sizes are recorded per image, in the records.
    settings["pixel_size"] = pixel_size.to_dict() if pixel_size else None
    try:
        report = run_job(args.inputs, args.out, factory, settings, overwrite=args.overwrite, progress=not args.quiet,
                         formats=formats, series=series_options(args))
    except JobStopped as stopped:
        print_summary(stopped.report, args.out)
        print(f"cellseg segment: error: {stopped}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:  # Ctrl-C: every image written so far is whole (atomic writes, record last)
        print(f"\ncellseg segment: interrupted; the images finished so far are kept in {args.out}: run the same "
              "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(report, args.out)
    if args.track:
        track_segmented(args.out, quiet=args.quiet)
    return EXIT_SOME_FAILED if report.failed else 0


def print_summary(report: JobReport, out: Path) -> None:
    completed = (f"{len(report.completed)} done before and given the missing formats from their records "
                 "(not segmented again), " if report.completed else "")
    masks = len(report.masks_left_out)
    masks_note = f", {masks} annotation mask{'s' * (masks != 1)} (X_masks.*) not segmented" if masks else ""
    earlier = len(report.earlier)
    earlier_note = (f"; the tables also keep {earlier} image{'s' * (earlier != 1)} segmented here before" if earlier
                    else "")
    print(f"{len(report.done)} segmented, {completed}{len(report.skipped)} already done (skipped), "
          f"{len(report.failed)} failed{masks_note}{earlier_note}; outputs in {out}")
    for failure in report.failed:
        frame = f" frame {failure['frame']}" if "frame" in failure else ""
        print(f"  FAILED {failure['path']}{frame}: {failure['error']}", file=sys.stderr)
    if report.unmatched:  # listed, never guessed into a well (series.json has them all)
        shown = ", ".join(Path(p).name for p in report.unmatched[:5])
        more = f" and {len(report.unmatched) - 5} more" if len(report.unmatched) > 5 else ""
        print(f"  {len(report.unmatched)} file(s) fit no series name layout, segmented as single images: "
              f"{shown}{more} (series.json)", file=sys.stderr)


def bounded_number(kind, low: float, high: float | None = None):
    """An argparse type: a finite `kind` (int or float) within [low, high], or a one-line error naming
    the bounds (`cellseg segment --concurrency`, `python -m train finetune`'s numbers)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a value {bounds}")
        return value
    return parse


def pixel_size_argument(text: str) -> PixelSize:
    try:
        return parse_pixel_size(text, SOURCE_GIVEN_CLI)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellseg", description="LIVECell cell segmentation (ONNX Runtime).")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate an ONNX model on annotated data",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--model", type=Path, default=default_model_path(), help="ONNX model file")
    ev.add_argument("--data", type=Path, default=default_data_root(),
                    help="data root: LIVECell layout, Kaggle layout, or a folder holding livecell/ and sartorius/; "
                         "or a lab's annotations: a folder or file of images with label masks, ImageJ ROI sets, "
                         "QuPath GeoJSON or COCO JSON (README: 'Annotations a lab already has')")
    ev.add_argument("--split",
                    help="for a data root: train | val (the project's split; the default) | all | livecell-train | "
                         "livecell-val | livecell-test. A lab's annotations are evaluated whole")
    ev.add_argument("--json", type=Path, help="write all metrics (overall, per cell type, per image) here")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--per-type", type=int, help="evaluate at most N images of each cell type (fixed seed)")
    ev.add_argument("--per-image", action="store_true",
                    help="also print one line per image (cells, predicted, foreground IoU, mSA, count error), the "
                         "worst mSA first; --json always has them")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    add_postprocess_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    sg = sub.add_parser("segment", help="segment image files, folders or globs into label images + tables",
                        description=__import__("cellseg.batch").batch.__doc__, epilog=EXIT_STATUSES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sg.add_argument("inputs", nargs="+", help="image files (TIFF/PNG/JPEG; a multi-page TIFF is a time-lapse, segmented "
                                              "frame by frame), folders (searched recursively) or globs")
    sg.add_argument("--out", type=Path, required=True, help="output folder")
    where = sg.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, default=default_model_path(),
                       help="ONNX model for local inference (default: the shipped model). Its int8 sibling "
                            "<stem>.int8.onnx runs instead where --precision allows it")
    where.add_argument("--server", help="URL of a running cellseg service (e.g. http://localhost:3000)")
    sg.add_argument("--precision", choices=PRECISIONS,
                    help="auto: int8 only where it agrees with fp32 on this CPU and is faster (checked at start, about "
                         "a second); fp32 or int8 force one (default: $CELLSEG_PRECISION, else auto; an .int8.onnx "
                         "--model asks for int8). With --server, the server decides")
    sg.add_argument("--concurrency", type=bounded_number(int, 1), metavar="N",
                    help=f"requests in flight with --server (default {DEFAULT_CONCURRENCY}); a local job uses every "
                         "core by itself, and --dask local:N sets the workers")
    sg.add_argument("--dask", metavar="CLUSTER",
                    help="run on Dask workers: 'local' (one 1-thread worker per core), 'local:N' (N workers), or a "
                         "scheduler address such as tcp://host:8786 (workers must see the inputs and --model)")
    sg.add_argument("--formats", default="labels,csv,coco",
                    help="outputs to write, comma-separated: labels (16-bit PNG), csv (cells.csv), coco "
                         "(instances.coco.json), rois (ImageJ/Fiji ROI sets), geojson (QuPath detections)")
    sg.add_argument("--pixel-size", type=pixel_size_argument, metavar="UM",
                    help="µm per pixel, for every image and frame: one number (square pixels) or X,Y. Overrides the images' "
                         "metadata; without it, each image's own size is read from its metadata (OME-TIFF, ImageJ, "
                         "TIFF resolution in cm) where it has one. cells.csv and the records then add µm values")
    sg.add_argument("--overwrite", action="store_true",
                    help="redo every image, also those with outputs (needed to change settings in an existing --out)")
    sg.add_argument("--quiet", action="store_true", help="no progress bar")
    add_postprocess_args(sg)
    add_series_args(sg)
    sg.set_defaults(func=cmd_segment)
    add_track_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cellseg.client import CellsegError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, CellsegError) as exc:
        print(f"cellseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
