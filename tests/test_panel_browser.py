"""The panel in a real browser (Playwright + Debian's chromium) while tiny-model trainings run.

Two runs of the EmoSens line with a huge stopcoef, so that should_stop (the ESP rule) rises after ~37 steps:
  auto-on   trains in a thread of this process (as a ComfyUI run), started with auto_stop 'mark'; the panel
            turns auto-stop on, so the run ends at the step where should_stop rose.
  auto-off  trains in another process (`python -m trainer train`, as a CLI run), started with --auto-stop stop;
            the panel turns auto-stop off, so the run goes on past the rise, until the panel's Stop button
            ends it and the LoRA is written.
The screenshot's path is printed in the test log (EMOLORA_ARTIFACTS, else the pytest temp folder).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import require, require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")
playwright_api = require_module("playwright.sync_api", "pip install playwright (requirements-dev.txt)")

from _trainer_helpers import make_dataset  # noqa: E402

from trainer.cli import load_pack  # noqa: E402
from trainer.runstore import RunStore  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("EMOLORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
RUN_OPTIONS = {"optimizer": "EmoSens", "optimizer_args": {"stopcoef": 1000.0}, "steps": 400, "resolution": 128,
               "bucket_step": 32, "rank": 4, "batch_size": 2, "device": "cpu", "gradient_checkpointing": False,
               "cache_latents": "memory", "cache_text": "memory", "save_dtype": "fp16"}

require(os.path.exists(CHROMIUM), f"no chromium at {CHROMIUM} (apt-get install chromium)")
load_pack()  # the panel is part of the pack (it imports the trainer relatively)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, interval: float = 0.2, shown=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f"; shown: {shown()}" if shown else ""))


def _control(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "control.json").read_text())
    except (OSError, ValueError):
        return {}


def _rises(run_dir: Path) -> list:
    from trainer.runstore import RunReader

    r = RunReader(run_dir)
    try:
        return [e["step"] for e in r.events(kind="should_stop") if (e["data"] or {}).get("value")]
    finally:
        r.close()


def _meta(run_dir: Path) -> dict:
    from trainer.runstore import RunReader

    r = RunReader(run_dir)
    try:
        return r.meta()
    finally:
        r.close()


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    import emolora.web.panel as panel_module

    from trainer.model import tiny_model_path

    out = tmp_path_factory.mktemp("panel-output")
    datasets = tmp_path_factory.mktemp("datasets")
    make_dataset(datasets / "photos", n=2)
    url = panel_module.launch(out, port=_free_port(), model_roots=[Path(tiny_model_path()).parent],
                              data_roots=[datasets])
    assert url.startswith("http://127.0.0.1:")
    assert panel_module.launch(tmp_path_factory.mktemp("other")) == url  # one panel per process
    return out, url, datasets


@pytest.fixture(scope="module")
def page(panel, tmp_path_factory):
    _, url, _ = panel
    external = []
    with playwright_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                   executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 1500})
        pg = ctx.new_page()
        origin = url.rstrip("/")
        pg.on("request", lambda r: None if r.url.startswith((origin, "data:", "blob:")) else external.append(r.url))
        pg.external_requests = external
        pg.set_default_timeout(30_000)
        pg.goto(url)
        pg.wait_for_selector("#emolora-step")
        yield pg
        ctx.close()


def _panel_step(pg, run_name: str) -> int:
    """The step the panel shows, when it shows run_name (else -1)."""
    status = pg.locator("#emolora-status").inner_text()
    if run_name not in status:
        return -1
    return int(pg.locator("#emolora-step").get_attribute("data-step") or -1)


def test_panel_follows_and_controls_live_runs(panel, page, tmp_path, request):
    out, url, _ = panel
    from trainer.config import build_config
    from trainer.model import tiny_model_path
    from trainer.train import train

    model = tiny_model_path()
    dataset = make_dataset(tmp_path / "data", n=4)
    runs = out / "runs"
    t0 = time.monotonic()

    # ---- 1. a run in a thread of this process; the panel turns auto-stop ON -> it ends where should_stop rose
    cfg = build_config(overrides={**RUN_OPTIONS, "model": model, "data": str(dataset), "run_name": "auto-on",
                                  "output": str(out / "auto-on.safetensors"), "runs_dir": str(runs),
                                  "auto_stop": "mark", "sample_every": 10, "sample_prompts": ["a red blob"],
                                  "sample_steps": 2, "sample_size": 64})
    result = {}
    th = threading.Thread(target=lambda: result.update(r=train(cfg)), daemon=True)
    th.start()
    _wait(lambda: _panel_step(page, "auto-on") >= 1, 90, "the panel to show run auto-on training")
    box = page.locator("#emolora-autostop input[type=checkbox]")
    _wait(lambda: not box.is_checked(), 10, "the auto-stop box to show the run's mode (mark)")
    box.check()
    _wait(lambda: _control(runs / "auto-on").get("auto_stop") == "stop", 10, "control.json auto_stop=stop")
    assert not _rises(runs / "auto-on"), "should_stop rose before the panel could switch auto-stop on"
    th.join(180)
    assert not th.is_alive()
    res = result["r"]
    rise = _rises(runs / "auto-on")
    assert res.stop_reason == "should_stop" and rise and res.steps_done == rise[0] < cfg.steps
    assert Path(res.lora_path).is_file()
    _wait(lambda: "should_stop" in page.locator("#emolora-run-status").inner_text(), 15,
          "the panel to show the run stopped by should_stop")
    page.wait_for_selector("#emolora-samples img")  # the sample images it made
    page.wait_for_selector("#emolora-rise")

    # ---- 2. a CLI run in another process; the panel turns auto-stop OFF -> it goes on; Stop ends it
    cmd = [sys.executable, "-m", "trainer", "train", "--no-progress", "--threads", "1", "--model", model,
           "--data", str(dataset), "--output", str(out / "auto-off.safetensors"), "--run-name", "auto-off",
           "--auto-stop", "stop", "--set", f"runs_dir={runs}"]
    for k, v in RUN_OPTIONS.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    log = tmp_path / "auto-off.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait(lambda: proc.poll() is None and _panel_step(page, "auto-off") >= 1, 90,
              "the panel to follow the CLI run auto-off")
        _wait(lambda: box.is_checked(), 10, "the auto-stop box to show the run's mode (stop)")
        box.uncheck()
        _wait(lambda: _control(runs / "auto-off").get("auto_stop") == "mark", 10, "control.json auto_stop=mark")
        assert not _rises(runs / "auto-off"), "should_stop rose before the panel could switch auto-stop off"
        chart = page.locator("#emolora-chart-loss svg")
        first = int(chart.get_attribute("data-last-step"))
        rise_el = page.wait_for_selector("#emolora-rise", timeout=90_000)
        rise_step = int(rise_el.get_attribute("data-step"))
        _wait(lambda: _panel_step(page, "auto-off") >= rise_step + 5, 60, "the run to go on past should_stop")
        assert int(chart.get_attribute("data-last-step")) > first  # the charts advance
        assert int(page.locator("#emolora-chart-emo svg").get_attribute("data-last-step")) > first
        page.locator("#emolora-stop").click()
        rc = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    meta = _meta(runs / "auto-off")
    assert meta["stop_reason"] == "stopped" and meta["steps_done"] > rise_step
    assert (out / "auto-off.safetensors").is_file() and meta["lora_path"] == str(out / "auto-off.safetensors")
    _wait(lambda: "stopped" in page.locator("#emolora-run-status").inner_text(), 15, "the panel to show 'stopped'")
    _wait(lambda: "auto-off.safetensors" in page.locator("#emolora-files").inner_text().replace("\n", ""), 15,
          "the LoRA offered for download")

    page.wait_for_selector("#emolora-chart-more svg")  # the optimizer's other signals (stop_base, noise_est ...)
    page.wait_for_selector("#emolora-chart-motion svg polyline")  # the per-step update/weight ratio, drawn

    # ---- the page rendered from the panel alone: no CDN, no fonts, no analytics
    assert page.external_requests == []
    shots = Path(os.environ.get("EMOLORA_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "panel.png"
    page.screenshot(path=str(shot), full_page=True)
    msg = f"panel screenshot: {shot} (browser test took {time.monotonic() - t0:.0f}s)"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():  # into the test log even when the test passes
            print(f"\n{msg}", flush=True)
    else:
        print(msg)


def _choose(pg, elem_id: str, option: str, exact: bool = True) -> None:
    """Pick `option` in a Gradio dropdown by clicking it open and clicking the option (a run's option reads
    'name  [status, optimizer]': exact=False)."""
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=exact).click()


def _fill_settled(pg, box, text: str, polls: int = 4) -> None:
    """Type `text` into `box` and keep it there: a late answer to an earlier choice (the optimizer's defaults,
    sent back by the server) may land after the typing on a loaded machine, as it may for a person; type again
    until the box holds the text for `polls` checks in a row."""
    box.fill(text)
    held = 0
    for _ in range(40):
        pg.wait_for_timeout(250)
        if box.input_value() == text:
            held += 1
            if held >= polls:
                return
        else:
            box.fill(text)
            held = 0
    raise AssertionError(f"the form kept replacing {text!r} (now {box.input_value()!r})")


def test_start_form_by_clicking(panel, page):
    """Fill the start form with the mouse and the keyboard: preset and optimizer fill in their real values, the
    optimizer's own arguments are edited, Start runs the trainer and the panel follows it to the end."""
    out, _, datasets = panel
    from trainer.model import tiny_model_path

    page.get_by_text("Start a run").click()
    _choose(page, "emolora-f-preset", "concept")
    steps = page.locator("#emolora-f-steps input")
    _wait(lambda: steps.input_value() == "1500", 10, "the concept preset's steps in the form")
    assert "flip_aug=true" in page.locator("#emolora-f-preset-note").inner_text().replace("`", "")
    _choose(page, "emolora-f-optimizer", "AutoTrustGO")
    args = page.locator("#emolora-f-args textarea")
    _wait(lambda: "trust_level" in args.input_value(), 10, "AutoTrustGO's own arguments in the form")
    assert json.loads(args.input_value()) == {"trust_level": 0.4, "eps": 1e-08}
    assert float(page.locator("#emolora-f-lr input").input_value()) == 1e-4
    _fill_settled(page, args, '{"trust_level": 0.3, "eps": 1e-08}')
    _choose(page, "emolora-f-model", str(Path(tiny_model_path()).resolve()))
    _choose(page, "emolora-f-dataset", str(datasets.resolve() / "photos"))
    for field, value in (("steps", "3"), ("resolution", "64"), ("rank", "4")):
        page.locator(f"#emolora-f-{field} input").fill(value)
    page.locator("#emolora-f-name textarea, #emolora-f-name input").first.fill("clicked")
    page.locator("#emolora-start").click()
    message = page.locator("#emolora-start-message")
    _wait(lambda: "started clicked" in message.inner_text(), 20, "the form to start the run", shown=message.inner_text)
    run = out / "runs" / "clicked"
    _wait(lambda: _meta(run).get("status") == "finished" if (run / "telemetry.sqlite").exists() else False, 180,
          "the run started from the form to finish")
    _wait(lambda: "finished" in page.locator("#emolora-run-status").inner_text() and
          _panel_step(page, "clicked") == 3, 20, "the panel to follow the form's run to its end")
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optimizer"], cfg["optimizer_args"], cfg["steps"], cfg["rank"], cfg["resolution"]) == (
        "AutoTrustGO", {"trust_level": 0.3}, 3, 4, 64)
    assert cfg["flip_aug"] is True and cfg["alpha"] == 8  # the concept preset
    # a finished run: Stop and Save now are inactive
    assert page.locator("#emolora-stop").is_disabled() and page.locator("#emolora-save").is_disabled()


