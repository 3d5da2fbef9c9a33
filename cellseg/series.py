"""Time-lapse series from file names: a folder of per-time-point exports becomes plates x wells x
fields x time points, so a batch job can report per well and over time.

Names recognised without being told (the first layout that matches a file wins):
    livecell   <line>_Phase_<well>_<field>_<DD>d<HH>h<MM>m_<crop>   A172_Phase_C7_1_00d20h00m_4.tif
               (plate = cell line; field = "<field>-<crop>": a LIVECell crop is its own region)
    incucyte   <experiment>_<well>_<field>_<DD>d<HH>h<MM>m         VID123_A1_1_00d04h00m.tif
    archive    .../<YYMM>/<DD>/<HHMM>/<plate>/<well>-<field>-<channel>   .../2403/15/0930/1234/A1-1-Ph.tif
               (elapsed time from the earliest scan of the plate among the inputs)
    nis        <name>xy<position>t<time point>                     20180101ef002xy01t01.tif
               (Nikon NIS-Elements; well = "xy<position>"; time points need --interval)
A user pattern (--name-pattern) is a Python regex searched in the file's stem, with named groups
`well` (needed), `field`, `plate`, and either `time` (a time-point number, timed with --interval,
or a duration such as 01d04h30m / 4h / 30min) or `days`/`hours`/`minutes`.

Nothing is guessed: a file that fits no layout is listed as unmatched, and a time point without a
time in its name or an interval is counted, not timed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

_DHM = r"(?P<days>\d+)d(?P<hours>\d+)h(?P<minutes>\d+)m"
_WELL = r"(?P<well>[A-Pa-p]\d{1,2})"
LAYOUTS: dict[str, re.Pattern] = {
    "livecell": re.compile(rf"^(?P<plate>.+?)_Phase_{_WELL}_(?P<field>\d+)_{_DHM}_(?P<crop>\d+)$"),
    "incucyte": re.compile(rf"^(?P<plate>.+?)_{_WELL}_(?P<field>\d+)_{_DHM}$"),
    "nis": re.compile(r"^(?P<plate>.*?)(?P<well>xy\d+)t(?P<time>\d+)$"),
}
# The archive layout lives in the folders, not the stem: .../YYMM/DD/HHMM/<plate>/<well>-<field>-<channel>
ARCHIVE = re.compile(rf"(?:^|/)(?P<yymm>\d{{4}})/(?P<dd>\d{{2}})/(?P<hhmm>\d{{4}})/(?P<plate>[^/]+)/{_WELL}-(?P<field>\d+)"
                     r"(?:-[^/]*)?$")

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400, "day": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|day|h|hr|min|m|sec|s)(?:s\b)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds of `30min`, `2h`, `10.2min`, `90s`, `1h30m`, `01d04h00m` (a bare number: minutes, the
    unit Incucyte schedules are set in)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) * 60
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"cannot read the duration {text!r}: write it like 30min, 2h, 10.2min, 90s or 1h30m")
    seconds = sum(float(value) * _UNITS[unit] for value, unit in parts)
    if seconds <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return seconds


@dataclass(frozen=True)
class SeriesPoint:
    """Where one file sits in a plate: its well, field and time (seconds since the series' start; None
    when its name gives only a time-point number and no --interval was given)."""

    path: Path
    plate: str
    well: str
    field: str
    time_point: float  # what orders the series' files: seconds, or the time-point number
    time_s: float | None

    @property
    def series(self) -> str:
        """The output name of this well's field over time: [plate_]well_field."""
        return "_".join(part for part in (self.plate, self.well, f"f{self.field}") if part)


@dataclass
class SeriesScan:
    """What file names said: the points of every matched file, and the files that fit no layout."""

    points: dict[Path, SeriesPoint]
    unmatched: list[Path]
    layouts: dict[str, int]  # files matched per layout

    def frames(self) -> dict[Path, tuple[str, int]]:
        """(series name, 0-based time-point index) of each matched file: its frame in the series."""
        by_series: dict[str, list[SeriesPoint]] = {}
        for point in self.points.values():
            by_series.setdefault(point.series, []).append(point)
        frames = {}
        for name, points in by_series.items():
            times = sorted({p.time_point for p in points})
            frames.update({p.path: (name, times.index(p.time_point)) for p in points})
        return frames


