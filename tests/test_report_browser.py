"""The report opened from disk in Debian's headless Chromium, with networking disabled.

Playwright drives the browser.

These tests need /usr/bin/chromium (Debian package ``chromium``). Without it
they are skipped, except when the CI environment variable is set, where a
missing browser fails them. The screenshot is saved under ``test-artifacts/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from nerve_cli.report import render_report
from nerve_cli.store import load_results
from tests.synthetic_results import write_synthetic_run

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SHA256 = "5e" * 32

# The flags that keep Chromium off the network: no background services, a proxy
# on a closed local port, and every host name resolving to nothing.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

ALL_PLOTS_DRAWN = """() => {
  const plots = [...document.querySelectorAll("div.plot")];
  return plots.length > 0 && plots.every((plot) => plot.querySelector("svg.main-svg"));
}"""


def require_chromium() -> None:
    """Skip without Debian's Chromium, unless CI is set, where its absence is a failure."""
    if CHROMIUM.exists():
        return
    if "CI" in os.environ:
        pytest.fail(
            f"{CHROMIUM} not found while CI is set: install it with 'apt-get install -y chromium'"
        )
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's browser with 'apt-get install -y chromium'"
    )


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    steps = (0, 10, 100, 1000, 3000)
    write_synthetic_run(
        root / "a", run="run-a", steps=steps, n_layers=6, ffn_dim=48, probe_sha256=SHA256
    )
    write_synthetic_run(
        root / "b", run="run-b", steps=steps, n_layers=6, ffn_dim=48, probe_sha256=SHA256, seed=1
    )
    runs = [load_results(root / "a"), load_results(root / "b")]
    return render_report(runs, root / "report.html")


@pytest.fixture(scope="module")
def opened_page(report_file):
    """Open the report and record every request, console message and page error."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    url = report_file.resolve().as_uri()
    events = {"requests": [], "console": [], "errors": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("request", lambda request: events["requests"].append(request.url))
        page.on("console", lambda message: events["console"].append((message.type, message.text)))
        page.on("pageerror", lambda error: events["errors"].append(str(error)))
        # Any request other than the file is recorded, then aborted locally.
        page.route(
            "**/*", lambda route: route.continue_() if route.request.url == url else route.abort()
        )

        page.goto(url)
        page.wait_for_function(ALL_PLOTS_DRAWN, timeout=60_000)
        yield page, url, events
        browser.close()


@pytest.mark.browser
def test_no_console_errors(opened_page):
    _, _, events = opened_page

    errors = [text for kind, text in events["console"] if kind == "error"]
    assert errors == []
    assert events["errors"] == []


@pytest.mark.browser
def test_no_network_requests(opened_page):
    _, url, events = opened_page

    assert events["requests"] == [url]


@pytest.mark.browser
def test_every_plot_rendered_svg(opened_page):
    page, _, _ = opened_page

    n_plots = page.locator("div.plot").count()
    n_drawn = page.locator("div.plot:has(svg.main-svg)").count()

    # Comparison overlay, then per run: 4 trajectories, 4 heatmaps, last step and scree.
    assert n_plots == 1 + 2 * 10
    assert n_drawn == n_plots


@pytest.mark.browser
def test_metadata_table_shows_probe_sha256(opened_page):
    page, _, _ = opened_page

    table_text = page.locator("#runs table").inner_text()

    assert SHA256 in table_text
    assert "probe sha256" in table_text


@pytest.mark.browser
def test_heatmap_hover_names_run_step_layer(opened_page):
    page, _, _ = opened_page
    heatmap = page.locator("section#run-1 div.plot").nth(4)
    heatmap.scroll_into_view_if_needed()
    box = heatmap.locator(".nsewdrag").first.bounding_box()

    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    hover = page.locator(".hoverlayer .hovertext").first
    hover.wait_for(timeout=5_000)
    text = hover.text_content()

    assert "run run-a" in text
    assert "step 0" in text
    assert "layer 5" in text
    assert "JS" in text


@pytest.mark.browser
def test_screenshot_saved(opened_page):
    page, _, _ = opened_page
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "report.png"

    top = ARTIFACTS / "report-top.png"

    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    page.screenshot(path=str(top))

    assert path.stat().st_size > 10_000
    assert top.stat().st_size > 10_000


def test_missing_chromium_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "chromium")
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="not found"):
        require_chromium()


def test_missing_chromium_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_chromium()
