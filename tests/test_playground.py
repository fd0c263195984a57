"""The playground page (``GET /`` of slm-serve) in a real browser: Debian's chromium, headless,
driven by Selenium through Debian's chromedriver (``scripts/install.sh test`` installs both
where apt is available; without them the test skips and says why)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(os.environ.get("SLM_TEST_ARTIFACTS", "artifacts/test")) / "playground.png"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium / chromedriver on this machine (Debian: apt-get install "
                    "chromium chromium-driver; scripts/install.sh test does where apt works)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(trained_export, serving, browser):
    with serving(trained_export, "--backend", "ort", "--max-batch", "4") as server:
        browser.get(server.url + "/")
        yield browser


def _wait_idle(driver, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element("tag name", "body")
                                         .get_attribute("data-state") == "idle")


def _set(driver, field: str, value: str) -> None:
    box = driver.find_element("id", field)
    box.clear()
    box.send_keys(value)


def test_the_page_streams_generate_pys_greedy_text(page, trained_export):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from slm_export.cli.generate import main

    WebDriverWait(page, 30).until(lambda d: "backend ort" in d.find_element("id", "served").text)
    served = page.find_element("id", "served").text
    assert "variant fp32" in served and "device cpu" in served
    for control in ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "greedy",
                    "ignore_eos", "api_key"):
        label = page.find_element("css selector", f"label[for={control}]")  # every control labelled
        assert label.text
    prompt = "The little dog saw a big red ball and"
    _set(page, "prompt", prompt)
    _set(page, "max_tokens", "60")
    page.find_element("id", "greedy").click()
    page.find_element("id", "ignore_eos").click()  # logit_bias: <|endoftext|> never drawn
    page.find_element("id", "generate").click()
    _wait_idle(page)
    text = page.find_element("id", "completion").text
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--backend", "ort", "--model", str(trained_export), "--prompt", prompt,
                     "--greedy", "--max-new-tokens", "60", "--logit-bias", "50256=-100",
                     "--no-stream", "--device", "cpu"]) == 0
    assert prompt + text == out.getvalue().rstrip("\n")  # the page shows what generate.py prints
    assert page.find_element("id", "status").text.startswith("done")
    assert page.find_element("id", "ttft").text.endswith("ms")
    assert int(page.find_element("id", "count").text) == 60
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(SCREENSHOT))
    # Ctrl+Enter generates too.
    page.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    _wait_idle(page)
    assert page.find_element("id", "completion").text == text


def test_stop_ends_a_stream_and_a_bad_value_shows_the_servers_error(page):
    from selenium.webdriver.support.ui import WebDriverWait

    page.find_element("id", "greedy").click()  # off again (and past the end of a story: on)
    _set(page, "max_tokens", "250")
    _set(page, "temperature", "0.8")
    page.find_element("id", "generate").click()
    WebDriverWait(page, 30).until(lambda d: len(d.find_element("id", "completion").text) > 5)
    page.find_element("id", "stop").click()
    _wait_idle(page)
    assert page.find_element("id", "status").text == "stopped"
    assert int(page.find_element("id", "count").text) < 250
    _set(page, "temperature", "-1")
    page.find_element("id", "generate").click()
    _wait_idle(page)
    error = page.find_element("id", "error")
    assert error.is_displayed() and "'temperature' must be >= 0" in error.text
    assert page.find_element("id", "status").text == "error"
