"""Cell tracking: link the cells of a time-lapse's label images across frames (laptrack's
OverLapTrack, which links by mask overlap: no centroid distance to tune per pixel size or speed),
and write the result as a table, as label images whose ids are track ids, and in the Cell
Tracking Challenge (CTC) layout that CTC metric implementations read.

A *track* here is a CTC track: one cell's life between its appearance (or its birth in a division)
and its disappearance (or its division). A dividing cell's track ends and its daughters' tracks
name it as their parent. Ids are 1-based (0 is background in every label image).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.measure import regionprops

from cellseg.summary import csv_table

# Distances are 1 - (a share of the overlap); laptrack links a pair whose distance is under the cutoff.
# Frame to frame: 1 - IoU, so a cell that moved by a fraction of its size still links.
LINK_COEFS = (1.0, 0.0, -1.0, 0.0, 0.0)
# Division: 1 - (overlap / daughter's area). A daughter lies mostly inside its mother's last mask,
# while it is only half the mother, so IoU would undervalue the link.
SPLIT_COEFS = (1.0, 0.0, 0.0, 0.0, -1.0)
LINK_CUTOFF = 0.9  # at least 10% IoU
# A "daughter" shorter than this that divides no further is a mask flickering into two pieces (see
# drop_flicker_divisions); 1 keeps every division laptrack finds.
MIN_DAUGHTER_FRAMES = 3
SPLIT_CUTOFF = 0.97  # at least 3% of a daughter inside its mother (0.8: 23 of 28 CTC divisions, 0.9: 24, 0.97: 25)


@dataclass
class Tracking:
    """The tracks of a sequence: `labels[t]` has each cell's track id as its value, `parents` maps a
    track to its mother's track (0: none), `cell_ids[t]` maps a track id in frame t back to the cell's
    id in the input label image of that frame."""

    labels: list[np.ndarray]
    parents: dict[int, int]
    cell_ids: list[dict[int, int]]

    def spans(self) -> dict[int, tuple[int, int]]:
        """Each track's (first frame, last frame)."""
        spans: dict[int, tuple[int, int]] = {}
        for frame, ids in enumerate(self.cell_ids):
            for track in ids:
                first = spans.get(track, (frame, frame))[0]
                spans[track] = (first, frame)
        return spans

    def divisions(self) -> int:
        """Mothers with two or more daughters."""
        mothers = [p for p in self.parents.values() if p]
        return sum(1 for m in set(mothers) if mothers.count(m) >= 2)


class TrackingUnavailable(ValueError):
    """laptrack is not installed."""


def _link(frames: Sequence[np.ndarray]):
    """laptrack's track table (frame, label -> track_id) and split table."""
    try:
        from laptrack import OverLapTrack
    except ImportError as exc:  # not in the runtime's dependencies: its scipy pin would clash (requirements.txt)
        raise TrackingUnavailable("tracking needs laptrack: pip install --no-deps laptrack==0.17.0 "
                                  "(its other needs: pip install scikit-learn==1.9.1 pooch==1.9.0)") from exc

    tracker = OverLapTrack(metric_coefs=LINK_COEFS, cutoff=LINK_CUTOFF,
                           splitting_metric_coefs=SPLIT_COEFS, splitting_cutoff=SPLIT_CUTOFF,
                           gap_closing_cutoff=False, merging_cutoff=False)
    return tracker.predict_overlap_dataframe([np.asarray(f) for f in frames])[:2]


def track_labels(frames: Sequence[np.ndarray]) -> Tracking:
    """Track the cells of per-frame label images (each frame's ids independent of the others')."""
    if not frames:
        return Tracking([], {}, [])
    if not any(np.any(f) for f in frames):  # laptrack needs at least one cell
        return Tracking([np.zeros_like(f, dtype=np.uint32) for f in frames], {}, [{} for _ in frames])
    track_df, split_df = _link(frames)
    # laptrack's track ids are 0-based; every cell of a track has it in every frame the track spans.
    new_id = {key: int(tid) + 1 for key, tid in track_df["track_id"].items()}
    parents = {int(tid) + 1: 0 for tid in track_df["track_id"].unique()}
    # Without a division laptrack's split table has no columns at all, not an empty pair of them.
    divisions = split_df.reindex(columns=["parent_track_id", "child_track_id"])
    for mother, daughter in zip(divisions["parent_track_id"], divisions["child_track_id"], strict=True):
        parents[int(daughter) + 1] = int(mother) + 1
    if MIN_DAUGHTER_FRAMES > 1:
        new_id, parents = drop_flicker_divisions(new_id, parents, len(frames))
    labels, cell_ids = [], []
    for t, frame in enumerate(frames):
        ids = {new_id[(t, int(label))]: int(label) for label in np.unique(frame) if label and (t, int(label)) in new_id}
        lookup = np.zeros(int(frame.max()) + 1, dtype=np.uint32)
        for track, label in ids.items():
            lookup[label] = track
        labels.append(lookup[frame])
        cell_ids.append(ids)
    return Tracking(labels, parents, cell_ids)


