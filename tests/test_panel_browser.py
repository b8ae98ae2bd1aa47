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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")

from _trainer_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("EMOLORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
RUN_OPTIONS = {"optimizer": "EmoSens", "optimizer_args": {"stopcoef": 1000.0}, "steps": 400, "resolution": 128,
               "bucket_step": 32, "rank": 4, "batch_size": 2, "device": "cpu", "gradient_checkpointing": False,
               "cache_latents": "memory", "cache_text": "memory", "save_dtype": "fp16"}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


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
    import web.panel as panel_module

    out = tmp_path_factory.mktemp("panel-output")
    url = panel_module.launch(out, port=_free_port())
    assert url.startswith("http://127.0.0.1:")
    assert panel_module.launch(tmp_path_factory.mktemp("other")) == url  # one panel per process
    return out, url


@pytest.fixture(scope="module")
def page(panel, tmp_path_factory):
    _, url = panel
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
    out, url = panel
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


def test_http_file_route_serves_nothing_outside_the_output_folder(panel, tmp_path):
    out, url = panel
    secret = out.parent / f"{out.name}-secret.txt"
    secret.write_text("secret")
    inside = out / "inside.txt"
    inside.write_text("inside")

    def get(path):
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    for bad in (str(secret), f"{out}/../{secret.name}", "/etc/passwd", urllib.parse.quote(f"{out}/../{secret.name}")):
        for route in ("gradio_api/file=", "file="):
            status, body = get(route + bad)
            assert status != 200 or (b"secret" not in body and b"root:" not in body), (route, bad, status)
    status, body = get(f"gradio_api/file={inside}")
    assert status == 200 and body == b"inside"
