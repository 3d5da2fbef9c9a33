"""The web page (/ui) in a real headless Chromium, against the real service: upload, overlay, count,
re-run with other parameters, table with units, downloads, a refused file's error with nothing of
the previous image left beside it, and the page on a phone's width."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.data]
# The README's screenshot: refreshed by `CELLSEG_UPDATE_DOCS=1 pytest tests/test_web.py`; other runs
# write theirs to a temporary folder, so CI leaves the checkout as it found it.
SCREENSHOT = REPO / "docs" / "web-ui.png"


def chromium_path() -> str | None:
    """Debian's chromium (what .ci/run installs), or another Chromium named by $CELLSEG_CHROMIUM."""
    for name in (os.environ.get("CELLSEG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -r requirements.txt)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found: apt-get install chromium (as .ci/run does) or set CELLSEG_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def console() -> list[str]:
    """The page's console messages; Chromium logs every failed request there (a favicon's 404 too)."""
    return []


def open_page(browser, served, console, width: int, height: int, touch: bool = False):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True,
                                  has_touch=touch, is_mobile=touch)
    page = context.new_page()
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{served[0]}/ui")
    return context, page


@pytest.fixture
def page(browser, served, console):
    context, page = open_page(browser, served, console, 1440, 900)
    yield page
    context.close()


def results_shown(page) -> int:
    return int(page.evaluate("document.body.dataset.results || 0"))


def wait_for_result(page, before: int) -> int:
    """Wait until the page has shown a result after the `before`-th, and return its cell count."""
    page.wait_for_function("""(before) => !document.body.hasAttribute('aria-busy')
        && Number(document.body.dataset.results || 0) > before""", arg=before, timeout=60_000)
    return int(page.text_content("#count"))


def served_precision(path) -> str:
    return "int8" if path.name.endswith(".int8.onnx") else "fp32"


def test_page_names_the_model_its_precision_and_why_before_any_upload(page, served_model_path):
    """Issue 24: the header says which model and precision answer on this server's CPU, and why
    (its tooltip), as soon as the page loads."""
    page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model:')", timeout=30_000)
    assert results_shown(page) == 0
    label = page.text_content("#model")
    assert label.startswith(f"Model: LIVECell U-Net · {served_precision(served_model_path)} · weights ")
    assert re.search(r"AP50 0\.\d\d, mSA 0\.\d\d on validation split$", label)
    assert "agrees with fp32 on this CPU" in page.get_attribute("#model", "title") or \
        served_precision(served_model_path) == "fp32"


def test_page_segments_reruns_downloads_and_reports_errors(page, served, tif, client, tmp_path, console,
                                                          served_model_path):
    page.set_input_files("#file", str(tif))
    count = wait_for_result(page, 0)
    assert not [message for message in console if "404" in message]  # no /favicon.ico request, nor any other

    # the page's count is the API's for the same image and (default) parameters
    assert count == client.segment(tif).count > 0
    assert page.locator("#cells tbody tr").count() == count
    width = page.evaluate("document.querySelector('#view-outlines').naturalWidth")
    assert width == 704  # the server-rendered overlay of the TIFF, at full size
    assert float(page.text_content("#confluence").rstrip("%")) > 0
    min_size = int(page.input_value("#min_size"))  # the model's default, filled in after the run
    # issue 25: fitted, the image fills the viewer: no black strip beside it (the box keeps the image's shape)
    page.wait_for_function("document.querySelector('#view-image').complete")
    strip = page.evaluate("""() => { const v = document.querySelector('#viewer').getBoundingClientRect();
                                     const i = document.querySelector('#view-image').getBoundingClientRect();
                                     return [v.right - i.right, v.bottom - i.bottom]; }""")
    assert max(strip) <= 3, strip
    shot = SCREENSHOT if os.environ.get("CELLSEG_UPDATE_DOCS") == "1" else tmp_path / "web-ui.png"
    page.screenshot(path=str(shot))
    from PIL import Image

    assert Image.open(shot).size == (1440, 900)

    # units of the pixel measurements, axis titles, help for the parameters and the score, a readable model
    assert "px²" in page.text_content("#cells th[data-key=area]")
    assert "px" in page.text_content("#cells th[data-key=perimeter]")
    assert page.text_content("#median-area").endswith("px²")
    histogram = page.text_content("#histogram")
    assert "cell area (px²)" in histogram and "number of cells" in histogram
    ticks = histogram_ticks(page)  # issue 25: 0/250/500, not 0/204/408
    assert len(ticks) >= 3 and ticks[0] == 0 and all(is_round(t) for t in ticks), ticks
    assert "probability that annotators would draw the cell" in page.get_attribute("#cells th[data-key=score]", "title")
    for name in ("fg_threshold", "seed_threshold", "min_size", "tta", "cell_rules"):
        help_id = page.get_attribute(f"#{name}", "aria-describedby")
        assert help_id and page.text_content(f"#{help_id}").strip()
    assert page.text_content("#model").startswith(f"Model: LIVECell U-Net · {served_precision(served_model_path)} · weights ")
    assert re.search(r"AP50 0\.\d\d, mSA 0\.\d\d on validation split$", page.text_content("#model"))  # the card's figures

    # sortable table: area ascending, then descending
    page.click("#cells th[data-key=area]")
    areas = [int(a) for a in page.locator("#cells tbody tr td:nth-child(2)").all_text_contents()]
    assert areas == sorted(areas)
    page.click("#cells th[data-key=area]")
    areas = [int(a) for a in page.locator("#cells tbody tr td:nth-child(2)").all_text_contents()]
    assert areas == sorted(areas, reverse=True)

    # filled labels instead of outlines
    page.check("input[name=view][value=filled]")
    assert page.is_visible("#view-filled") and not page.is_visible("#view-outlines")

    # a bigger min_size, re-run: fewer cells, still the API's count
    bigger = min_size + 300
    before = results_shown(page)
    page.fill("#min_size", str(bigger))
    page.click("#run")
    new_count = wait_for_result(page, before)
    assert new_count == client.segment(tif, min_size=bigger).count
    assert new_count < count

    # the CSV download holds what is on screen: one row per cell, none under min_size
    with page.expect_download() as download:
        page.click("#dl-csv")
    assert download.value.suggested_filename == f"{tif.stem}_cells.csv"
    rows = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
    assert len(rows) == new_count
    assert min(int(r["area"]) for r in rows) >= bigger
    assert {r["image"] for r in rows} == {tif.stem}
    table_ids = sorted(int(i) for i in page.locator("#cells tbody tr td:nth-child(1)").all_text_contents())
    assert sorted(int(r["cell_id"]) for r in rows) == table_ids

    # a text file: the server's message on the page, nothing of the previous image left beside it
    # (count, table, downloads, picture), and no Run again that would send the refused file again
    bad = tmp_path / "notes.txt"
    bad.write_text("these are not pixels")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not(.hidden)", timeout=30_000)
    assert "not a recognised image" in page.text_content("#error")
    assert "notes.txt" in page.text_content("#error")
    assert_no_result_shown(page)
    # ...and the page still works
    before = results_shown(page)
    page.set_input_files("#file", str(tif))
    assert wait_for_result(page, before) == new_count
    assert not page.is_visible("#error")


def test_page_shows_square_micrometres_and_says_which_pixel_size(page, client, tif, tmp_path):
    """Issue 19: labs report areas in µm². An ImageJ TIFF's own size fills the pixel-size field and
    the table, median and histogram switch to µm²; a typed size overrides it; without one, pixels."""
    import tifffile

    calibrated = tmp_path / "calibrated.tif"
    tifffile.imwrite(calibrated, tifffile.imread(tif), imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"unit": "micron"})
    page.set_input_files("#file", str(calibrated))
    wait_for_result(page, 0)
    assert page.text_content("#pixel-size-note") == "Pixel size 0.65 µm (from ImageJ metadata)."
    assert page.input_value("#pixel_size") == "0.65"
    assert "µm²" in page.text_content("#cells th[data-key=area]")
    assert "µm" in page.text_content("#cells th[data-key=perimeter]")
    assert page.text_content("#median-area").endswith("µm²")
    assert "cell area (µm²)" in page.text_content("#histogram")
    expected = sorted(c.area_um2 for c in client.segment(calibrated).cells)
    page.click("#cells th[data-key=area]")  # ascending
    shown = [float(a) for a in page.locator("#cells tbody tr td:nth-child(2)").all_text_contents()]
    # issue 25: shown to three significant digits (the unit from 100 on), every digit in the cell's title
    assert shown == pytest.approx(expected, rel=5e-3, abs=0.5)
    assert all(len(text.replace(".", "").lstrip("0")) <= 3 or "." not in text
               for text in page.locator("#cells tbody tr td:nth-child(2)").all_text_contents())
    cells = [page.locator(f"#cells tbody tr:nth-child({i + 1}) td:nth-child(2)") for i in range(3)]
    assert [float(c.get_attribute("title") or c.text_content()) for c in cells] == pytest.approx(expected[:3])
    ticks = histogram_ticks(page)
    assert len(ticks) >= 3 and ticks[0] == 0 and all(is_round(t) for t in ticks), ticks

    # a typed size overrides the image's
    before = results_shown(page)
    page.fill("#pixel_size", "0.5")
    page.click("#run")
    wait_for_result(page, before)
    assert page.text_content("#pixel-size-note") == "Pixel size 0.5 µm (given in the pixel size field)."
    shown = [float(a) for a in page.locator("#cells tbody tr td:nth-child(2)").all_text_contents()]
    assert shown == pytest.approx(sorted(c.area * 0.25 for c in client.segment(tif).cells), rel=5e-3, abs=0.5)

    # emptied, on an image without a size: pixels, and the page says so
    before = results_shown(page)
    page.fill("#pixel_size", "")
    page.set_input_files("#file", str(tif))
    wait_for_result(page, before)
    assert page.text_content("#pixel-size-note").startswith("Sizes in pixels: no pixel size known")
    assert "px²" in page.text_content("#cells th[data-key=area]") and page.text_content("#median-area").endswith("px²")
    # the image's own size goes with its image: the next image does not inherit it
    before = results_shown(page)
    page.set_input_files("#file", str(calibrated))
    wait_for_result(page, before)
    assert page.input_value("#pixel_size") == "0.65"
    before = results_shown(page)
    page.set_input_files("#file", str(tif))
    wait_for_result(page, before)
    assert page.input_value("#pixel_size") == "" and "µm" not in page.text_content("#cells thead")


