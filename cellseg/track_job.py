"""`cellseg track`'s job: track the cells of label images a lab already has (a folder of per-frame
label images, in name order, or a multi-page TIFF of them) or of a `cellseg segment` job's outputs (each stack or series of the
job tracked on its own), and write per sequence, under OUT/<sequence>/:

    tracks.csv           one row per cell per frame (cellseg/tracking.py: TRACKS_FIELDS)
    labels/<frame>.png   16-bit label images whose ids are track ids (same id = same cell over time)
    ctc/mask000.tif ...  the Cell Tracking Challenge RES layout (+ ctc/res_track.txt), for CTC metrics
    tracking.json        frames, tracks, divisions, seconds taken, the tracker's settings

A sequence is tracked again only where its inputs are newer than its tracking.json (a resumed job
re-tracks the stacks that got new frames); every file is written atomically.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg import tracking

Write = Callable[[Path, bytes], None]


@dataclass
class TrackInput:
    """One time-lapse to track: its name, the output name of each frame, their times, and a way to
    read each frame's label image (so only the tracker holds them all at once)."""

    name: str
    frame_names: list[str]
    times_s: list[float | None]
    sources: list[Path]  # the files its labels come from: their age says whether to track again
    read: Callable[[int], np.ndarray]


def png16(labels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_sequence(folder: Path, interval_s: float | None = None) -> TrackInput:
    """A folder of per-frame label images (TIFF/PNG), frames in name order, `interval_s` apart
    (untimed without it)."""
    paths, _ = tracking.read_label_folder(folder, read=False)
    if not paths:
        raise ValueError(f"{folder} holds no label images (TIFF or PNG)")
    times = [None if interval_s is None else i * interval_s for i in range(len(paths))]
    return TrackInput(Path(folder).name, [p.stem for p in paths], times, paths,
                     lambda i: tracking.read_labels(paths[i]))


# What `cellseg track` says of a file that is one image (a PNG, a one-page TIFF).
ONE_FRAME = ("a single image holds one frame; give a folder of per-frame label images, a multi-page TIFF of them "
             "or a segment job's --out")


def stack_sequence(path: Path, interval_s: float | None = None) -> TrackInput:
    """A multi-page TIFF of label images, a page per frame (Fiji's Z-slices are refused, with its fix), its frames
    named as a batch job names a stack's; timed by the file's own frame interval, else `interval_s`."""
    from cellseg.batch import frame_name
    from cellseg.imageio import ImageError, read_frame, stack_info

    try:
        info = stack_info(path)
    except ImageError as exc:  # Z-slices, channels: the same reason and advice a batch job gives
        raise ValueError(f"{path}: {exc}") from exc
    if info.frames < 2:
        raise ValueError(f"{path}: {ONE_FRAME}")
    step = info.interval_s if info.interval_s is not None else interval_s
    names = [frame_name(path.stem, i, info.frames) for i in range(info.frames)]
    times = [None if step is None else i * step for i in range(info.frames)]
    return TrackInput(path.stem, names, times, [path],
                      lambda i: tracking.as_labels(read_frame(path, i), f"{path} frame {i}"))


def job_sequences(job: Path) -> list[TrackInput]:
    """The stacks and series of a segment job's outputs (records/), each in frame order."""
    from cellseg.instances import labels_from_instances

    records: dict[str, list[dict]] = {}
    for path in sorted((Path(job) / "records").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("frame") is not None:
            record.pop("cells", None)  # only the masks are needed: keep memory to a record's instances
            records.setdefault(record["stack"], []).append(record | {"_path": path})
    sequences = []
    for name, frames in sorted(records.items()):
        frames.sort(key=lambda r: r["frame"])

        def read(i: int, frames=frames) -> np.ndarray:
            r = frames[i]
            return labels_from_instances(r["instances"], r["height"], r["width"])
        sequences.append(TrackInput(name, [r["name"] for r in frames], [r.get("time_s") for r in frames],
                                   [r["_path"] for r in frames], read))
    return sequences


def is_current(seq: TrackInput, out: Path) -> bool:
    """Tracked before from the same frames, none of them changed since."""
    done = out / "tracking.json"
    if not done.is_file():
        return False
    previous = json.loads(done.read_text())
    return (previous.get("frame_names") == seq.frame_names
            and max(p.stat().st_mtime for p in seq.sources) <= done.stat().st_mtime)


# Above this share of one-frame tracks a sequence's masks are unstable: T98G segmented by the shipped
# model 53% (673 of 1258 tracks); the same frames' reference masks (Usiigaci's Mask R-CNN) 29%; the
# CTC ground truth 2% (scripts/bench_tracking.py's sequences).
MAX_ONE_FRAME_SHARE = 0.4


def one_frame_tracks(spans: dict[int, tuple[int, int]], frames: int) -> int:
    """Tracks that live one frame, other than the first and the last (where a cell may just enter or
    leave the sequence): a cell's mask flickering, cut in pieces, or debris."""
    return sum(1 for first, last in spans.values() if first == last and 0 < first < frames - 1)


def track_sequence(seq: TrackInput, out: Path, write: Write) -> dict:
    """Track one sequence into `out` (see the module's docstring); returns tracking.json's content."""
    frames = [seq.read(i) for i in range(len(seq.frame_names))]
    start, cpu = time.perf_counter(), time.process_time()
    result = tracking.track_labels(frames)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    times = seq.times_s if any(t is not None for t in seq.times_s) else None
    write(out / "tracks.csv", tracking.tracks_csv(tracking.tracks_rows(result, times)))
    for name, labels in zip(seq.frame_names, result.labels, strict=True):
        write(out / "labels" / f"{name}.png", png16(labels))
    for name, data in tracking.ctc_files(result).items():
        write(out / "ctc" / name, data)
    spans = result.spans()
    flicker = one_frame_tracks(spans, len(frames))
    summary = {"sequence": seq.name, "frames": len(frames), "tracks": len(spans),
               "divisions": result.divisions(), "one_frame_tracks": flicker,
               "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
               "tracker": tracking.settings(), "frame_names": seq.frame_names}
    if len(frames) >= 3 and flicker > MAX_ONE_FRAME_SHARE * len(spans):
        summary["warning"] = (f"{flicker} of {len(spans)} tracks last one frame (not the first or last): the "
                              "masks change from frame to frame (cells cut or missed in some frames), so tracks "
                              "break and divisions are overcounted. Look at labels/ against the images; fine-tuning "
                              "on a few corrected frames (README: 'Adapt it to your cells') is the remedy")
    write(out / "tracking.json", json.dumps(summary, indent=2).encode())  # last: marks the sequence done
    return summary


def track_all(sequences: Sequence[TrackInput], out: Path, write: Write, force: bool = False) -> list[dict]:
    """Track each sequence into out/<name>/, skipping those tracked before from unchanged frames."""
    summaries = []
    for seq in sequences:
        target = Path(out) / seq.name
        if not force and is_current(seq, target):
            summaries.append(json.loads((target / "tracking.json").read_text()) | {"skipped": True})
        else:
            summaries.append(track_sequence(seq, target, write))
    return summaries
