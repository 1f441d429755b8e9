"""The Space in a real headless browser: Debian's chromium, driven by Playwright for Python."""

import shutil

import pytest

from conftest import ROOT
from test_app import start_app

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