def _finished_run(runs: Path, name: str, optimizer: str, losses: list) -> None:
    store = RunStore(runs / name)
    store.write_config({"optimizer": optimizer, "steps": len(losses)})
    store.set_meta(status="finished", optimizer=optimizer, signals=["loss"], steps_total=len(losses),
                   pid=os.getpid(), started_at=time.time(), stop_reason="finished")
    for s, loss in enumerate(losses, 1):
        store.log_step(s, {"loss": loss})
    store.close()


def test_overlay_by_clicking(panel, page):
    """Choosing another run in 'Overlay another run' draws its loss on the selected run's loss chart."""
    out, _, _ = panel
    _finished_run(out / "runs", "base-run", "AdamW", [1.0, 0.8, 0.7, 0.65])
    _finished_run(out / "runs", "overlay-me", "EmoLynx", [1.0 / s for s in range(1, 6)])
    _choose(page, "emolora-run", "base-run  [", exact=False)
    _wait(lambda: _panel_step(page, "base-run") == 4, 15, "the panel to show the picked run")
    chart = page.locator("#emolora-chart-loss svg")
    assert "overlay-me" not in chart.inner_html()
    _choose(page, "emolora-compare", "overlay-me  [", exact=False)
    _wait(lambda: "overlay-me (EmoLynx)" in chart.inner_html(), 15, "the overlaid run's loss on the chart")
    _choose(page, "emolora-compare", "(none)")
    _wait(lambda: "overlay-me" not in chart.inner_html(), 15, "the overlay to go")
    # a link to one run (as the ComfyUI sidebar opens the panel) shows that run, not the newest
    page.goto(panel[1] + "?run=overlay-me")
    _wait(lambda: _panel_step(page, "overlay-me") == 5, 30, "the linked run")
    assert not page.locator("#emolora-follow input[type=checkbox]").is_checked()