def assert_no_result_shown(page) -> None:
    assert page.text_content("#count") == "–" and page.text_content("#median-area") == "–"
    assert page.locator("#cells tbody tr").count() == 0
    assert page.locator("#downloads a[href]").count() == 0 and not page.is_visible("#downloads")
    assert not page.is_visible("#view-image") and not page.is_visible("#view-outlines")
    assert page.is_disabled("#run")
    # issue 25: the table's units follow the histogram's (after a calibrated result, µm² stayed)
    assert "(px²)" in page.text_content("#cells th[data-key=area]") and "(px²)" in page.text_content("#histogram")


def histogram_ticks(page) -> list[float]:
    return [float(t) for t in page.locator("#histogram text.tick").all_text_contents()]


def is_round(value: float) -> bool:
    """0, or 1, 2, 2.5 or 5 times a power of ten, or a whole multiple of one (250, 750, 1500)."""
    import math

    if value == 0:
        return True
    power = 10 ** math.floor(math.log10(value))
    return any(abs(value / (m * power) - round(value / (m * power))) < 1e-9 for m in (1, 2.5))


def test_image_over_the_limit_clears_the_previous_result(page, tif, tmp_path):
    """A refused upload (here a 413: more pixels than the server takes) leaves no earlier result on screen."""
    from PIL import Image

    from conftest import MAX_PIXELS

    page.set_input_files("#file", str(tif))
    wait_for_result(page, 0)
    assert page.is_enabled("#run") and page.locator("#downloads a[href]").count() == 5
    huge = tmp_path / "huge.png"
    side = int(MAX_PIXELS**0.5) + 10
    Image.new("L", (side, side)).save(huge)  # a few kB of PNG, over the pixel limit
    page.set_input_files("#file", str(huge))
    page.wait_for_selector("#error:not(.hidden)", timeout=30_000)
    assert "huge.png" in page.text_content("#error")
    assert "HTTP 413" in page.text_content("#status-text")
    assert_no_result_shown(page)


