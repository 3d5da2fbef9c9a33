"""Readers for annotated data: the official LIVECell layout (COCO JSON) and the Kaggle/Sartorius
layout (train.csv with row-major RLE). Both give `Sample`s: an image, its instances as COCO RLEs
(overlaps preserved, as annotated) and an instance label image derived from them.

Accepted data roots (detected, in this order):
- a LIVECell root: ``images/livecell_{train_val,test}_images/...`` + ``annotations/LIVECell/livecell_coco_{train,val,test}.json``
- a Kaggle root: ``train.csv`` + ``train/<id>.png``
- a folder holding ``livecell/`` and/or ``sartorius/`` roots (as ``../shared/data``)
- a packed copy (``packed.json`` + ``images/``), written by ``scripts/pack_data.py`` to carry the
  data where only a few tens of MB travel (a lent GPU machine); its images are JPEG copies
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellseg.imageio import read_image
from cellseg.instances import labels_from_instances
from cellseg.rle import encode_coco, kaggle_to_coco
from cellseg.targets import relabel_sequential

DATA_ENV = "CELLSEG_DATA"
LIVECELL_SPLITS = ("train", "val", "test")
PROJECT_SPLITS = ("train", "val")


def default_data_root() -> Path:
    """$CELLSEG_DATA, else ../shared/data next to the repository."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass
