"""The Space in a real headless browser: Debian's chromium, driven by Playwright for Python."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags the sandboxed CI machine needs: no GPU, no background calls to a network it does not have.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _upload(page, path):
    page.locator("input[type=file]").first.set_input_files(str(path))


def _noise(folder):
    path = folder / "noise.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_the_page_says_what_the_model_is_and_how_good_it_is(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    notice = page.locator("#notice")  # read from the model's own metrics.json: 32 photos, from scratch
    notice.get_by_text("This is a demonstration model").wait_for()
    assert "from scratch" in notice.inner_text() and "32 photos" in notice.inner_text()
    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")
    page.locator("#verdict").wait_for(state="visible", timeout=60_000)
    assert page.get_by_test_id("label").inner_text().count("%") >= 2
    page.get_by_text("How good is this model?").click()
    report = page.locator("#report")
    report.get_by_text("Right on").wait_for(timeout=10_000)
    figures = report.locator("img")
    figures.first.wait_for(timeout=10_000)
    page.wait_for_function("() => [...document.querySelectorAll('#report img')].every(img => img.naturalWidth > 0)",
                           timeout=10_000)
    assert figures.count() == 3
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_one_verdict_for_a_picture_that_is_neither_on_both_tabs_and_in_the_csv(browser, app_url, tmp_path):
    noise = _noise(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, noise)
    page.locator("#verdict").get_by_text("Neither a cat nor a dog").wait_for(timeout=60_000)
    page.get_by_role("tab", name="Many pictures").click()
    page.locator("input[type=file][multiple]").first.set_input_files([str(noise)])
    page.get_by_role("button", name="Classify all").click()
    link = page.locator("a[download='catdog-predictions.csv']").first
    link.wait_for(timeout=60_000)
    row = page.get_by_role("row").filter(has_text="noise.png").first
    assert "neither" in row.inner_text()
    csv_text = page.request.get(link.get_attribute("href")).text()
    assert csv_text.splitlines()[1].startswith("noise.png,neither,")


@pytest.mark.slow
def test_a_bad_upload_is_explained_next_to_the_picture_until_the_next_one(browser, app_url, tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, tmp_path / "notes.jpg")
    status = page.locator("#upload-status")
    status.get_by_text("Cannot read this file").wait_for(timeout=60_000)
    page.wait_for_load_state("networkidle")
    # On the page, not in a toast that fades: no toast at all, and the message stays until the next upload.
    assert page.locator(".toast-body").count() == 0 and "not an image that can be read" in status.inner_text()
    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")
    page.get_by_test_id("label").get_by_text("%").first.wait_for(timeout=60_000)
    assert not status.is_visible() or "Cannot read" not in status.inner_text()


@pytest.mark.slow
def test_removing_the_picture_clears_the_prediction(browser, app_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")
    label = page.get_by_test_id("label")
    label.get_by_text("%").first.wait_for(timeout=60_000)
    page.get_by_role("button", name=re.compile("clear|remove", re.IGNORECASE)).first.click()
    page.wait_for_function("() => !document.querySelector('#result').innerText.includes('%')", timeout=10_000)


@pytest.mark.slow
def test_a_batch_with_an_oversized_file_classifies_the_others(browser, app_url, tmp_path):
    huge = tmp_path / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(huge)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.get_by_role("tab", name="Many pictures").click()
    page.locator("input[type=file][multiple]").first.set_input_files([str(huge), str(ROOT / "examples" / "chelsea_cat.jpg")])
    assert "Download as CSV" not in page.locator("body").inner_text()  # no empty CSV box before a run
    page.get_by_role("button", name="Classify all").click()
    page.get_by_text("Too large: The file is").first.wait_for(state="attached", timeout=90_000)
    text = page.locator("body").inner_text()
    assert "huge.png" in text and "chelsea_cat.jpg" in text
    # The CSV box appears only now, with the file named for what it is (Gradio shows "name" and ".csv" apart).
    page.wait_for_function("() => document.body.innerText.includes('catdog-predictions')", timeout=10_000)


def _in_view(page, selector: str, height: int = 844) -> bool:
    box = page.locator(selector).bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= height


@pytest.mark.slow
def test_on_a_phone_the_picture_comes_first_and_the_answer_is_in_view_after_an_upload_or_an_example(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(app_url)
    page.locator("input[type=file]").first.wait_for(state="attached")
    picture, answer = page.get_by_test_id("image").first.bounding_box(), page.locator("#result").bounding_box()
    assert picture["y"] < answer["y"] and picture["y"] < 844  # the upload area first, on the first screen
    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")
    page.get_by_test_id("label").get_by_text("%").first.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#verdict').getBoundingClientRect().top >= 0", timeout=10_000)
    assert _in_view(page, "#verdict") and _in_view(page, "#result")

    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(app_url)
    page.locator("#examples img").nth(3).click()  # far below the answer's place: the page must bring it into view
    page.locator("#verdict").wait_for(state="visible", timeout=60_000)
    page.wait_for_function("() => { const r = document.querySelector('#verdict').getBoundingClientRect();"
                           " return r.top >= 0 && r.bottom <= innerHeight; }", timeout=10_000)
    assert _in_view(page, "#verdict") and _in_view(page, "#heatmap")
    heatmap, label = page.locator("#heatmap").bounding_box(), page.locator("#result").bounding_box()
    assert abs(heatmap["y"] - label["y"]) < 5  # side by side, the picture with the heatmap over it next to the numbers
    page.screenshot(path=str(tmp_path / "phone.png"))


@pytest.mark.slow
def test_neither_and_the_heatmap_are_shown_and_the_heatmap_can_be_hidden(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, _noise(tmp_path))
    page.locator("#verdict").get_by_text("doesn't look like a cat or a dog").wait_for(timeout=60_000)
    assert page.get_by_test_id("label").inner_text().count("%") >= 2  # the raw answer is still below it
    heatmap = page.locator("#heatmap img")
    heatmap.first.wait_for(timeout=10_000)
    assert heatmap.first.evaluate("img => img.naturalWidth") > 0
    page.get_by_label("Show where the model looked").uncheck()
    page.locator("#heatmap").wait_for(state="hidden", timeout=10_000)

    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")  # a photo: the verdict changes
    page.wait_for_function("() => !document.body.innerText.includes(\"doesn't look like\")", timeout=60_000)
    page.get_by_label("Show where the model looked").check()
    page.locator("#heatmap img").first.wait_for(timeout=10_000)


@pytest.mark.slow
def test_on_a_phone_the_batch_results_fit_and_no_verdict_or_number_breaks(browser, app_url, tmp_path):
    long_name = tmp_path / ("a_very_long_file_name_from_a_phone_camera_" * 3 + ".jpg")
    shutil.copy(ROOT / "examples" / "chelsea_cat.jpg", long_name)
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(app_url)
    page.get_by_role("tab", name="Many pictures").click()
    page.locator("input[type=file][multiple]").first.set_input_files([str(long_name), str(_noise(tmp_path))])
    page.get_by_role("button", name="Classify all").click()
    page.locator("#batch-results td").first.wait_for(timeout=60_000)
    fits = page.evaluate("() => { const t = document.querySelector('#batch-results');"
                         " return t.getBoundingClientRect().right <= innerWidth && t.scrollWidth <= t.clientWidth; }")
    assert fits  # every column on the screen
    lines = page.evaluate("() => [...document.querySelectorAll('#batch-results td:last-child > *')]"
                          ".map(e => e.getClientRects().length)")
    assert lines and set(lines) == {1}  # each verdict and each pair of probabilities on one line, whole
    page.screenshot(path=str(tmp_path / "phone-batch.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.parametrize("width, height", [(390, 844), (1280, 900)])
def test_the_report_figures_fill_a_phone_and_no_example_caption_is_cut_off(browser, app_url, tmp_path, width, height):
    page = browser.new_page(viewport={"width": width, "height": height}, is_mobile=width < 640)
    page.goto(app_url)
    page.locator("#examples .caption-label").first.wait_for()
    cut = page.eval_on_selector_all("#examples .caption-label", "labels => labels.filter("
                                    "label => label.scrollWidth > label.clientWidth + 1).map(label => label.innerText)")
    assert cut == []
    page.get_by_text("How good is this model?").click()
    page.wait_for_function("() => [...document.querySelectorAll('#report img')].every(img => img.naturalWidth > 0)"
                           " && document.querySelectorAll('#report img').length == 3", timeout=10_000)
    widths = [page.locator("#report img").nth(index).bounding_box()["width"] for index in range(3)]
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert min(widths) >= (width / 2 if width < 640 else 200)  # one a row on a phone, three on a desktop
