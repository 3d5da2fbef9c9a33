"""The web page (/ui) in a real headless Chromium, against the real service: upload, overlay, count,
re-run with other parameters, table, downloads, and a bad file's error on the page."""

from __future__ import annotations

import csv
import io
import os
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
def page(browser, served):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{served[0]}/ui")
    yield page
    context.close()


def results_shown(page) -> int:
    return int(page.evaluate("document.body.dataset.results || 0"))


def wait_for_result(page, before: int) -> int:
    """Wait until the page has shown a result after the `before`-th, and return its cell count."""
    page.wait_for_function("""(before) => !document.body.hasAttribute('aria-busy')
        && Number(document.body.dataset.results || 0) > before""", arg=before, timeout=60_000)
    return int(page.text_content("#count"))


def test_page_segments_reruns_downloads_and_reports_errors(page, served, tif, client, tmp_path):
    page.set_input_files("#file", str(tif))
    count = wait_for_result(page, 0)

    # the page's count is the API's for the same image and (default) parameters
    assert count == client.segment(tif).count > 0
    assert page.locator("#cells tbody tr").count() == count
    width = page.evaluate("document.querySelector('#view-outlines').naturalWidth")
    assert width == 704  # the server-rendered overlay of the TIFF, at full size
    assert float(page.text_content("#confluence").rstrip("%")) > 0
    min_size = int(page.input_value("#min_size"))  # the model's default, filled in after the run
    shot = SCREENSHOT if os.environ.get("CELLSEG_UPDATE_DOCS") == "1" else tmp_path / "web-ui.png"
    page.screenshot(path=str(shot))
    from PIL import Image

    assert Image.open(shot).size == (1440, 900)

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

    # a text file: the server's message on the page, and the page still works
    bad = tmp_path / "notes.txt"
    bad.write_text("these are not pixels")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not(.hidden)", timeout=30_000)
    assert "not a recognised image" in page.text_content("#error")
    assert "notes.txt" in page.text_content("#error")
    before = results_shown(page)
    page.set_input_files("#file", str(tif))
    assert wait_for_result(page, before) == new_count
    assert not page.is_visible("#error")


def test_ui_is_self_contained(served):
    """Works offline and in the container: nothing loaded from another host."""
    import httpx

    html = httpx.get(f"{served[0]}/ui/", timeout=10).text
    assert "<script>" in html and "report" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
