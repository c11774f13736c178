"""Chapter 7's widgets in a real browser: JupyterLab on loopback, the notebook run in headless
Chromium (Debian's package, driven by Playwright with the system browser), a slider moved, and the
output checked to change. A screenshot is kept in build/test-artifacts/.

`bash scripts/workbook.sh test` installs Debian's Chromium where it can (as root, or with
passwordless sudo). Where CI runs it (CI=true) or LABKIT_BROWSER_TEST=1 is set, a missing browser
fails the test; elsewhere the test is skipped with a message saying how to enable it.
About 3 minutes on 2 CPU cores (the notebook itself takes most of it)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "07_rank_alpha_lab.ipynb"
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM = os.environ.get("LABKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("LABKIT_BROWSER_TEST") == "1" or os.environ.get("CI") == "true"
HOW = ("to run it, install Chromium (Debian/Ubuntu: `sudo apt-get install chromium`) or set LABKIT_CHROMIUM "
       "to a Chromium binary; LABKIT_BROWSER_TEST=1 makes a missing browser an error")
# Without the background-networking flags, Chromium keeps trying Google's hosts on a closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _need(ok, why):
    if not ok:
        if REQUIRED:
            pytest.fail(f"{why} (the browser test is required here, CI=true or LABKIT_BROWSER_TEST=1: "
                        "`bash scripts/workbook.sh test` installs Chromium with apt as root)")
        pytest.skip(f"{why}: {HOW}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of the chapter (so nothing in notebooks/ is saved over): (url, folder)."""
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}")
    try:
        import playwright  # noqa: F401
    except ImportError:
        _need(False, "playwright is not installed")
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)
    news = tmp_path / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')          # no "Jupyter news?" pop-up over the screenshots
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "labkit-browser-test"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
           f"--LabApp.user_settings_dir={tmp_path / '.settings'}", f"--LabApp.workspaces_dir={tmp_path / '.workspaces'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                     # CI machines run as root
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("JupyterLab did not answer within 120 s")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_chapter7_widgets_respond_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright
    url, folder = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(url)
            page.get_by_text("| Idle").wait_for(timeout=120_000)            # the kernel has started
            page.click('.lm-MenuBar-item:has-text("Run")')
            page.click('li[data-command="runmenu:run-all"]')
            page.wait_for_function("""() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)); }""",
                                   timeout=600_000)                              # every cell has run

            # no cell raised: save, and read the outputs JupyterLab received
            page.keyboard.press("Control+s")
            page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
            cells = json.loads((folder / NOTEBOOK).read_text())["cells"]
            errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
            assert not errors, f"cells raised in the browser: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"
            assert sum(c["cell_type"] == "code" and bool(c.get("outputs")) for c in cells) > 10

            # explorer 1: move the rank slider one step with the keyboard, as a reader would
            box = page.locator(".widget-vbox").filter(has_text="Low-rank explorer").first
            box.scroll_into_view_if_needed()
            summary = box.locator(".widget-html-content").filter(has_text="at r =")
            # text_content, not inner_text: JupyterLab skips rendering cells off screen, and an
            # unrendered element has no inner text
            before, image_before = summary.text_content(), box.locator("img").get_attribute("src")
            assert "at r = 8" in before
            box.locator(".widget-slider").filter(has_text="rank r").locator(".noUi-handle").focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')].some("
                                   "e => e.textContent.includes('at r = 9:'))", timeout=60_000)
            after = summary.text_content()
            assert "at r = 9" in after and after != before
            page.wait_for_function("(old) => [...document.querySelectorAll('.widget-vbox img')].every(i => i.src !== old)",
                                   arg=image_before, timeout=60_000)             # the figure was redrawn
            box.screenshot(path=str(ARTIFACTS / "ch7_lowrank_explorer.png"))

            # explorer 2: the rsLoRA switch changes which cached run is shown
            knobs = page.locator(".widget-vbox").filter(has_text="Rank / alpha explorer").first
            knobs.scroll_into_view_if_needed()
            text = knobs.locator(".widget-html-content").filter(has_text="scaling")
            old = text.text_content()
            knobs.locator(".widget-checkbox input").check()
            page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')].some("
                                   "e => e.textContent.includes('lr=0.002 rs: scaling 2,'))", timeout=60_000)
            new = text.text_content()
            assert new != old and "cache:" in new
            knobs.screenshot(path=str(ARTIFACTS / "ch7_rank_alpha_explorer.png"))
        finally:
            page.screenshot(path=str(ARTIFACTS / "ch7_browser.png"))
            browser.close()
