"""Readers against the real annotation files in ../shared/data (skipped when absent)."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from cellseg.data import load_split, project_split, read_kaggle, read_livecell

pytestmark = pytest.mark.data


def test_livecell_reader_matches_coco_json(data_root):
    root = data_root / "livecell"
    samples = read_livecell(root)
    for split in ("val", "test"):
        coco = json.loads((root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json").read_text())
        mine = [s for s in samples if s.id.startswith(f"livecell:{split}:")]
        assert len(mine) == len(coco["images"])
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        by_name = {img["file_name"]: per_image[img["id"]] for img in coco["images"]}
        for s in mine:
            assert len(s.rles) == by_name[s.image_path.name]
            assert s.cell_type == s.image_path.name.split("_")[0]
            assert s.image().shape == (s.height, s.width)


def test_livecell_labels_keep_every_cell(data_root):
    sample = read_livecell(data_root / "livecell", ("val",))[0]
    labels = sample.labels()
    # overlapping polygons: the smaller cell wins, so every annotated cell keeps pixels
    assert labels.max() == len(sample.rles) == len(np.unique(labels)) - 1


def test_kaggle_reader_matches_csv(data_root):
    root = data_root / "sartorius"
    with open(root / "train.csv") as fh:
        rows = list(csv.DictReader(fh))
    counts = Counter(r["id"] for r in rows)
    samples = read_kaggle(root)
    assert {s.id.split(":")[1]: len(s.rles) for s in samples} == dict(counts)
    for s in samples:
        labels = s.labels()
        assert labels.shape == (520, 704) == s.image().shape
        assert labels.max() == counts[s.id.split(":")[1]]


def test_project_split_is_fixed_and_disjoint(data_root):
    split = project_split()
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == 21
    val = load_split(data_root, "val")
    assert len(val) >= 5
    assert len({s.cell_type for s in val}) >= 5
    assert any(s.source == "sartorius" for s in val)
    assert len(load_split(data_root, "train")) == len(split["train"])


def test_official_split_and_bad_split_names(data_root):
    test = load_split(data_root, "livecell-test")
    assert len(test) == 11 and all(s.source == "livecell" for s in test)
    with pytest.raises(ValueError, match="unknown split"):
        load_split(data_root, "nonsense")
    with pytest.raises(FileNotFoundError):
        load_split(data_root / "does-not-exist", "val")