def test_page_reads_well_on_a_phone(browser, served, tif, console):
    """Issue 25: on a phone the hints say tap and pinch (not drop and Ctrl + wheel); a tapped row brings
    the image, with its cell, back into view; Fit leaves no scrollbar gutter (the black strip)."""
    context, page = open_page(browser, served, console, 390, 844, touch=True)
    try:
        assert page.is_visible("text=Tap to choose an image") and not page.is_visible("text=Drop an image here")
        assert page.is_visible("text=pinch to zoom") and not page.is_visible("text=Ctrl + wheel")
        page.set_input_files("#file", str(tif))
        wait_for_result(page, 0)
        page.wait_for_function("document.querySelector('#view-image').complete")
        gutter = "(v => [v.offsetWidth - v.clientWidth, v.offsetHeight - v.clientHeight])(document.querySelector('#viewer'))"
        assert page.evaluate(gutter) == [0, 0]
        page.locator("#cells tbody tr").nth(5).scroll_into_view_if_needed()
        assert page.evaluate("document.querySelector('#viewer').getBoundingClientRect().bottom") < 0  # scrolled away
        page.locator("#cells tbody tr").nth(5).click()
        page.wait_for_function("""() => { const r = document.querySelector('#viewer').getBoundingClientRect();
                                          return r.top >= -1 && r.bottom <= window.innerHeight + 1; }""", timeout=5_000)
        assert page.is_visible("#marker")
    finally:
        context.close()


