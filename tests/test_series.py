"""Time-lapse series from file names (cellseg/series.py), doubling times (cellseg/wells.py), and the
per-well outputs of a segment job on the real LIVECell images, whose names carry wells and times."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cellseg.series import parse_duration, scan_names
from cellseg.wells import fit_doubling


@pytest.mark.parametrize(("text", "seconds"), [("30min", 1800), ("2h", 7200), ("10.2min", 612), ("90s", 90),
                                               ("1h30m", 5400), ("01d04h00m", 100800), ("15", 900)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "2 fortnights", "0min", "30min later"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_known_layouts_and_unmatched_files_are_listed():
    paths = [Path("A172_Phase_C7_1_00d20h00m_4.tif"), Path("A172_Phase_C7_1_01d00h00m_4.tif"),
             Path("VID123_A1_1_00d04h00m.tif"), Path("VID123_A1_2_00d04h00m.tif"),
             Path("scans/2403/15/0930/P7/B2-1-Ph.tif"), Path("scans/2403/16/0930/P7/B2-1-Ph.tif"),
             Path("run/20180101ef002xy01t01.tif"), Path("run/20180101ef002xy01t03.tif"),
             Path("notes/overview.png"), Path("C7_whatever.tif")]
    scan = scan_names(paths, interval_s=600)
    assert [str(p) for p in scan.unmatched] == ["notes/overview.png", "C7_whatever.tif"]
    assert scan.layouts == {"livecell": 2, "incucyte": 2, "archive": 2, "nis": 2}
    p = scan.points
    assert (p[paths[0]].plate, p[paths[0]].well, p[paths[0]].field, p[paths[0]].time_s) == ("A172", "C7", "1-4", 72000)
    assert p[paths[1]].series == p[paths[0]].series and p[paths[1]].time_s == 86400
    assert p[paths[2]].series != p[paths[3]].series and p[paths[3]].field == "2"  # fields are series of their own
    assert (p[paths[4]].plate, p[paths[4]].well, p[paths[4]].time_s, p[paths[5]].time_s) == ("P7", "B2", 0, 86400)
    assert (p[paths[6]].well, p[paths[6]].time_s, p[paths[7]].time_s) == ("xy01", 0, 1200)  # t01 is time 0
    frames = scan.frames()
    assert frames[paths[0]][1] == 0 and frames[paths[1]][1] == 1 and frames[paths[7]] == (p[paths[7]].series, 1)


def test_numbered_time_points_without_interval_are_counted_not_timed():
    scan = scan_names([Path("xy02t05.tif"), Path("xy02t06.tif")])
    assert [pt.time_s for pt in scan.points.values()] == [None, None]


def test_user_pattern():
    paths = [Path("exp3-well_D04-site2-T0012.tif"), Path("exp3-well_D04-site2-T0013.tif"), Path("A1_1_00d04h00m.tif")]
    scan = scan_names(paths, pattern=r"well_(?P<well>[A-H]\d+)-site(?P<field>\d+)-T(?P<time>\d+)", interval_s=1800)
    assert scan.unmatched == [paths[2]]  # a user pattern replaces the known layouts
    assert [(pt.well, pt.field, pt.time_s) for pt in scan.points.values()] == [("D04", "2", 0), ("D04", "2", 1800)]
    with pytest.raises(ValueError, match="well"):
        scan_names(paths, pattern=r"(?P<field>\d+)")


def logistic(t: np.ndarray, n0: float = 40, rate: float = math.log(2) / 20, capacity: float = 2000,
             lag_h: float = 12) -> np.ndarray:
    """Cells over time: a lag, exponential growth doubling every 20 h, then a plateau."""
    grown = n0 * np.exp(rate * np.clip(t - lag_h, 0, None))
    return grown / (1 + grown / capacity)


def test_doubling_time_of_a_synthetic_exponential_phase():
    t = np.arange(0, 150, 3.0)
    fit = fit_doubling(t, logistic(t))
    assert fit["doubling_h"] == pytest.approx(20, rel=0.1)
    assert fit["window_start_h"] >= 9 and fit["window_end_h"] <= 110  # neither the lag nor the plateau
    assert fit["r2"] >= 0.9 and fit["note"] == ""
    noisy = logistic(t) * np.random.default_rng(1).normal(1, 0.03, t.size)
    assert fit_doubling(t, noisy)["doubling_h"] == pytest.approx(20, rel=0.15)


def test_a_well_that_never_grew_says_so():
    t = np.arange(0, 48, 2.0)
    flat = fit_doubling(t, 300 + np.random.default_rng(2).normal(0, 5, t.size))
    assert flat["doubling_h"] is None and "never grew exponentially" in flat["note"]
    dying = fit_doubling(t, 300 * np.exp(-t / 30))
    assert dying["doubling_h"] is None
    assert "at least 3" in fit_doubling([0, 1], [10, 20])["note"]


LIVECELL_TYPES = ("Huh7", "BT474")  # wells with several time points and fields among the 1% sample


@pytest.fixture(scope="module")
def livecell_job(tmp_path_factory, data_root, model_path) -> tuple[Path, list[str]]:
    """(output folder, command) of a segment job of two cell types' images and the demo images."""
    from cellseg.cli import main

    out = tmp_path_factory.mktemp("wells") / "job"
    folders = [str(data_root / "livecell/images/livecell_train_val_images" / t) for t in LIVECELL_TYPES]
    argv = ["segment", *folders, str(data_root / "demo"), "--out", str(out), "--quiet", "--formats", "csv"]
    assert main(argv) == 0
    return out, argv


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.data
def test_per_well_outputs_on_livecell_images(livecell_job, data_root):
    out, _ = livecell_job
    summary = read_csv(out / "summary.csv")
    placed = [r for r in summary if r["well"]]
    images = [p for t in LIVECELL_TYPES for p in (data_root / "livecell/images/livecell_train_val_images" / t).glob("*")]
    demo = list((data_root / "demo").glob("*"))
    assert len(placed) == len(images) + sum("_Phase_" in p.name for p in demo) and len(summary) == len(images) + len(demo)
    a10 = [r for r in placed if (r["plate"], r["well"]) == ("Huh7", "A10")]
    assert sorted(float(r["time_h"]) for r in a10) == [20, 20, 44, 60]  # 00d20h00m (2 fields), 01d20h, 02d12h
    unmatched = json.loads((out / "series.json").read_text())["unmatched"]
    assert sorted(Path(p).name for p in unmatched) == sorted(p.name for p in demo if "_Phase_" not in p.name)

    wells = read_csv(out / "wells.csv")
    at_20h = next(r for r in wells if (r["plate"], r["well"], r["time_h"]) == ("Huh7", "A10", "20.0"))
    counts = [int(r["count"]) for r in a10 if r["time_h"] == "20.0"]
    assert int(at_20h["fields"]) == 2 and float(at_20h["count_mean"]) == pytest.approx(np.mean(counts), abs=1e-3)
    assert float(at_20h["count_sd"]) == pytest.approx(np.std(counts), abs=1e-3)
    assert {(r["plate"], r["well"]) for r in wells} == {(r["plate"], r["well"]) for r in placed}

    doubling = {(r["plate"], r["well"]): r for r in read_csv(out / "doubling.csv")}
    assert set(doubling) == {(r["plate"], r["well"]) for r in wells}
    for row in doubling.values():  # every well has a doubling time or says why not
        assert row["doubling_h"] or row["note"]
    assert "at least 3" in doubling[("Huh7", "A11")]["note"]  # two time points
    assert (out / "plots" / "plate_Huh7.png").stat().st_size > 10_000
    assert (out / "plots" / "wells" / "Huh7_A10.png").is_file()