def drop_flicker_divisions(new_id: dict[tuple[int, int], int], parents: dict[int, int],
                           frames: int) -> tuple[dict[tuple[int, int], int], dict[int, int]]:
    """Undo the divisions that are a mask flickering into pieces: a daughter that lives fewer than
    MIN_DAUGHTER_FRAMES frames, divides no further and ends before the last frame is no daughter
    (it keeps its own track, without a parent); a mother left with one daughter continues as her
    (the daughter's cells take the mother's id, her daughters name the mother). Real masks do this
    often (a cell cut in two for a frame); the simulated ground truth's true daughters never do."""
    spans: dict[int, list[int]] = {}
    for (t, _), track in new_id.items():
        span = spans.setdefault(track, [t, t])
        span[0], span[1] = min(span[0], t), max(span[1], t)
    children: dict[int, list[int]] = {}
    for daughter, mother in parents.items():
        if mother:
            children.setdefault(mother, []).append(daughter)
    alias: dict[int, int] = {}
    # Latest mothers first: a brief daughter whose own "daughters" are flicker too is brief and
    # childless once they are undone (taken in time order, she was kept as a daughter).
    for mother in sorted(children, key=lambda m: spans[m][0], reverse=True):
        daughters = children[mother]
        brief = [d for d in daughters if spans[d][1] - spans[d][0] + 1 < MIN_DAUGHTER_FRAMES
                 and not children.get(d) and spans[d][1] < frames - 1]
        if not brief:
            continue
        for d in brief:
            parents[d] = 0
        lasting = [d for d in daughters if d not in brief]
        children[mother] = lasting
        if len(lasting) == 1:  # no division: the one lasting daughter is the mother going on
            going_on = lasting[0]
            alias[going_on] = mother
            parents.pop(going_on)
            spans[mother] = [spans[mother][0], max(spans[mother][1], spans[going_on][1])]
            children[mother] = children.pop(going_on, [])
    parents = {track: _resolve(alias, parent) if parent else 0 for track, parent in parents.items()}
    return {key: _resolve(alias, track) for key, track in new_id.items()}, parents


def _resolve(alias: dict[int, int], track: int) -> int:
    while track in alias:
        track = alias[track]
    return track


TRACKS_FIELDS = ["track_id", "frame", "time_s", "cell_id", "centroid_x", "centroid_y", "area_px", "parent_track_id"]


def tracks_rows(tracking: Tracking, times_s: Sequence[float | None] | None = None) -> list[dict]:
    """One row per cell per frame: its track, the frame (and seconds since frame 0 where known), its
    id in the input labels, centroid (x, y in pixels), area (pixels) and its track's mother."""
    rows = []
    for t, labels in enumerate(tracking.labels):
        for region in regionprops(labels):
            y, x = region.centroid
            rows.append({"track_id": region.label, "frame": t, "time_s": times_s[t] if times_s else None,
                         "cell_id": tracking.cell_ids[t][region.label], "centroid_x": round(x, 2),
                         "centroid_y": round(y, 2), "area_px": int(region.area),
                         "parent_track_id": tracking.parents.get(region.label, 0)})
    return rows


def tracks_csv(rows: Sequence[dict]) -> bytes:
    return csv_table(rows, TRACKS_FIELDS)


def res_track_txt(tracking: Tracking) -> bytes:
    """CTC's res_track.txt: `L B E P` per track (label, first frame, last frame, parent; 0 = none)."""
    lines = [f"{track} {first} {last} {tracking.parents.get(track, 0)}"
             for track, (first, last) in sorted(tracking.spans().items())]
    return ("\n".join(lines) + "\n").encode()