def test_page_fits_a_phone(browser, served, tif, console):
    """At a phone's 390 px: no sideways scrolling; Fit fits the image to the width; the histogram
    fits; the table scrolls inside its own box."""
    context, page = open_page(browser, served, console, 390, 844)
    try:
        page.set_input_files("#file", str(tif))
        wait_for_result(page, 0)
        page.wait_for_function("document.querySelector('#view-image').complete")

        def boxes() -> dict:
            return page.evaluate("""() => {
                const right = (selector) => document.querySelector(selector).getBoundingClientRect().right;
                return {page: document.documentElement.scrollWidth, window: window.innerWidth,
                        viewer: document.querySelector('#viewer').clientWidth,
                        image: document.querySelector('#view-image').getBoundingClientRect().width,
                        rights: ['#viewer', '#histogram', '#table-wrap', '#params', 'header'].map(right)};
            }""")

        fitted = boxes()
        assert fitted["window"] == 390 and fitted["page"] <= 390
        assert max(fitted["rights"]) <= 390
        assert fitted["viewer"] - 2 <= fitted["image"] <= fitted["viewer"]  # fitted to the width: about 50%
        # zoomed to 100% the image scrolls inside the viewer, not the page; Fit brings it back
        page.evaluate("""() => { const zoom = document.querySelector('#zoom');
                                 zoom.value = 0; zoom.dispatchEvent(new Event('input')); }""")
        assert page.text_content("#zoom-text") == "100%" and boxes()["page"] <= 390
        page.click("#fit")
        assert boxes() == fitted
        # the table is wider than a phone: it scrolls sideways within its box
        assert page.evaluate("(w => w.scrollWidth > w.clientWidth)(document.querySelector('#table-wrap'))")
    finally:
        context.close()


def test_ui_is_self_contained(served):
    """Works offline and in the container: nothing loaded from another host."""
    import httpx

    # the SVG namespace (in the inline icon) names a namespace: nothing is fetched from it
    html = httpx.get(f"{served[0]}/ui/", timeout=10).text.replace("http://www.w3.org/2000/svg", "")
    assert "<script>" in html and "report" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


# ---- Issue 25: many images at once ------------------------------------------------------------------

STACK_FRAMES = ("t01", "t13", "t25")  # of the real T98G time-lapse (10.2 min apart): every 12th, 2.04 h apart


@pytest.fixture(scope="module")
def many_inputs(tmp_path_factory, data_root) -> list:
    """Three real Sartorius PNGs, a file the server refuses, and a 3-frame ImageJ stack of real
    time-lapse frames (512 px crops, so that the stack fits the test server's 3 MB upload limit) with its
    frame interval and pixel size, in the order the page and the batch command both take them."""
    import numpy as np
    import tifffile

    folder = tmp_path_factory.mktemp("many")
    pngs = sorted((data_root / "sartorius" / "train").glob("*.png"))[:3]
    notes = folder / "notes.txt"
    notes.write_text("these are not pixels")
    frames_dir = data_root / "timelapse" / "usiigaci-t98g" / "frames"
    frames = np.stack([tifffile.imread(frames_dir / f"20180101ef002xy01{t}.tif")[:512, :512] for t in STACK_FRAMES])
    stack = folder / "t98g.tif"
    tifffile.imwrite(stack, frames, imagej=True, resolution=(1 / 0.87, 1 / 0.87),
                     metadata={"axes": "TYX", "finterval": 12 * 612, "unit": "micron"})
    return [*pngs, notes, stack]