def test_sweep_started_from_the_form_shows_live_in_the_sweep_view(panel, page):
    """Start a real small sweep from the start form (AdamW and EmoNavi, 3 steps each, tiny model); the sweep view
    shows it running, then its table (one row per run, the recommendation) and both runs' validation curves."""
    out, url, datasets = panel
    from trainer.model import tiny_model_path

    make_dataset(datasets / "sweep-photos", n=5)  # 20% held out for validation: one image
    page.goto(url)  # the form's folder choices are read at page load
    page.wait_for_selector("#emolora-step")
    page.get_by_text("Start a run").click()
    _choose(page, "emolora-f-model", str(Path(tiny_model_path()).resolve()))
    _choose(page, "emolora-f-dataset", str(datasets.resolve() / "sweep-photos"))
    for field, value in (("steps", "3"), ("resolution", "64"), ("rank", "4")):
        page.locator(f"#emolora-f-{field} input").fill(value)
    page.locator("#emolora-f-name textarea, #emolora-f-name input").first.fill("clicked-sweep")
    page.locator("#emolora-f-sweep-optimizers textarea, #emolora-f-sweep-optimizers input").first.fill("AdamW,EmoNavi")
    page.locator("#emolora-start-sweep").click()
    message = page.locator("#emolora-start-message")
    _wait(lambda: "started sweep clicked-sweep" in message.inner_text(), 30, "the form to start the sweep",
          shown=message.inner_text)
    folder = out / "sweeps" / "clicked-sweep"
    progress = page.locator("#emolora-sweep-progress")
    seen = set()

    def finished() -> bool:
        if progress.count():
            seen.add(progress.get_attribute("data-status"))
        return progress.count() and progress.get_attribute("data-status") == "finished"

    _wait(finished, 300, "the sweep view to show the sweep finished",
          shown=lambda: (folder / "sweep.json").read_text()[-2000:] if (folder / "sweep.json").exists() else
          (out / "panel-logs" / "sweep-clicked-sweep.log").read_text()[-2000:])
    assert "running" in seen  # shown while it ran, not only at the end
    doc = json.loads((folder / "sweep.json").read_text())
    assert doc["status"] == "finished" and [r["optimizer"] for r in doc["rows"]] == ["AdamW", "EmoNavi"]
    assert progress.get_attribute("data-done") == progress.get_attribute("data-total") == "2"
    assert page.locator("#emolora-sweep-rows tbody tr").count() == 2
    assert doc["recommendation"] in page.locator("#emolora-sweep-recommendation").inner_text()
    chart = page.locator("#emolora-sweep-chart svg")
    _wait(lambda: chart.locator("polyline").count() == 2, 15, "both runs' validation curves")
    assert {chart.locator("polyline").nth(i).get_attribute("data-series") for i in range(2)} == {"AdamW", "EmoNavi"}
    assert page.external_requests == []
