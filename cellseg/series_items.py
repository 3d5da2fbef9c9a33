"""The batch job's adapter to cellseg/series.py: places a job's items (batch.Item) in plates, wells,
fields and time points by their file names, and times the frames of stacks that carry no interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cellseg.series import SeriesScan, scan_names


@dataclass(frozen=True)
class SeriesOptions:
    """--name-pattern (a regex with named groups; None: the known layouts) and --interval (seconds)."""

    name_pattern: str | None = None
    interval_s: float | None = None

    def to_dict(self) -> dict:
        return {"name_pattern": self.name_pattern, "interval_s": self.interval_s}


def place_in_series(items: Sequence, options: SeriesOptions) -> tuple[list, dict | None]:
    """(items placed, what series.json says) of a job's items. A single image whose name fits a layout
    becomes a time point of its well's field (its `stack` the series, `frame` the time-point index);
    a stack's frames get the stack's well where its name gives one, and times from --interval where
    the file has none. None instead of the description where no name fits and no pattern was given
    (a job of unrelated images): there is nothing to list as unmatched then."""
    singles = [item.path for item in items if item.frame is None]
    scan = scan_names(singles, options.name_pattern, options.interval_s)
    stack_scan = scan_names(list(dict.fromkeys(i.path for i in items if i.frame is not None)), options.name_pattern)
    frames = scan.frames()
    placed = [_placed(item, scan, frames, stack_scan, options.interval_s) for item in items]
    if not scan.points and not stack_scan.points and not options.name_pattern:
        return placed, None
    return placed, describe(scan, options, [p for p in placed if p.well])


def _placed(item, scan: SeriesScan, frames: dict[Path, tuple[str, int]], stack_scan: SeriesScan,
            interval_s: float | None):
    if item.frame is None:
        point = scan.points.get(item.path)
        if point is None:
            return item
        series, index = frames[item.path]
        return replace(item, stack=series, frame=index, time_s=point.time_s, plate=point.plate, well=point.well,
                       field=point.field, by_name=True)
    if item.time_s is None and interval_s is not None:  # a stack without a frame interval of its own
        item = replace(item, time_s=item.frame * interval_s)
    point = stack_scan.points.get(item.path)
    return item if point is None else replace(item, plate=point.plate, well=point.well, field=point.field)


def describe(scan: SeriesScan, options: SeriesOptions, placed: Sequence) -> dict:
    """series.json: the options, files matched per layout, each series' time points, and the files
    whose names fit no layout (segmented as single images, never guessed into a well)."""
    series: dict[str, int] = {}
    for item in placed:
        series[item.stack] = series.get(item.stack, 0) + 1
    return {"options": options.to_dict(), "layouts": scan.layouts, "series": series,
            "wells": sorted({f"{i.plate} {i.well}".strip() for i in placed}),
            "unmatched": [str(p) for p in scan.unmatched]}


# The most file names an upload may say its batch has, and their bytes as a form field (the web page
# sends at most 200 images: a few kB).
MAX_BATCH_NAMES = 1000
MAX_BATCH_NAMES_BYTES = 256 * 1024


def place_upload(item, upload_name: str, batch_names: Sequence[str] = ()):
    """An uploaded image (or a stack's frame: `item`, read from a temporary file) placed as a batch job
    of the files `batch_names` places it, by their names (the service sees one file at a time; the web
    page sends its batch's names with each). The upload's own name counts without being listed; folders
    are not known, so the archive layout does not apply. Only the place changes: path and name stay."""
    from cellseg.batch import Item  # batch imports this module

    named = replace(item, path=Path(upload_name))
    others = [Item(Path(name), Path(name).stem) for name in dict.fromkeys(batch_names) if name != upload_name]
    placed, _ = place_in_series([named, *others], SeriesOptions())
    return replace(placed[0], path=item.path)


def check_batch_names(names) -> list[str]:
    """`batch_names` as the service takes it: a list of file names (no folders), each under 256 characters."""
    if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) < 256 and "/" not in n
                                              and "\\" not in n for n in names):
        raise ValueError("batch_names must be a JSON list of file names (no folders), each under 256 characters")
    if len(names) > MAX_BATCH_NAMES:
        raise ValueError(f"batch_names lists {len(names):,} files; at most {MAX_BATCH_NAMES:,}")
    return names