@pytest.fixture(scope="module")
def batch_outputs(tmp_path_factory, many_inputs, served):
    """`cellseg segment` on the same files, with the model and precision the server answers with."""
    import httpx

    from cellseg.cli import main

    precision = httpx.post(f"{served[0]}/model", json={}, timeout=30).json()["precision"]
    out = tmp_path_factory.mktemp("batch")
    assert main(["segment", *map(str, many_inputs), "--out", str(out), "--quiet", "--precision", precision,
                 "--formats", "labels,csv,rois"]) == 3  # 3: notes.txt failed, the rest done
    return out


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def assert_same_table(page_rows: list[dict], batch_rows: list[dict]) -> None:
    """The same columns, rows and values (numbers compared as numbers: 130 and 130.0 are one value)."""
    assert page_rows and [list(r) for r in page_rows] == [list(r) for r in batch_rows]
    for mine, theirs in zip(page_rows, batch_rows, strict=True):
        for key, value in theirs.items():
            try:
                assert float(mine[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-9), key
            except ValueError:
                assert mine[key] == value, key


def wait_for_batch(page, timeout: int = 240_000) -> None:
    page.wait_for_function("document.body.dataset.batch === 'over'", timeout=timeout)


def downloaded(page, selector: str):
    with page.expect_download() as download:
        page.click(selector)
    return download.value


@pytest.mark.parametrize("width,height,touch", [(1440, 900, False), (390, 844, True)], ids=["desktop", "phone"])
def test_many_images_agree_with_the_batch_command(browser, served, console, many_inputs, batch_outputs, tmp_path,
                                                  width, height, touch):
    """Issue 25: several files at once, a refused one and a time-lapse stack among them: a row per image
    (a stack: per frame) with its count, the refusal listed with the server's reason, a row opens its
    image's view, the growth curve has a point per frame, and the combined cells CSV, summary CSV and ZIP
    hold what `cellseg segment` writes for the same files."""
    import zipfile

    context, page = open_page(browser, served, console, width, height, touch=touch)
    try:
        page.set_input_files("#file", [str(p) for p in many_inputs])
        wait_for_batch(page)
        rows = page.locator("#images tbody tr")
        assert rows.count() == 3 + 1 + len(STACK_FRAMES)
        statuses = rows.locator("td.status").all_text_contents()
        assert statuses.count("done") == 6, statuses
        assert "not a recognised image" in statuses[3] and statuses[3].startswith("refused (HTTP 400)")
        assert page.locator("#images tbody tr:nth-child(4) .status:visible").text_content() == statuses[3]
        assert page.text_content("#batch-text") == "7 of 7 done, 1 refused"
        summary = read_csv((batch_outputs / "summary.csv").read_text())
        assert [int(c) for c in rows.locator("td:nth-child(2)").all_text_contents() if c] == [int(r["count"]) for r in summary]

        # a row shows its image's view: the second image's count, table and picture
        rows.nth(1).click()
        page.wait_for_function("(name) => document.querySelector('#result-title').textContent === name",
                               arg=many_inputs[1].stem)
        assert int(page.text_content("#count")) == int(summary[1]["count"])
        assert page.locator("#cells tbody tr").count() == int(summary[1]["count"])
        assert page.is_visible("#view-outlines")
        # ...and a frame's: µm² from the stack's pixel size
        rows.nth(5).click()
        page.wait_for_function("document.querySelector('#result-title').textContent === 't98g_t0001'")
        # the view's median is the row's (numpy's median: 66 cells, the mean of the middle two)
        assert page.text_content("#median-area").replace("\u00a0", " ").replace(" µm²", "") == \
            rows.nth(5).locator("td:nth-child(4)").text_content().replace(" µm²", "")

        # the growth curve: one point per frame, count and confluence, against time in hours
        chart = page.locator("svg.growth[data-stack=t98g]")
        assert chart.locator("circle.point.count").count() == len(STACK_FRAMES)
        assert chart.locator("circle.point.confluence_pct").count() == len(STACK_FRAMES)
        assert "time (h)" in chart.text_content()
        ticks = [float(t) for t in chart.locator("text.tick").all_text_contents()]  # both panels and time
        assert len(ticks) >= 7 and all(is_round(t) for t in ticks), ticks  # 0/50/100 cells, not 0/96

        cells = downloaded(page, "#dl-all-cells")
        assert cells.suggested_filename == "cells.csv"
        page_cells = open(cells.path(), newline="").read()
        assert_same_table(read_csv(page_cells), read_csv((batch_outputs / "cells.csv").read_text()))
        page_summary = open(downloaded(page, "#dl-summary").path(), newline="").read()
        assert_same_table(read_csv(page_summary), summary)
        # ...byte for byte, even
        assert page_cells == (batch_outputs / "cells.csv").read_bytes().decode()
        assert page_summary == (batch_outputs / "summary.csv").read_bytes().decode()
        assert [r["median_area_um2"] != "" for r in read_csv(page_summary)] == [False] * 3 + [True] * 3

        with zipfile.ZipFile(downloaded(page, "#dl-zip").path()) as archive:
            assert archive.testzip() is None
            names = [r["image"] if r["frame"] == "" else f"t98g_t{int(r['frame']):04d}" for r in summary]
            assert sorted(archive.namelist()) == sorted(["cells.csv", "summary.csv", *(f"labels/{n}.png" for n in names),
                                                         *(f"rois/{n}.zip" for n in names)])
            assert archive.read("cells.csv").decode() == page_cells
            for name in names:  # the same bytes as the batch command's files
                assert archive.read(f"labels/{name}.png") == (batch_outputs / "labels" / f"{name}.png").read_bytes()
                assert archive.read(f"rois/{name}.zip") == (batch_outputs / "rois" / f"{name}.zip").read_bytes()

        page.locator("#batch").scroll_into_view_if_needed()
        shot = tmp_path / f"many-{width}.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("CELLSEG_SHOTS"):  # to look at them: CELLSEG_SHOTS=folder
            shutil.copy(shot, os.environ["CELLSEG_SHOTS"])
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
        for selector in ("#images-wrap", "#growth", "#batch-downloads"):
            assert page.evaluate(f"document.querySelector('{selector}').getBoundingClientRect().right") <= width
    finally:
        context.close()


def test_many_images_wait_for_a_busy_server_cancel_and_a_limit(page, many_inputs):
    """Issue 25: a 503 with Retry-After is waited out and sent again ("waiting for the server"), Cancel
    stops the queue and aborts what is in flight, and over 200 files nothing is sent: the page points
    to the batch command."""
    busy = {"left": 1}

    def once_busy(route):
        if busy["left"]:
            busy["left"] -= 1
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body='{"error": "busy", "status": 503, "retry_after_s": 1}')
        else:
            route.continue_()

    page.route("**/report", once_busy)
    page.set_input_files("#file", [str(p) for p in many_inputs[:2]])
    page.wait_for_selector("#images td.status:text('waiting for the server (1 s)')", timeout=10_000)
    assert "waiting for the server" in page.text_content("#batch-text")
    wait_for_batch(page)
    assert page.locator("#images td.status").all_text_contents() == ["done", "done"]
    assert busy["left"] == 0 and page.text_content("#batch-text") == "2 of 2 done"

    page.set_input_files("#file", [str(p) for p in many_inputs[:3]])
    page.click("#cancel")
    wait_for_batch(page)
    assert page.text_content("#batch-text").endswith("; cancelled")
    assert "cancelled" in page.locator("#images td.status").all_text_contents()
    assert page.is_disabled("#cancel") and page.is_enabled("#run")

    many = [{"name": f"{i}.png", "mimeType": "image/png", "buffer": b"x"} for i in range(201)]
    page.set_input_files("#file", many)
    page.wait_for_selector("#error:not(.hidden)")
    assert "201 images" in page.text_content("#error") and "cellseg segment" in page.text_content("#error")
    assert page.locator("#images tbody tr").count() == 3  # the earlier batch's rows, nothing sent


