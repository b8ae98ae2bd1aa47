"""The web extension in a real browser: Debian's chromium driven by Python Playwright (no `playwright install`),
against the same real ComfyUI as test_comfy_server.py. The page loads with our extension registered and no console
errors from it; the mini chart on the trainer node draws during a run. Screenshot: $EMOLORA_ARTIFACTS (default
<repo>/output/test-artifacts/comfy_browser.png; output/ is git-ignored)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import comfy_harness as H
import pytest
from conftest import require, require_module

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("EMOLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RES = 256


def artifacts_dir() -> Path:
    path = Path(os.environ.get("EMOLORA_ARTIFACTS") or ROOT / "output" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser_page(comfy):
    require(os.path.exists(CHROMIUM), f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = require_module("playwright.sync_api", "pip install playwright (a dev requirement)")
    profile = tempfile.mkdtemp(prefix="emolora-chromium-")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                    viewport={"width": 1600, "height": 1000})
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        logs: list = []
        page.on("console", lambda m: logs.append(("console." + m.type, m.text, str(m.location))))
        page.on("pageerror", lambda e: logs.append(("pageerror", str(e), getattr(e, "stack", "") or "")))
        comfy.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
        page.goto(comfy.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensions", timeout=120_000)
        try:
            yield page, logs
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def ours(entry) -> bool:
    """An error raised by our extension's code (its file in the location or the stack), or logged by it. The
    frontend's own blocked lookups of every custom node id on api.comfy.org (offline, CSP) are not ours."""
    text = " ".join(entry).lower()
    if "api.comfy.org" in text:
        return False
    return "/extensions/emolora" in text or "emolora.js" in text or "emolora.trainer" in text


def test_page_loads_with_extension_and_no_errors_from_it(browser_page):
    page, logs = browser_page
    page.wait_for_function("() => window.app.extensions.some(e => e.name === 'emolora.trainer')", timeout=60_000)
    page.wait_for_timeout(1500)
    others = [e for e in logs if e[0] in ("console.error", "pageerror") and not ours(e)]
    if others:
        H.log(f"{len(others)} console errors not from our extension, e.g. {others[:2]}")
    errors = [e for e in logs if e[0] in ("console.error", "pageerror") and ours(e)]
    assert not errors, errors


def test_mini_chart_draws_during_a_run(browser_page, comfy, tmp_path):
    page, logs = browser_page
    data = tmp_path / "1_chart"
    data.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (RES, RES), (30 + 80 * i, 90, 160)).save(data / f"c{i}.png")
        (data / f"c{i}.txt").write_text(f"flat color {i}")
    workflow = json.loads((ROOT / "example_workflows" / "emolora_train_then_sample.json").read_text())
    overrides = {
        "EmoLoRA_Dataset": {"folder": str(tmp_path), "resolution": RES},
        "EmoLoRA_Trainer": {"ckpt_name": H.CHECKPOINT_NAME, "steps": 4, "rank": 4, "output_name": "browser"},
        "CheckpointLoaderSimple": {"ckpt_name": H.CHECKPOINT_NAME},
        "KSampler": {"steps": 1},
        "EmptyLatentImage": {"width": RES, "height": RES},
    }
    page.evaluate(
        """async ([wf, ov]) => {
            await window.app.loadGraphData(wf);
            for (const node of window.app.graph._nodes) {
                const o = ov[node.type];
                if (!o) continue;
                for (const [k, v] of Object.entries(o)) {
                    const w = (node.widgets || []).find(w => w.name === k);
                    if (!w) throw new Error(`no widget ${k} on ${node.type}`);
                    w.value = v;
                }
            }
        }""",
        [workflow, overrides],
    )
    assert page.evaluate("() => document.querySelectorAll('canvas.emolora-chart').length") >= 1
    before = page.evaluate("() => window.__emolora.draws")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => window.__emolora.last && window.__emolora.last.status === 'running'",
                           timeout=1_200_000)
    page.wait_for_function("() => window.__emolora.last && ['done', 'interrupted', 'failed']"
                           ".includes(window.__emolora.last.status)", timeout=1_200_000)
    state = page.evaluate("() => ({draws: window.__emolora.draws, events: window.__emolora.events, "
                          "last: window.__emolora.last})")
    assert state["events"] >= 2 and state["draws"] > before, state
    assert state["last"]["status"] == "done", state
    # the chart canvas has drawn a loss line: some pixels of the loss colour
    blue = page.evaluate("""() => {
        const c = document.querySelector('canvas.emolora-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 120 && d[i + 1] > 130 && d[i + 2] > 220) n++;
        return n;
    }""")
    comfy.wait_idle()  # the sampling part of the example; leaves the server idle for the next tests
    page.keyboard.press("Escape")
    page.evaluate("""() => {
        const c = window.app.canvas, n = window.app.graph._nodes.find(n => n.type === 'EmoLoRA_Trainer');
        c.ds.scale = 1.0;
        if (c.centerOnNode) c.centerOnNode(n);
        c.setDirty(true, true);
    }""")
    page.wait_for_timeout(800)
    shot = artifacts_dir() / "comfy_browser.png"
    page.screenshot(path=str(shot), full_page=False)
    H.log(f"screenshot: {shot}")
    assert blue > 20, f"no loss line on the chart ({blue} loss-coloured pixels)"
    others = [e for e in logs if e[0] in ("console.error", "pageerror") and not ours(e)]
    if others:
        H.log(f"{len(others)} console errors not from our extension, e.g. {others[:2]}")
    errors = [e for e in logs if e[0] in ("console.error", "pageerror") and ours(e)]
    assert not errors, errors
