"""The command-line side of time-lapses: `cellseg segment`'s --name-pattern, --interval and --track,
and the `cellseg track` command. Thin: the work is in cellseg/series.py, wells.py and track_job.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg.series import compile_pattern, parse_duration
from cellseg.series_items import SeriesOptions


def interval_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def pattern_argument(text: str) -> str:
    try:
        compile_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_series_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name-pattern", type=pattern_argument, metavar="REGEX",
                   help="place files in wells by their names: a regex searched in each file's stem, with named groups "
                        "well (needed), field, plate, and time (a time-point number, or a duration like 01d04h00m) "
                        "or days/hours/minutes. Without it, LIVECell, Incucyte (VID123_A1_1_00d04h00m), archive "
                        "(YYMM/DD/HHMM/<plate>/A1-1-Ph.tif) and NIS-Elements (...xy01t01) names are recognised")
    p.add_argument("--interval", type=interval_argument, metavar="DURATION",
                   help="time between frames (30min, 2h, 10.2min, 90s) of stacks whose metadata gives none, and "
                        "between the time points of names that number them (xy01t01, t02, ...)")
    p.add_argument("--track", action="store_true",
                   help="also track the cells of every stack and series (laptrack): tracks/<series>/ holds "
                        "tracks.csv, label images of track ids and the Cell Tracking Challenge layout")


def series_options(args: argparse.Namespace) -> SeriesOptions:
    return SeriesOptions(args.name_pattern, args.interval)


def track_segmented(out: Path, quiet: bool = False) -> None:
    """segment --track: track each stack and series of the job's outputs into out/tracks/."""
    from cellseg.batch import atomic_write
    from cellseg.track_job import job_sequences, track_all

    for summary in track_all(job_sequences(out), Path(out) / "tracks", atomic_write):
        if not quiet:
            print(_tracked_line(summary))


def _tracked_line(summary: dict) -> str:
    state = "already tracked" if summary.get("skipped") else f"tracked in {summary['seconds']} s"
    line = (f"{summary['sequence']}: {summary['frames']} frames, {summary['tracks']} tracks, "
            f"{summary['divisions']} divisions ({state})")
    return f"{line}\n  WARNING: {summary['warning']}" if summary.get("warning") else line


def cmd_track(args: argparse.Namespace) -> int:
    from cellseg.batch import atomic_write
    from cellseg.track_job import ONE_FRAME, folder_sequence, job_sequences, stack_sequence, track_all

    source = Path(args.labels)
    if (source / "records").is_dir():
        sequences = job_sequences(source)
        if not sequences:
            raise ValueError(f"{source} is a segment job without stacks or series: nothing to track over time")
    elif source.is_dir():
        sequences = [folder_sequence(source, args.interval)]
    elif source.is_file() and source.suffix.lower() in (".tif", ".tiff"):
        sequences = [stack_sequence(source, args.interval)]
    elif source.is_file():
        raise ValueError(f"{source}: {ONE_FRAME}")
    else:
        raise FileNotFoundError(f"{source}: no such file or folder (give a folder of label images, a multi-page TIFF "
                                "of them or a segment job's --out)")
    for summary in track_all(sequences, args.out, atomic_write, force=args.overwrite):
        print(_tracked_line(summary))
    print(f"outputs in {args.out}", file=sys.stderr)
    return 0


def add_track_parser(sub) -> None:
    tr = sub.add_parser("track", help="track cells over time in label images (a folder of frames or a segment job)",
                        description=__import__("cellseg.track_job").track_job.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("labels", help="a folder of per-frame label images (TIFF/PNG, frames in name order), a multi-page "
                                   "TIFF of label images (a page per frame; Fiji's Z-slices refused with the fix), or the "
                                   "--out folder of a `cellseg segment` job (each stack and series tracked)")
    tr.add_argument("--out", type=Path, required=True, help="output folder")
    tr.add_argument("--interval", type=interval_argument, metavar="DURATION",
                    help="time between the frames of a folder of label images, or of a stack whose file does not say "
                         "(30min, 10.2min): tracks.csv's time_s")
    tr.add_argument("--overwrite", action="store_true", help="track again even where nothing changed")
    tr.set_defaults(func=cmd_track)