def test_a_folder_is_taken_with_its_images_only(page, many_inputs, tmp_path):
    """Issue 25: *Choose a whole folder* takes the folder's PNG, JPEG and TIFF images, subfolders
    included, in name order (as `cellseg segment FOLDER` does), and leaves other files out."""
    folder = tmp_path / "plate"
    (folder / "well B").mkdir(parents=True)
    shutil.copy(many_inputs[1], folder / "b.png")
    shutil.copy(many_inputs[0], folder / "well B" / "a.png")
    shutil.copy(many_inputs[3], folder / "notes.txt")
    page.set_input_files("#folder", str(folder))
    wait_for_batch(page)
    names = page.locator("#images tbody td:first-child > span").all_text_contents()
    assert names == ["plate/b.png", "plate/well B/a.png"]
    assert page.locator("#images td.status").all_text_contents() == ["done", "done"]


def test_files_named_as_a_series_get_the_batch_jobs_summary(page, served, tif, tmp_path):
    """A user's trial: for LIVECell-named files the page's summary.csv lacked the series, well and time
    columns `cellseg segment` writes (and said the file name where the job says the series). The page
    sends its batch's file names with each image, and the summary is the job's, byte for byte."""
    from cellseg.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["A172_Phase_A7_1_00d00h00m_1.tif", "A172_Phase_A7_1_00d04h00m_1.tif", "plain.tif"]
    for name in names:
        shutil.copy(tif, folder / name)
    out = tmp_path / "out"
    assert main(["segment", *(str(folder / n) for n in names), "--out", str(out), "--server", served[0],
                 "--quiet"]) == 0
    page.set_input_files("#file", [str(folder / n) for n in names])
    wait_for_batch(page)
    summary = open(downloaded(page, "#dl-summary").path(), newline="").read()
    assert summary == (out / "summary.csv").read_text() and "A172_A7_f1-1,1,14400.0" in summary