@pytest.mark.data
def test_per_well_outputs_resume_redrawing_only_what_is_missing(livecell_job):
    from cellseg.cli import main

    out, argv = livecell_job
    well_plot, plate_plot = out / "plots" / "wells" / "Huh7_A10.png", out / "plots" / "plate_BT474.png"
    drawn = well_plot.stat().st_mtime_ns
    tables = [(out / name).read_bytes() for name in ("summary.csv", "wells.csv", "doubling.csv")]
    plate_plot.unlink()
    assert main(argv) == 0  # every image already done: nothing segmented
    assert [(out / name).read_bytes() for name in ("summary.csv", "wells.csv", "doubling.csv")] == tables
    assert well_plot.stat().st_mtime_ns == drawn and plate_plot.is_file()


def test_an_upload_is_placed_among_its_batchs_file_names():
    """The service sees one file at a time: `place_upload` places it as a batch job of the files its
    batch names (the web page sends them), keeping the temporary file's path and the output name."""
    from cellseg.batch import Item
    from cellseg.series_items import place_upload

    upload = Item(Path("/tmp/tmpab12cd34A172_Phase_A7_1_00d04h00m_1.tif"), "A172_Phase_A7_1_00d04h00m_1")
    names = ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_A7_1_00d04h00m_1.tif", "7ae19de7bc2a.png"]
    placed = place_upload(upload, "A172_Phase_A7_1_00d04h00m_1.tif", names)
    assert (placed.path, placed.name) == (upload.path, upload.name)
    assert placed.record_fields() == {"stack": "A172_A7_f1-1", "frame": 1, "time_s": 14400.0, "plate": "A172",
                                      "well": "A7", "field": "1-1"}
    alone = place_upload(upload, "A172_Phase_A7_1_00d04h00m_1.tif")  # a batch of this file alone
    assert alone.record_fields()["frame"] == 0 and alone.record_fields()["time_s"] == 14400.0
    plain = Item(Path("/tmp/tmpab12cd347ae19de7bc2a.png"), "7ae19de7bc2a")
    assert place_upload(plain, "7ae19de7bc2a.png", names).record_fields() == {}
