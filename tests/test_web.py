"""`asymlora web` in a real browser: headless Chromium picks a built-in test image, asks about it, and both the
base model's and the adapter's answers (and the router's expert load) appear on the page."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from train_fixtures import train_setup

if importlib.util.find_spec("gradio") is None:  # the server imports it; this process need not
    pytest.skip("the web extra is not installed (pip install 'asymlora[web]')", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

SRC = Path(__file__).parent.parent / "src"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Chromium and chromedriver (Debian: apt-get install chromium "
                                       "chromium-driver)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"asymlora web exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"asymlora web did not serve {url} within {timeout} s")


def _browser(profile: str):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_answers_with_base_model_and_adapter_side_by_side(tmp_path, isolated_cache):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from asymlora.builtin_data import build
    from asymlora.inference import load_pipeline
    from asymlora.train import TrainConfig, run_training
    from asymlora.web import ask, builtin_examples

    run = run_training(TrainConfig.from_dict(train_setup(tmp_path, max_steps=2, save_steps=100)))  # router-gated
    build("ocr", max_per_split=2)  # built-in test images for the picker (rendered text: no download)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asymlora.cli", "web", "--adapter", str(run), "--port", str(port),
                             "--max-new-tokens", "8"], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    driver = None
    try:
        # What the page must show, computed here while the server starts: the first built-in example.
        image, question, _ = builtin_examples()[0]
        base, adapted, load = ask(load_pipeline(run, keep_base=True), image, "router", question, max_new_tokens=8)
        assert base != adapted  # the page's two answers are told apart below
        _wait_for(f"http://127.0.0.1:{port}/", proc, timeout=90)
        driver = _browser(profile)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30)
        first_example = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#builtin-images tr.tr-body"))
        first_example.click()
        question_box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
        wait.until(lambda d: question_box.get_attribute("value") == question)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()

        def shown(selector: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("value")

        wait.until(lambda d: shown("#base-answer textarea") and shown("#adapter-answer textarea"))
        assert shown("#base-answer textarea") == base
        assert shown("#adapter-answer textarea") == adapted
        load_text = driver.find_element(By.CSS_SELECTOR, "#expert-load").text
        assert "Expert load of the adapter's answer" in load_text
        shares = [row.split("|")[2].strip() for row in load.splitlines() if row.startswith("| ") and "%" in row]
        assert len(shares) == 2 and all(share in load_text for share in shares)  # two experts
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