def test_a_stack_chosen_alone_is_taken_frame_by_frame(page, many_inputs):
    """Issue 25: one multi-page TIFF chosen alone goes to the Images table, a row per frame, with its
    growth curve; Run again sends every frame again."""
    page.set_input_files("#file", str(many_inputs[4]))
    wait_for_batch(page)
    assert page.locator("#images td.status").all_text_contents() == ["done"] * len(STACK_FRAMES)
    assert page.locator("svg.growth circle.point.count").count() == len(STACK_FRAMES)
    assert page.text_content("#result-title") == "t98g_t0000"
    page.click("#run")
    page.wait_for_function("document.body.dataset.batch === 'running'")
    wait_for_batch(page)
    assert page.text_content("#batch-text") == f"{len(STACK_FRAMES)} of {len(STACK_FRAMES)} done"


def test_tta_is_sent_only_once_the_box_is_touched(page, tif):
    """Issue 29: a model fine-tuned with --tta runs with TTA by default, so the page must not send tta=false for
    an untouched box (the model's default applies and the box then shows it); once ticked or
    unticked, the choice is sent either way."""
    page.set_input_files("#file", str(tif))
    wait_for_result(page, 0)
    assert "tta" not in page.evaluate("settingsFields()")  # what the page sends with each image
    assert not page.is_checked("#tta")  # the shipped model's default, from the answer
    page.check("#tta")
    assert page.evaluate("settingsFields()")["tta"] == "true"
    before = results_shown(page)
    page.click("#run")
    wait_for_result(page, before)
    assert page.is_checked("#tta")  # the answer's resolved value: true
    page.uncheck("#tta")
    assert page.evaluate("settingsFields()")["tta"] == "false"


def test_the_cell_rules_box_shows_the_models_rules_and_switches_them_off(page, tif, client):
    """The shipped model's rules apply unless the box is unticked; unticked, the page shows the
    watershed's cells alone, as the API's cell_rules=false gives them."""
    page.set_input_files("#file", str(tif))
    count = wait_for_result(page, 0)
    assert page.is_checked("#cell_rules") and page.is_enabled("#cell_rules")
    assert "cell_rules" not in page.evaluate("settingsFields()") and count == client.segment(tif).count
    page.uncheck("#cell_rules")
    assert page.evaluate("settingsFields()")["cell_rules"] == "false"
    before = results_shown(page)
    page.click("#run")
    plain = wait_for_result(page, before)
    assert plain == client.segment(tif, cell_rules=False).count > count
    assert not page.is_checked("#cell_rules") and page.is_enabled("#cell_rules")