def test_narrow_layout_for_the_sidebar(panel, page):
    """At 360 px (ComfyUI's sidebar) the panel is one column: no sideways scrolling, the run selector and the
    'Follow the newest run' label the full width on one line, the charts sized to the width. Screenshots of the
    narrow page beside the full one: $EMOLORA_ARTIFACTS/panel_narrow_vs_full.png."""
    import io

    from conftest import doc_image
    from PIL import Image

    out, url, _ = panel
    if not (out / "runs" / "overlay-me").is_dir():
        _finished_run(out / "runs", "overlay-me", "EmoLynx", [1.0 / s for s in range(1, 6)])
    narrow = page.context.new_page()
    narrow.set_viewport_size({"width": 360, "height": 900})
    shots = {}
    try:
        for pg in (narrow, page):
            pg.goto(url + "?run=overlay-me")
            _wait(lambda pg=pg: _panel_step(pg, "overlay-me") == 5, 30, "the linked run")
            pg.wait_for_selector("#emolora-chart-loss svg")
            shots[pg is narrow] = pg.screenshot(full_page=True)
        box = narrow.evaluate("""() => {
            const b = (s) => { const r = document.querySelector(s).getBoundingClientRect();
                               return {left: r.left, right: r.right, width: r.width, height: r.height}; };
            return {scroll: document.documentElement.scrollWidth, run: b('#emolora-run'),
                    follow: b('#emolora-follow label'), chart: b('#emolora-chart-loss svg'),
                    stop: b('#emolora-stop')};
        }""")
    finally:
        narrow.close()
    assert box["scroll"] <= 360, box  # nothing wider than the sidebar
    assert box["run"]["left"] >= 0 and box["run"]["right"] <= 360 and box["run"]["width"] >= 300, box
    assert box["follow"]["height"] < 30 and box["follow"]["width"] >= 300, box  # one line, not letter by letter
    assert 300 <= box["chart"]["width"] <= 360 and box["stop"]["width"] >= 300, box
    images = [Image.open(io.BytesIO(shots[k])) for k in (True, False)]
    side = Image.new("RGB", (sum(i.width for i in images) + 20, max(i.height for i in images)), "white")
    side.paste(images[0], (0, 0))
    side.paste(images[1], (images[0].width + 20, 0))
    folder = Path(os.environ.get("EMOLORA_ARTIFACTS") or ROOT / "output" / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    side.save(folder / "panel_narrow_vs_full.png")
    doc_image(shots[False], "panel.png", max_width=900)
    doc_image(shots[True], "panel_narrow.png", max_width=360)