class Sample:
    id: str  # "livecell:<split>:<file name>" or "sartorius:<image id>"
    source: str
    cell_type: str
    image_path: Path
    height: int
    width: int
    _rles: Callable[[], list[dict]] = field(repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def image(self) -> np.ndarray:
        """The raw image as float32 (H, W); normalise with `cellseg.preprocess.normalize`."""
        return read_image(self.image_path)

    @cached_property
    def rles(self) -> list[dict]:
        """One compressed COCO RLE per annotated cell (pycocotools format, bytes counts)."""
        return self._rles()

    def labels(self) -> np.ndarray:
        """int32 (H, W) instance labels (computed once, then kept). Where annotations overlap, the
        smaller cell wins: it is the one that would otherwise vanish inside its neighbour."""
        if self._labels is None:
            self._labels = self._make_labels()
            self._labels.flags.writeable = False  # shared by every caller: nobody may change it
        return self._labels

    def _make_labels(self) -> np.ndarray:
        if not self.rles:
            return np.zeros((self.height, self.width), dtype=np.int32)
        # pycocotools 2.0.11 overflows (uint8) on area() of a list of more than 255 RLEs.
        areas = np.array([mask_utils.area(r) for r in self.rles])
        # painted largest first, each cell from its runs (not an image-sized mask per cell)
        by_size = [{"rle": self.rles[index], "id": rank}
                   for rank, index in enumerate(np.argsort(-areas, kind="stable"), start=1)]
        return relabel_sequential(labels_from_instances(by_size, self.height, self.width))


def livecell_cell_type(file_name: str) -> str:
    return Path(file_name).name.split("_Phase")[0].split("_")[0]


def _load_coco(source: Path | dict) -> COCO:
    """pycocotools' index of a COCO file, or of a dataset already parsed from one (which it takes over)."""
    if isinstance(source, dict):
        dataset = source
    else:
        with open(source) as fh:
            dataset = json.load(fh)
    # The official LIVECell files store annotations as a dict keyed by id; pycocotools wants a list.
    if isinstance(dataset.get("annotations"), dict):
        dataset["annotations"] = list(dataset["annotations"].values())
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _index_images(image_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in image_dir.rglob("*.tif*")}


def read_livecell(root: Path, splits: tuple[str, ...] = LIVECELL_SPLITS) -> list[Sample]:
    root = Path(root)
    ann_dir = root / "annotations" / "LIVECell"
    images = _index_images(root / "images")
    samples = []
    for split in splits:
        ann_path = ann_dir / f"livecell_coco_{split}.json"
        if not ann_path.is_file():
            continue
        coco = _load_coco(ann_path)
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            name = Path(info["file_name"]).name
            if name not in images:
                raise FileNotFoundError(f"{ann_path.name} names {name}, which is not under {root / 'images'}")
            ann_ids = coco.getAnnIds(imgIds=[image_id], iscrowd=None)

            def rles(coco=coco, ann_ids=ann_ids):
                return [coco.annToRLE(coco.anns[a]) for a in ann_ids]

            samples.append(
                Sample(f"livecell:{split}:{name}", "livecell", livecell_cell_type(name), images[name],
                       int(info["height"]), int(info["width"]), rles)
            )
    return samples


def read_kaggle(root: Path) -> list[Sample]:
    root = Path(root)
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(root / "train.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            rows[row["id"]].append(row)
    samples = []
    for image_id in sorted(rows):
        cell_rows = rows[image_id]
        height, width = _kaggle_size(root, image_id, cell_rows[0])

        def rles(cell_rows=cell_rows, height=height, width=width):
            return [kaggle_to_coco(r["annotation"], height, width) for r in cell_rows]

        samples.append(
            Sample(f"sartorius:{image_id}", "sartorius", cell_rows[0]["cell_type"],
                   root / "train" / f"{image_id}.png", height, width, rles)
        )
    return samples


def _kaggle_size(root: Path, image_id: str, row: dict) -> tuple[int, int]:
    """(height, width) of a Kaggle row, checked: whole numbers within the runtime's image limit, and
    the image's PNG present (a bad row is an error naming the CSV, not a traceback or a 6 GB mask)."""
    from cellseg.imageio import DEFAULT_MAX_PIXELS

    where = f"{root / 'train.csv'}: image {image_id!r:.80}"
    try:
        height, width = int(row["height"]), int(row["width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where} has no whole-number height and width") from None
    if not (0 < height and 0 < width and height * width <= DEFAULT_MAX_PIXELS):
        raise ValueError(f"{where} is {width}x{height}: not an image size this reads (at most "
                         f"{DEFAULT_MAX_PIXELS:,} pixels)")
    if not (root / "train" / f"{image_id}.png").is_file():
        raise ValueError(f"{where}: {root / 'train' / f'{image_id}.png'} is missing")
    return height, width


PACKED_INDEX = "packed.json"


def read_packed(root: Path) -> list[Sample]:
    """Samples of a packed copy: the original ids, cell types and COCO RLEs, images as JPEG files."""
    root = Path(root)
    index = json.loads((root / PACKED_INDEX).read_text())
    samples = []
    for entry in index["samples"]:
        def rles(entry=entry):
            return [{"size": entry["size"], "counts": c.encode("ascii")} for c in entry["counts"]]

        height, width = entry["size"]
        samples.append(Sample(entry["id"], entry["source"], entry["cell_type"], root / entry["image"],
                              int(height), int(width), rles))
    return samples


def _is_livecell_root(path: Path) -> bool:
    return (path / "annotations" / "LIVECell").is_dir()


def _is_kaggle_root(path: Path) -> bool:
    return (path / "train.csv").is_file()


def _layouts(root: Path) -> list[tuple[str, Path]]:
    """(layout, folder) of what `read_any` reads under `root`: a packed copy alone, else each LIVECell or
    Kaggle root among root, root/livecell and root/sartorius. Empty where `root` is no data root."""
    if (root / PACKED_INDEX).is_file():
        return [("packed", root)]
    found = []
    for candidate in (root, root / "livecell", root / "sartorius"):
        if _is_livecell_root(candidate):
            found.append(("livecell", candidate))
        elif _is_kaggle_root(candidate):
            found.append(("kaggle", candidate))
    return found


def is_data_root(path: Path) -> bool:
    """Whether `read_any` reads this folder (LIVECell, Kaggle, packed, or livecell/ + sartorius/)."""
    return bool(_layouts(Path(path)))


def read_any(root: Path, livecell_splits: tuple[str, ...] = LIVECELL_SPLITS) -> list[Sample]:
    """All annotated samples under `root` (any accepted layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (set --data or ${DATA_ENV})")
    samples: list[Sample] = []
    for layout, folder in _layouts(root):
        if layout == "packed":
            return read_packed(folder)
        samples += read_livecell(folder, livecell_splits) if layout == "livecell" else read_kaggle(folder)
    if not samples:
        raise FileNotFoundError(f"no LIVECell or Kaggle-layout annotations found under {root}")
    return samples


def project_split() -> dict[str, list[str]]:
    """The project's fixed train/validation split of the annotated images (cellseg/splits.json)."""
    text = resources.files("cellseg").joinpath("splits.json").read_text()
    return json.loads(text)


def load_split(root: Path, split: str) -> list[Sample]:
    """Samples for a split name:

    - ``train`` / ``val``: the project's recorded split (only the annotation files it names are read);
    - ``livecell-train`` / ``livecell-val`` / ``livecell-test``: an official LIVECell annotation file;
    - ``all``: every annotated image under the root.
    """
    if split == "all":
        return read_any(root)
    if split.startswith("livecell-"):
        name = split.removeprefix("livecell-")
        if name not in LIVECELL_SPLITS:
            raise ValueError(f"unknown LIVECell split {name!r}; choose from {LIVECELL_SPLITS}")
        samples = [s for s in read_any(root, (name,)) if s.source == "livecell"]
        if not samples:
            raise FileNotFoundError(f"no livecell_coco_{name}.json under {root}")
        return samples
    if split not in PROJECT_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from train, val, all, livecell-train, livecell-val, livecell-test")
    wanted = project_split()[split]
    livecell_files = tuple(sorted({i.split(":")[1] for i in wanted if i.startswith("livecell:")}))
    by_id = {s.id: s for s in read_any(root, livecell_files)}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of split {split!r} are not under {root}: {missing[:3]}...")
    return [by_id[i] for i in wanted]


def subsample_per_type(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """At most `n` samples of each (source, cell type), drawn with a fixed seed, in their original order:
    a balanced, affordable subset of a large split (e.g. for tuning or evaluating on training images)."""
    rng = np.random.default_rng(seed)
    by_type: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_type[(s.source, s.cell_type)].append(i)
    keep = sorted(int(i) for idx in by_type.values()
                  for i in (rng.choice(idx, n, replace=False) if len(idx) > n else idx))
    return [samples[i] for i in keep]


__all__ = ["Sample", "read_livecell", "read_kaggle", "read_packed", "read_any", "is_data_root", "load_split", "project_split",
           "default_data_root", "encode_coco", "subsample_per_type"]
