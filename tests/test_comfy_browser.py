"""The web extension in a real browser: Debian's chromium driven by Python Playwright (no `playwright install`),
against the same real ComfyUI as test_comfy_server.py. The page loads with our extension registered and no console
errors from it; one short training queued from the page draws the mini chart, puts the sample preview on the node,
and the EmoLoRA sidebar tab shows the panel with the run's live step counter. Screenshot: $EMOLORA_ARTIFACTS (default
<repo>/output/test-artifacts/comfy_browser.png; output/ is git-ignored)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import comfy_harness as H
import pytest
from conftest import doc_image, require, require_module

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("EMOLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RES = 128  # the cheapest size that still exercises buckets, the VAE and every UNet level
STEPS = 4  # long enough to outlast the panel's first start (~5 s on 2 cores): the frame must see it running


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


def test_picking_an_optimizer_or_a_preset_fills_real_values(browser_page):
    """No sentinels: a pick on the Optimizer node fills that optimizer's own values (from /emolora/defaults), a
    training preset on the Trainer fills the Trainer's widgets and the linked Training Options and Dataset nodes'."""
    page, _ = browser_page
    workflow = json.loads((ROOT / "example_workflows" / "emolora_train_then_sample.json").read_text())
    got = page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf);
            const nodes = window.app.graph._nodes;
            const byType = (t) => nodes.find(n => n.type === t);
            const w = (n, name) => n.widgets.find(x => x.name === name);
            const pick = (n, name, value) => { const x = w(n, name); x.value = value; x.callback?.(value); };
            const sleep = () => new Promise(r => setTimeout(r, 50));
            const until = async (f) => { for (let i = 0; i < 200 && !f(); i++) await sleep(); };
            const opt = byType('EmoLoRA_Optimizer'), tr = byType('EmoLoRA_SDXLTrainer'), ds = byType('EmoLoRA_Dataset');
            const op = window.LiteGraph.createNode('EmoLoRA_TrainingOptions');
            window.app.graph.add(op);
            op.connect(0, tr, tr.inputs.findIndex(i => i.name === 'options'));
            const values = (n, names) => Object.fromEntries(names.map(k => [k, w(n, k).value]));
            const names = ['lr', 'beta1', 'beta2', 'weight_decay', 'trust_level', 'emopulse_scale'];
            const shown = values(opt, names);
            pick(opt, 'optimizer', 'AdamW');
            await until(() => w(opt, 'beta2').value === 0.999);
            const adamw = values(opt, names);
            pick(opt, 'optimizer', 'AutoTrustGO');
            pick(opt, 'preset', 'autotrustgo-bold');
            await until(() => w(opt, 'trust_level').value === 0.5);
            const bold = values(opt, names);
            pick(opt, 'optimizer', 'EmoSens');  // a preset of another optimizer goes back to auto
            await until(() => w(opt, 'preset').value.startsWith('auto'));
            const sens = {preset: w(opt, 'preset').value, ...values(opt, names)};
            w(ds, 'resolution').value = 256;
            pick(tr, 'preset', 'style');
            await until(() => w(tr, 'rank').value === 32);
            return {shown, adamw, bold, sens, trainer: values(tr, ['rank', 'steps']),
                    options: values(op, ['alpha', 'save_every']), dataset: values(ds, ['resolution', 'flip_aug'])};
        }""", workflow)
    assert got["shown"]["lr"] == 6e-05 and got["shown"]["beta2"] == 0.995, got  # EmoNavi's, as saved
    assert got["adamw"] == {**got["adamw"], "lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01}, got
    assert got["bold"]["trust_level"] == 0.5 and got["bold"]["lr"] == 1e-4, got
    assert got["sens"]["preset"].startswith("auto") and got["sens"]["emopulse_scale"] == 1.0, got
    assert got["trainer"] == {"rank": 32, "steps": 2000}, got
    assert got["options"] == {"alpha": 16, "save_every": 250}, got
    assert got["dataset"] == {"resolution": 1024, "flip_aug": True}, got


def test_workflows_saved_with_the_v0_1_0_trainer_load_with_the_same_values(browser_page):
    """The real frontend loads a workflow saved from the v0.1.0 Trainer (every widget off its default; positional
    widgets_values) and the v0.1.0 example: no missing node, and the prompt it queues gives the Trainer exactly the
    inputs the v0.1.0 frontend queued (tests/data/trainer_v0.1.0_prompt.json)."""
    page, logs = browser_page
    data = ROOT / "tests" / "data"
    seen = len(logs)
    saved = json.loads((data / "trainer_v0.1.0_prompt.json").read_text())
    got = page.evaluate(
        """async ([wf, example]) => {
            const out = {};
            for (const [key, graph] of [['saved', wf], ['example', example]]) {
                await window.app.loadGraphData(graph);
                const missing = window.app.graph._nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]);
                const prompt = (await window.app.graphToPrompt()).output;
                out[key] = {missing: missing.map(n => n.type), prompt};
            }
            return out;
        }""", [json.loads((data / "trainer_v0.1.0_workflow.json").read_text()),
               json.loads((data / "example_v0.1.0_workflow.json").read_text())])
    assert got["saved"]["missing"] == [] and got["example"]["missing"] == [], got
    invalid = [e for e in logs[seen:] if "invalid workflow" in e[1].lower()]
    assert not invalid, invalid  # the frontend's schema check accepts both files
    assert got["saved"]["prompt"]["3"]["class_type"] == "EmoLoRA_Trainer"
    inputs = got["saved"]["prompt"]["3"]["inputs"]
    assert {k: inputs.get(k) for k in saved["3"]["inputs"]} == saved["3"]["inputs"]
    # Options added after v0.1.0 are appended to the legacy node: an old workflow gets their defaults.
    assert {k: v for k, v in inputs.items() if k not in saved["3"]["inputs"]} == {
        "oft_rescale": False, "base_dtype": "auto", "offload": "none", "optimizer_loss": "raw", "resume": "none"}
    trainer = next(v["inputs"] for v in got["example"]["prompt"].values() if v["class_type"] == "EmoLoRA_Trainer")
    assert (trainer["network"], trainer["rank"], trainer["steps"], trainer["sample_every"], trainer["output_name"]) \
        == ("lora", 16, 500, 100, "emolora"), trainer


# The graph nodes of the example's sampling branch: the server test runs them; here they are muted, so this test's
# one run is the training alone (it proves the browser side: chart, preview, sidebar panel).
SAMPLING_BRANCH = ("CheckpointLoaderSimple", "EmoLoRA_LoadTrainedLoRA", "CLIPTextEncode", "EmptyLatentImage",
                   "KSampler", "VAEDecode", "SaveImage")


def test_a_run_draws_the_chart_shows_previews_and_the_sidebar_panel_follows_it(browser_page, comfy, tmp_path):
    """One short training queued from the page: the mini chart draws, the preview lands on the node, and the
    EmoLoRA sidebar tab opens the panel that shows the run's live step counter."""
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
        "EmoLoRA_SDXLTrainer": {"ckpt_name": H.CHECKPOINT_NAME, "steps": STEPS, "rank": 4, "output_name": "browser",
                                "sample_every": 2},
        "EmoLoRA_TrainingOptions": {"sample_size": 64, "sample_steps": 1, "gradient_checkpointing": False},
    }
    trainer_id = page.evaluate(
        """async ([wf, ov, muted]) => {
            await window.app.loadGraphData(wf);
            const tr = window.app.graph._nodes.find(n => n.type === 'EmoLoRA_SDXLTrainer');
            const op = window.LiteGraph.createNode('EmoLoRA_TrainingOptions');  // the options a cheap run needs
            op.pos = [tr.pos[0], tr.pos[1] + tr.size[1] + 60];
            window.app.graph.add(op);
            op.connect(0, tr, tr.inputs.findIndex(i => i.name === 'options'));
            let trainer = null;
            for (const node of window.app.graph._nodes) {
                if (muted.includes(node.type)) node.mode = 2;  // never: left out of the prompt
                if (node.type === 'EmoLoRA_SDXLTrainer') trainer = node.id;
                const o = ov[node.type];
                if (!o) continue;
                for (const [k, v] of Object.entries(o)) {
                    const w = (node.widgets || []).find(w => w.name === k);
                    if (!w) throw new Error(`no widget ${k} on ${node.type}`);
                    w.value = v;
                }
            }
            // note every preview the frontend puts on the trainer node while it runs
            window.__previewSeen = 0;
            window.__previewWatch = setInterval(() => {
                const p = window.app.nodePreviewImages || {};
                if (p[String(trainer)] && p[String(trainer)].length) window.__previewSeen += 1;
            }, 50);
            return trainer;
        }""",
        [workflow, overrides, list(SAMPLING_BRANCH)],
    )
    assert page.evaluate("() => document.querySelectorAll('canvas.emolora-chart').length") >= 1
    # the sidebar tab is registered and its button is in the side toolbar
    tab = page.locator(".emolora-panel-tab-button")
    tab.wait_for(state="visible", timeout=60_000)
    before = page.evaluate("() => window.__emolora.draws")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => window.__emolora.last && window.__emolora.last.status === 'running'",
                           timeout=600_000)
    tab.click()  # first open: starts the panel (POST /emolora/panel) and embeds it
    iframe = page.locator("iframe.emolora-panel-frame")
    iframe.wait_for(state="attached", timeout=120_000)
    frame = iframe.element_handle().content_frame()
    live = frame.wait_for_function(
        """() => {
            const step = document.querySelector('#emolora-step');
            const st = document.querySelector('#emolora-run-status');
            return step && st && st.dataset.status === 'running' && Number(step.dataset.step) >= 1
                && [Number(step.dataset.step), document.querySelector('.emo-big')?.parentElement?.innerText || ''];
        }""", timeout=300_000).json_value()
    doc_image(page.locator(".emolora-sidebar").first.screenshot(), "sidebar.png", max_width=480)
    run_name = page.evaluate("() => window.__emolora.run")
    assert run_name and run_name in live[1], (run_name, live)
    page.wait_for_function("() => window.__emolora.last && ['done', 'interrupted', 'failed']"
                           ".includes(window.__emolora.last.status)", timeout=600_000)
    state = page.evaluate("() => ({draws: window.__emolora.draws, events: window.__emolora.events, "
                          "last: window.__emolora.last, samples: window.__emolora.samples})")
    assert state["events"] >= 2 and state["draws"] > before, state
    assert state["last"]["status"] == "done", state
    assert state["samples"] == STEPS // 2, state  # sample_every 2
    comfy.wait_idle()  # the telemetry plot after the trainer
    page.wait_for_timeout(300)
    previews = page.evaluate("() => { clearInterval(window.__previewWatch); return window.__previewSeen; }")
    assert previews > 0, "the sample preview never reached the trainer node"
    outputs = page.evaluate("(id) => window.app.nodeOutputs[String(id)]", trainer_id)
    assert outputs and len(outputs["images"]) == 1, outputs  # the last set stays on the node
    # the chart canvas has drawn a loss line: some pixels of the loss colour
    blue = page.evaluate("""() => {
        const c = document.querySelector('canvas.emolora-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 120 && d[i + 1] > 130 && d[i + 2] > 220) n++;
        return n;
    }""")
    page.keyboard.press("Escape")
    page.evaluate("""() => {
        const c = window.app.canvas, n = window.app.graph._nodes.find(n => n.type === 'EmoLoRA_SDXLTrainer');
        c.ds.scale = 1.0;
        if (c.centerOnNode) c.centerOnNode(n);
        c.setDirty(true, true);
    }""")
    page.wait_for_timeout(500)
    shot = artifacts_dir() / "comfy_browser.png"
    page.screenshot(path=str(shot), full_page=False)
    H.log(f"screenshot: {shot}")
    if os.environ.get("EMOLORA_DOC_IMAGES"):
        tab.click()  # the sidebar closed: the docs' picture of the graph shows the nodes
        page.wait_for_timeout(500)
        doc_image(page.screenshot(full_page=False), "comfy_graph.png", max_width=960)
    doc_image(page.locator("canvas.emolora-chart").first.screenshot(), "live_chart.png", max_width=480)
    assert blue > 20, f"no loss line on the chart ({blue} loss-coloured pixels)"
    others = [e for e in logs if e[0] in ("console.error", "pageerror") and not ours(e)]
    if others:
        H.log(f"{len(others)} console errors not from our extension, e.g. {others[:2]}")
    errors = [e for e in logs if e[0] in ("console.error", "pageerror") and ours(e)]
    assert not errors, errors