def _field(groups: dict) -> str:
    field = groups.get("field") or "1"
    return f"{field}-{groups['crop']}" if groups.get("crop") else field


def _time(groups: dict) -> tuple[float, float | None]:
    """(ordering key, seconds since the plate's start) from a match's time groups; seconds None
    for a bare time-point number, which only an interval times."""
    if any(groups.get(k) is not None for k in ("days", "hours", "minutes")):
        seconds = sum(float(groups.get(k) or 0) * f for k, f in (("days", 86400), ("hours", 3600), ("minutes", 60)))
        return seconds, seconds
    text = groups.get("time")
    if text is None:
        return 0.0, None
    if re.fullmatch(r"\d+", text):
        return float(text), None
    seconds = parse_duration(text)
    return seconds, seconds


def _point(path: Path, groups: dict) -> SeriesPoint:
    key, seconds = _time(groups)
    well = groups["well"]
    return SeriesPoint(path, (groups.get("plate") or "").strip("_-"), well if well.startswith("xy") else well.upper(),
                       _field(groups), key, seconds)


def _archive_points(matches: dict[Path, re.Match]) -> dict[Path, SeriesPoint]:
    """The archive layout's points, timed from each plate's first scan."""
    stamps = {p: datetime.strptime(m["yymm"] + m["dd"] + m["hhmm"], "%y%m%d%H%M") for p, m in matches.items()}
    starts: dict[str, datetime] = {}
    for path, match in matches.items():
        starts[match["plate"]] = min(starts.get(match["plate"], stamps[path]), stamps[path])
    points = {}
    for path, match in matches.items():
        seconds = (stamps[path] - starts[match["plate"]]).total_seconds()
        points[path] = SeriesPoint(path, match["plate"], match["well"].upper(), match["field"], seconds, seconds)
    return points


def scan_names(paths: Sequence[Path], pattern: str | None = None, interval_s: float | None = None) -> SeriesScan:
    """Place each file in its series from its name (a user `pattern`, else the known layouts); the
    first time point of a series is its start where the name gives only time-point numbers."""
    user = compile_pattern(pattern) if pattern else None
    layouts = {"pattern": user} if user else LAYOUTS
    points: dict[Path, SeriesPoint] = {}
    archive: dict[Path, re.Match] = {}
    counts: dict[str, int] = {}
    unmatched = []
    for path in paths:
        name, match = next(((n, rx.search(Path(path).stem)) for n, rx in layouts.items()
                            if rx.search(Path(path).stem)), (None, None))
        if match:
            points[path] = _point(path, match.groupdict())
        elif not user and (found := ARCHIVE.search(Path(path).with_suffix("").as_posix())):
            name, archive[path] = "archive", found
        else:
            unmatched.append(path)
            continue
        counts[name] = counts.get(name, 0) + 1
    points.update(_archive_points(archive))
    return SeriesScan(_from_first(points, interval_s), unmatched, counts)


def _from_first(points: dict[Path, SeriesPoint], interval_s: float | None) -> dict[Path, SeriesPoint]:
    """Time points named by number are timed with the interval from their series' first (t01 is 0 s,
    as a stack's frame 0 is); without an interval they stay untimed."""
    first: dict[str, float] = {}
    for p in points.values():
        first[p.series] = min(first.get(p.series, p.time_point), p.time_point)
    return {path: p if p.time_s is not None or interval_s is None
            else replace(p, time_s=(p.time_point - first[p.series]) * interval_s) for path, p in points.items()}


def compile_pattern(pattern: str) -> re.Pattern:
    """A user's --name-pattern, checked for the groups it must have."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--name-pattern {pattern!r} is not a regular expression: {exc}") from exc
    if "well" not in compiled.groupindex:
        raise ValueError(f"--name-pattern {pattern!r} needs a named group (?P<well>...): groups well, field, "
                         "plate, time (or days/hours/minutes)")
    return compiled
