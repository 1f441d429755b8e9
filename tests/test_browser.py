"""The Space in a real headless browser: Debian's chromium, driven by Playwright for Python."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, start_app

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


@pytest.mark.slow
def test_upload_through_the_page_shows_both_percentages(browser, trained_model, tmp_path):
    url, process = start_app(str(trained_model), tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_text("Model", exact=False).first.wait_for()
        assert "test accuracy" in page.locator("#model-panel").inner_text()
        # The page's own file input, as a drag-and-drop or click-to-upload would fill it.
        page.locator("input[type=file]").first.set_input_files(str(ROOT / "examples" / "chelsea_cat.jpg"))
        label = page.get_by_test_id("label")
        label.get_by_text("%").first.wait_for(timeout=60_000)
        text = label.inner_text()
        assert "cat" in text and "dog" in text and text.count("%") >= 2, text
        page.screenshot(path=str(tmp_path / "prediction.png"), full_page=True)
        assert (tmp_path / "prediction.png").stat().st_size > 10_000

        # A fresh page: clicking the example photo alone fills the input and shows a prediction.
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator(".gallery-item, button.gallery-item, [data-testid='examples'] img").first.click()
        page.get_by_test_id("label").get_by_text("%").first.wait_for(timeout=60_000)
        assert page.get_by_test_id("label").inner_text().count("%") >= 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def _upload(page, path):
    page.locator("input[type=file]").first.set_input_files(str(path))


@pytest.mark.slow
def test_a_bad_upload_is_explained_next_to_the_picture_until_the_next_one(browser, app_url, tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, tmp_path / "notes.jpg")
    status = page.locator("#upload-status")
    status.get_by_text("Cannot read this file").wait_for(timeout=60_000)
    page.wait_for_timeout(16_000)  # longer than a toast lives
    assert "not an image that can be read" in status.inner_text()
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
    page.get_by_text("The file is too large").first.wait_for(state="attached", timeout=90_000)
    text = page.locator("body").inner_text()
    assert "huge.png" in text and "chelsea_cat.jpg" in text
    # The CSV box appears only now, with the file named for what it is (Gradio shows "name" and ".csv" apart).
    page.wait_for_function("() => document.body.innerText.includes('catdog-predictions')", timeout=10_000)


@pytest.mark.slow
def test_on_a_phone_the_result_is_in_view_after_an_upload(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(app_url)
    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")
    label = page.get_by_test_id("label")
    label.get_by_text("%").first.wait_for(timeout=60_000)
    box = page.locator("#result").bounding_box()
    page.screenshot(path=str(tmp_path / "phone.png"))
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 844, box


@pytest.mark.slow
def test_neither_and_the_heatmap_are_shown_and_the_heatmap_can_be_hidden(browser, app_url, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(noise)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    _upload(page, noise)
    page.locator("#verdict").get_by_text("doesn't look like a cat or a dog").wait_for(timeout=60_000)
    assert page.get_by_test_id("label").inner_text().count("%") >= 2  # the raw answer is still below it
    heatmap = page.locator("#heatmap img")
    heatmap.first.wait_for(timeout=10_000)
    assert heatmap.first.evaluate("img => img.naturalWidth") > 0
    page.get_by_label("Show where the model looked").uncheck()
    page.locator("#heatmap").wait_for(state="hidden", timeout=10_000)

    _upload(page, ROOT / "examples" / "chelsea_cat.jpg")  # a photo: the verdict goes away
    page.wait_for_function("() => !document.body.innerText.includes(\"doesn't look like\")", timeout=60_000)
    page.get_by_label("Show where the model looked").check()
    page.locator("#heatmap img").first.wait_for(timeout=10_000)
