"""A real Chromium for the playground's tests: Debian's /usr/bin/chromium driven by Playwright for Python
through `executable_path` (nothing downloads a browser; `playwright install` is never run).

Without Chromium or Playwright a test is skipped, saying what to install; under CI (CI set and not false)
it fails instead, as tests/tritonenv.py does, so a CI run cannot go green by skipping the browser tests.
Screenshots go to $CHARRNN_SCREENSHOTS (`make screenshots` sets docs/img), else to a folder under the
system's temporary directory, so `make test` leaves the work tree clean.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("CHARRNN_CHROMIUM", "/usr/bin/chromium"))
# No GPU, no sandbox (CI runs as root in a container), and nothing that reaches the network on its own.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def _missing(message: str) -> None:
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message} (CI must run the browser tests, not skip them)", pytrace=False)
    pytest.skip(message)


def launch(playwright: Any) -> Any:
    """Chromium, or a skip (a failure under CI) saying what is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing: `apt-get install chromium` (Debian's package) to run the browser tests")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)


def sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        _missing("playwright is not installed: `pip install -r requirements/dev.txt`")
    return start()


def screenshots() -> Path:
    folder = Path(os.environ.get("CHARRNN_SCREENSHOTS") or Path(tempfile.gettempdir()) / "charrnn-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
