"""report.html and heatmap.html in a real browser: headless Chromium (Debian's, driven by Playwright).

Playwright rather than Selenium: one pip package with no driver binary to match to the browser's version, a
browser it launches from ``executable_path`` (Debian's /usr/bin/chromium: no browser download), console
messages and page errors as events, and frames (the heatmap's iframe) as first-class objects. Under ``CI=true``
(``.ci/run``) a missing browser or Playwright fails the test; elsewhere it is skipped naming the install command.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

INSTALL = "apt-get install chromium (make browser does it) and pip install playwright (the test extra)"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test under CI: {reason}; {INSTALL}")
    pytest.skip(f"{reason}: {INSTALL}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    executable = _chromium()
    if executable is None:
        _missing("no chromium on PATH")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=executable, headless=True,
                                                       args=FLAGS, offline=True)
        yield context
        context.close()


@pytest.fixture(scope="module")
def report(small_report_run):
    return small_report_run[1]


def _open(browser, path: Path):
    """The page with every console error and uncaught exception collected (and any request leaving file://)."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request: {r.url}")
            if not r.url.startswith(("file:", "data:", "about:")) else None)
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def _colours(frame) -> list[str]:
    return frame.eval_on_selector_all(".seq .t", "els => els.map(e => getComputedStyle(e).backgroundColor)")


def _check_selector_recolours(frame) -> None:
    """Choosing another method in the heatmap's selector changes the tokens' colours."""
    options = frame.eval_on_selector_all("#method option", "els => els.map(e => e.value)")
    assert len(options) >= 2
    before = _colours(frame)
    assert before and any(c not in ("", "rgba(0, 0, 0, 0)") for c in before)
    current = frame.eval_on_selector("#method", "e => e.value")
    other = next(o for o in options if o not in (current, "sft"))
    frame.select_option("#method", other)
    assert _colours(frame) != before


def test_report_renders_sorts_and_recolours(browser, report):
    page, problems = _open(browser, report / "report.html")
    # every image decoded with a size
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
    assert len(sizes) == 4 and all(done and w > 100 and h > 100 for done, w, h in sizes)
    # every table has rows and is laid out (not zero-sized), the closed <details> ones aside
    tables = page.eval_on_selector_all("table", "els => els.map(t => [t.rows.length, !!t.closest('details'), "
                                                "t.getBoundingClientRect().height])")
    assert tables and all(rows > 1 and (hidden or height > 0) for rows, hidden, height in tables)
    # sorting: click a metric heading, the column's values come in order; again, the reverse
    header = page.locator("#main-table thead th", has_text="AUROC")
    column = page.eval_on_selector_all("#main-table thead th", "els => els.map(e => e.textContent)").index("AUROC")
    values = f"rows => rows.map(r => parseFloat(r.cells[{column}].getAttribute('data-v')))"
    header.click()
    ascending = page.eval_on_selector_all("#main-table tbody tr", values)
    assert ascending == sorted(ascending) and len(set(ascending)) > 1
    header.click()
    assert page.eval_on_selector_all("#main-table tbody tr", values) == sorted(ascending, reverse=True)
    # the heatmap inside the page: its own frame
    frame = next(f for f in page.frames if f != page.main_frame)
    _check_selector_recolours(frame)
    assert problems == []


def test_heatmap_page_recolours(browser, report):
    page, problems = _open(browser, report / "heatmap.html")
    _check_selector_recolours(page)
    assert problems == []