def mask_tiff(labels: np.ndarray) -> bytes:
    """A CTC mask###.tif: 16-bit labels (32-bit only where there are more than 65,535 tracks)."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels.astype(dtype), compression="zlib")
    return buffer.getvalue()


def ctc_files(tracking: Tracking) -> dict[str, bytes]:
    """The CTC RES folder's files by name: mask000.tif ... (3 digits, 4 beyond 1,000 frames) and res_track.txt."""
    digits = max(3, len(str(len(tracking.labels) - 1)))
    files = {f"mask{t:0{digits}d}.tif": mask_tiff(labels) for t, labels in enumerate(tracking.labels)}
    files["res_track.txt"] = res_track_txt(tracking)
    return files


def settings() -> dict:
    """What the tracker was told, for the record (tracking.json)."""
    return {"tracker": "laptrack.OverLapTrack", "laptrack": _version("laptrack"),
            "link": {"metric_coefs": LINK_COEFS, "cutoff": LINK_CUTOFF},
            "split": {"metric_coefs": SPLIT_COEFS, "cutoff": SPLIT_CUTOFF, "min_daughter_frames": MIN_DAUGHTER_FRAMES},
            "gap_closing": False, "merging": False}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def read_label_folder(folder: Path, read: bool = True) -> tuple[list[Path], list[np.ndarray]]:
    """A lab's per-frame label images (TIFF or PNG, in name order) and, with `read`, their labels."""
    from cellseg.imageio import IMAGE_SUFFIXES

    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return paths, [read_labels(p) for p in paths] if read else []


def read_labels(path: Path) -> np.ndarray:
    """A label image file as integers, refusing what is not one (see `as_labels`)."""
    import tifffile
    from PIL import Image

    labels = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else np.asarray(Image.open(path))
    return as_labels(labels, str(path))


# In a label image a cell is one value, so nearly every pair of neighbouring pixels inside the cells
# is equal (they differ only where two cells touch); in a microscope image they differ almost
# everywhere (LIVECell's phase contrast: equal in ~10% of pairs). Halfway is far from both.
MIN_EQUAL_NEIGHBOURS = 0.5
MIN_PIECE_PIXELS = 10  # a binary mask's pieces counted as objects (smaller: stray pixels of one cell)


def as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """`labels` as integers, refusing what is not a label image: not 2-D, colour, fractional values,
    and images whose neighbouring pixels differ as a microscope image's do (tracking those would
    link intensities as cells and can ask for an overlap table of gigabytes)."""
    if labels.ndim != 2:
        raise ValueError(f"{what} is not a 2-D label image (shape {labels.shape})")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{what} holds fractional values: not a label image")
        labels = labels.astype(np.int64)
    cells = labels[labels != 0]  # min and max, not np.unique: every frame of a job is checked
    if cells.size and cells.min() == cells.max():  # one value: a binary mask, unless it holds one cell
        from scipy import ndimage

        # pieces touching at a corner are one, and a stray pixel or two is no second cell
        parts, count = ndimage.label(labels != 0, structure=np.ones((3, 3), bool))
        pieces = int(np.count_nonzero(np.bincount(parts.ravel())[1:] >= MIN_PIECE_PIXELS)) if count > 1 else count
        if pieces > 1:
            raise ValueError(f"{what} is a binary mask ({pieces} separate objects, all of value {cells[0]}), not a "
                             "label image with one id per cell: label its objects first (Fiji: Analyze Particles, "
                             "Show: Count Masks; or skimage.measure.label)")
    share = equal_neighbour_share(labels)
    if share is not None and share < MIN_EQUAL_NEIGHBOURS:
        raise ValueError(f"{what} does not look like a label image: inside the objects, neighbouring pixels differ "
                         f"in {1 - share:.0%} of places, where a label image keeps one value across each cell. "
                         "To track the cells of microscope images, segment them first: "
                         "cellseg segment IMAGES --out OUT --track")
    return labels


def equal_neighbour_share(labels: np.ndarray, min_pairs: int = 1000) -> float | None:
    """Of the horizontally and vertically neighbouring pixel pairs that are both non-zero, the share
    with equal values (None with fewer than `min_pairs` such pairs: too few cells to judge)."""
    equal = pairs = 0
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :])):
        inside = (a != 0) & (b != 0)
        pairs += int(np.count_nonzero(inside))
        equal += int(np.count_nonzero(inside & (a == b)))
    return equal / pairs if pairs >= min_pairs else None
