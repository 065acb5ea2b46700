"""A real headless Chromium for the tests that look at a page: Debian's chromium
(`make browser` installs it), driven by Playwright; `playwright install` is never
needed. The `tab` fixture (tests/conftest.py) opens one tab and records what went
wrong in it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        pytest.fail("no chromium: run `make browser`, or `apt-get install chromium`")
    return found


@dataclass
class Tab:
    """A browser tab, and what went wrong in it: script errors, and every request it made."""

    page: Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def open_tab(width: int = 1440, height: int = 1000) -> Iterator[Tab]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            found = Tab(browser.new_page(viewport={"width": width, "height": height}))
            found.page.on("pageerror", lambda exc: found.errors.append(str(exc)))
            found.page.on(
                "console",
                lambda msg: found.errors.append(msg.text) if msg.type == "error" else None,
            )
            found.page.on("request", lambda request: found.requests.append(request.url))
            yield found
        finally:
            browser.close()
