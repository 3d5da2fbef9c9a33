"""Readers against the real annotation files in ../shared/data (skipped when absent)."""

import csv
import json
from collections import Counter
from pathlib import Path

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


# Images where 1-4 annotated masks are entirely covered by others or duplicated (../shared/data/README.md):
# their label maps hold fewer cells than the CSV has rows.
COVERED_MASK_IMAGES = {"a7b1db2a42fc", "a9fc5e872671", "b5afaf901478", "bcf94f6bc975", "ca5df17f6717", "de504eaa5349"}


def test_kaggle_reader_matches_csv(data_root):
    root = data_root / "sartorius"
    with open(root / "train.csv") as fh:
        rows = list(csv.DictReader(fh))
    counts = Counter(r["id"] for r in rows)
    samples = read_kaggle(root)
    assert {s.id.split(":")[1]: len(s.rles) for s in samples} == dict(counts)
    assert len(samples) == len(counts) and sum(counts.values()) == len(rows)
    by_id = {s.id.split(":")[1]: s for s in samples}
    # Label maps for the known covered-mask images and a spread of the others (all 487: 11 s)
    checked = sorted(COVERED_MASK_IMAGES & set(by_id)) + sorted(set(by_id) - COVERED_MASK_IMAGES)[::10]
    for image_id in checked:
        s = by_id[image_id]
        labels = s.labels()
        assert labels.shape == (520, 704) == s.image().shape
        if image_id in COVERED_MASK_IMAGES:
            assert counts[image_id] - 4 <= labels.max() < counts[image_id]
        else:
            assert labels.max() == counts[image_id]


def test_project_split_is_fixed_and_disjoint(data_root):
    split = project_split()
    assert not set(split["train"]) & set(split["val"])
    assert len(set(split["train"])) == len(split["train"]) and len(set(split["val"])) == len(split["val"])
    # every annotated image is in exactly one split, and every listed image exists
    everything = {s.id for s in read_livecell(data_root / "livecell")} | {s.id for s in read_kaggle(data_root / "sartorius")}
    assert set(split["train"]) | set(split["val"]) == everything
    val = load_split(data_root, "val")
    assert [s.id for s in val] == split["val"]
    livecell_types = {s.cell_type for s in val if s.source == "livecell"}
    assert livecell_types == {"BT474", "MCF7", "Huh7", "A172", "SKOV3"}
    sartorius = Counter(s.cell_type for s in val if s.source == "sartorius")
    assert set(sartorius) == {"astro", "cort", "shsy5y"} and min(sartorius.values()) >= 10
    assert len(load_split(data_root, "train")) == len(split["train"])


def test_split_file_is_what_the_script_makes(data_root):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_split", REPO / "scripts" / "make_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = module.make_split(data_root)
    assert made["train"] == project_split()["train"] and made["val"] == project_split()["val"]


def test_official_split_and_bad_split_names(data_root):
    test = load_split(data_root, "livecell-test")
    assert len(test) == 11 and all(s.source == "livecell" for s in test)
    with pytest.raises(ValueError, match="unknown split"):
        load_split(data_root, "nonsense")
    with pytest.raises(FileNotFoundError):
        load_split(data_root / "does-not-exist", "val")


def test_packed_copy_reads_back_as_the_original(data_root, tmp_path):
    """scripts/pack_data.py: same ids, cell types and masks (exact RLEs); images within JPEG error."""
    import importlib.util

    from cellseg.data import read_any

    spec = importlib.util.spec_from_file_location("pack_data", Path(__file__).parent.parent / "scripts" / "pack_data.py")
    pack_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack_data)
    pack_data.pack(data_root, ["val"], tmp_path, quality=90)
    originals, packed = load_split(data_root, "val"), load_split(tmp_path, "val")
    assert [s.id for s in packed] == [s.id for s in originals] == [s.id for s in read_any(tmp_path)]
    for a, b in zip(originals[:4] + originals[-2:], packed[:4] + packed[-2:]):
        assert (a.source, a.cell_type, a.height, a.width) == (b.source, b.cell_type, b.height, b.width)
        np.testing.assert_array_equal(a.labels(), b.labels())
        assert np.abs(a.image() - b.image()).mean() < 3  # grey levels
