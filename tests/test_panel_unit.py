"""The panel without a browser: charts, run data, path safety, controls, launcher, imports."""

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from trainer.runstore import RunStore  # noqa: E402
from web.panel import _trainer, data, launcher, plots, svgplot  # noqa: E402
from web.panel.paths import PanelRoot, PathError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
V36 = ["loss", "ema_short", "ema_medium", "ema_long", "emo_scalar", "early_scalar", "trust", "emo_drive",
       "effective_lr", "coeff", "shadow_ratio", "shadow_active", "should_stop"]
ATG = ["lr_scale", "effective_lr", "mask_ema", "flip_ema", "thr", "confidence_mean", "danger_mean", "mask_ratio",
       "flip_ratio", "should_stop"]


def fake_run(runs_dir, name, optimizer="EmoNavi", signals=V36, steps=50, status="finished", use_shadow=False,
             pid=None, rise_at=None, lora=None):
    store = RunStore(Path(runs_dir) / name)
    store.write_config({"optimizer": optimizer, "steps": steps, "auto_stop": "stop",
                        "optimizer_args": {"use_shadow": use_shadow} if use_shadow else {}})
    store.set_meta(status=status, optimizer=optimizer, signals=signals, steps_total=steps,
                   pid=pid if pid is not None else os.getpid(), started_at=time.time(), lora_path=lora)
    for s in range(1, steps + 1):
        rec = {"loss": 1.0 / s + 0.1, "lr": 1e-4, "steps_per_s": 5.0, "rss_mb": 400.0, "rss_peak_mb": 410.0,
               "should_stop": bool(rise_at and s >= rise_at)}
        if "emo_scalar" in signals:
            sigma = 0.9 * (-1) ** s / s
            rec.update(ema_short=1.0 / s, ema_medium=1.1 / s, ema_long=1.2 / s, emo_scalar=sigma, trust=1 - abs(sigma),
                       emo_drive=1.0, effective_lr=1e-4 * (1 + s % 3), shadow_ratio=0.3 if s % 5 == 0 else 0.0,
                       shadow_active=s % 5 == 0)
        if "confidence_mean" in signals:
            rec.update(confidence_mean=0.5, mask_ema=0.1 * (s % 4), flip_ema=0.2, thr=0.5, danger_mean=0.3,
                       mask_ratio=0.4, flip_ratio=0.2, lr_scale=1.0, effective_lr=1e-4)
        store.log_step(s, rec)
        if rise_at == s:
            store.event(s, "should_stop", {"value": True, "auto_stop": "mark"})
    return store


# ---- charts ---------------------------------------------------------------------------------------------------
def test_svg_is_well_formed_with_gaps_log_scale_bands_and_escaping():
    c = svgplot.Chart("a <title> & more", key="k", bands=[(0.25, 0.5, "#0f0", "zone <1>")], hlines=[(0, "#999")],
                      vlines=[(5, "#f00", "should_stop")], markers=[("m", [2, 3], [0.1, 0.2], "#00f")])
    c.series.append(svgplot.Series("x & y", list(range(10)), [None, 1, 2, float("nan"), 4, 5, None, 7, 8, 9]))
    root = ET.fromstring(svgplot.render(c))
    assert root.get("data-last-step") == "9" and root.get("data-chart") == "k"
    assert len(root.findall(".//{http://www.w3.org/2000/svg}polyline")) == 3  # two gaps break the line
    log = svgplot.Chart("lr", log_y=True, series=[svgplot.Series("lr", [1, 2, 3], [1e-6, 1e-4, 0.0])])
    ET.fromstring(svgplot.render(log))
    empty = ET.fromstring(svgplot.render(svgplot.Chart("nothing", note="wait")))
    assert "wait" in "".join(empty.itertext())


def test_long_series_are_reduced_but_keep_spikes():
    xs = list(range(100_000))
    ys = [1.0] * 100_000
    ys[54_321] = 50.0
    pts = svgplot.reduce_points(xs, ys, 300)
    assert len(pts) <= 700 and max(p[1] for p in pts) == 50.0
    assert len(svgplot.render(svgplot.Chart("big", series=[svgplot.Series("y", xs, ys)]))) < 30_000


def test_charts_follow_the_optimizer(tmp_path):
    fake_run(tmp_path, "navi", use_shadow=True, rise_at=40)
    fake_run(tmp_path, "atg", optimizer="AutoTrustGO", signals=ATG)
    fake_run(tmp_path, "adamw", optimizer="AdamW", signals=["loss"])
    navi, atg, adamw = (data.RunData(tmp_path / n).refresh() for n in ("navi", "atg", "adamw"))
    c = plots.charts(navi)
    assert c["emo"] and c["shadow"] and c["trust"] is None
    assert c["emo"].y_range == (-1.0, 1.0) and {round(abs(b[0]), 2) for b in c["emo"].bands} >= {0.25, 0.5, 0.75}
    assert c["lr"].series[-1].name == "lr x emoDrive"
    assert [v[0] for v in c["loss"].vlines] == [40] and "should_stop" in c["loss"].vlines[0][2]
    blend = c["shadow"].markers[0]
    assert blend[1] == [s for s in range(1, 51) if s % 5 == 0]
    c = plots.charts(atg)
    assert c["trust"] and c["emo"] is None and c["shadow"] is None
    assert {s.name for s in c["trust"].series} >= {"confidence", "mask_ema", "flip_ema", "threshold", "danger"}
    c = plots.charts(adamw, other=navi)
    assert c["emo"] is None and c["trust"] is None and c["shadow"] is None
    names = [s.name for s in c["loss"].series]
    assert "ema_medium*" in names and any(n.startswith("navi (EmoNavi)") for n in names)  # overlay
    _, ema = adamw.series("ema_medium")
    assert ema[0] == pytest.approx(1.1) and ema[1] == pytest.approx(0.05 * 0.6 + 0.95 * 1.1)
    for chart in plots.charts(navi, atg, ["steps_per_s"]).values():
        if chart is not None:
            ET.fromstring(plots.svg(chart))


def test_run_data_reads_incrementally_and_survives_a_resume(tmp_path):
    store = fake_run(tmp_path, "r", steps=10, status="running")
    rd = data.RunData(tmp_path / "r").refresh()
    v = rd.version
    assert rd.steps == list(range(1, 11)) and rd.alive
    rd.refresh()
    assert rd.version == v  # nothing new, nothing redrawn
    store.log_step(11, {"loss": 0.5, "new_signal": 3.0})
    rd.refresh()
    assert rd.steps[-1] == 11 and rd.cols["new_signal"][-1] == 3.0 and rd.cols["new_signal"][0] is None
    assert all(len(col) == len(rd.steps) for col in rd.cols.values())
    store.truncate_after(5)
    store.event(5, "resume", {})
    store.log_step(6, {"loss": 9.0})
    rd.refresh()
    assert rd.steps == [1, 2, 3, 4, 5, 6] and rd.last("loss") == 9.0
    s = rd.status()
    assert s["status"] == "running" and s["eta_s"] is None or s["eta_s"] >= 0
    store.close()


def test_status_eta_memory_rise_and_dead_runs(tmp_path):
    fake_run(tmp_path, "r", steps=20, status="running", rise_at=12)
    rd = data.RunData(tmp_path / "r").refresh()
    rd.meta["steps_total"] = 120  # 100 steps to go at 5 steps/s
    s = rd.status()
    assert s["eta_s"] == pytest.approx(20.0) and s["mem_mb"] == 400.0 and s["should_stop_rises"] == [(12, "mark")]
    fake_run(tmp_path, "dead", status="running", pid=2**22 + 12345)
    assert data.RunData(tmp_path / "dead").refresh().status()["status"] == "dead"
    assert {r["name"]: r["status"] for r in data.list_runs(tmp_path)}["dead"] == "dead"


# ---- path safety ------------------------------------------------------------------------------------------------
def test_traversal_and_symlinks_out_are_refused(tmp_path):
    out = tmp_path / "output"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.safetensors").write_bytes(b"secret")
    (secret / "img.png").write_bytes(b"png")
    fake_run(secret, "elsewhere")
    fake_run(out / "runs", "ok", lora=str(secret / "key.safetensors"))
    (out / "runs" / "ok" / "samples").mkdir()
    (out / "runs" / "ok" / "samples" / "evil.png").symlink_to(secret / "img.png")
    (out / "runs" / "linked").symlink_to(secret / "elsewhere")
    (out / "mine.safetensors").write_bytes(b"lora")
    (out / "runs" / "escape.safetensors").symlink_to(secret / "key.safetensors")
    root = PanelRoot(out)
    assert root.runs_dir == out.resolve() / "runs"
    assert root.run_dir("ok") == (out / "runs" / "ok").resolve()
    for bad in ("../secret/elsewhere", "..", ".", "/etc", "ok/../../secret", "linked", "missing", "", None,
                "ok\x00", "%2e%2e"):
        with pytest.raises(PathError):
            root.run_dir(bad)
    for bad in (secret / "key.safetensors", out / ".." / "secret" / "key.safetensors", "/etc/passwd",
                out / "runs" / "escape.safetensors", out / "runs" / "ok" / "samples" / "evil.png"):
        with pytest.raises(PathError):
            root.file(bad)
    assert root.file(out / "mine.safetensors") == (out / "mine.safetensors").resolve()
    from web.panel.app import PanelApp

    app = PanelApp(out)
    rd = app.run_data("ok")
    assert app.lora_files(rd) == [] and app.sample_files(rd) == []
    assert app.run_data("../secret/elsewhere") is None and app.run_data("linked") is None
    assert "outside the output folder" in app.status_html(rd)
    assert app.request_stop("../secret/elsewhere").startswith("⚠")
    assert app.set_auto_stop("linked", True).startswith("⚠")
    assert not (secret / "elsewhere" / "control.json").exists()


# ---- controls, ticks, launcher ----------------------------------------------------------------------------------
def test_controls_write_the_control_file_of_the_selected_run(tmp_path):
    from web.panel.app import PanelApp

    fake_run(tmp_path / "runs", "live", status="running")
    fake_run(tmp_path / "runs", "old", status="finished")
    app = PanelApp(tmp_path)
    assert "auto-stop **off**" in app.set_auto_stop("live", False)
    ctl = json.loads((tmp_path / "runs" / "live" / "control.json").read_text())
    assert ctl["auto_stop"] == "mark"
    app.set_auto_stop("live", True)
    assert json.loads((tmp_path / "runs" / "live" / "control.json").read_text())["auto_stop"] == "stop"
    assert "save #1" in app.request_save("live")
    assert "stop requested" in app.request_stop("live")
    assert json.loads((tmp_path / "runs" / "live" / "control.json").read_text())["stop"] is True
    assert "not running" in app.request_stop("old")
    # the refresh: follows the running run, then skips what did not change
    out = app.tick(None, "", True, [], {})
    st = out[-1]
    assert out[0]["value"] == "live" and "data-step='50'" in out[2]
    import gradio as gr

    more = out[10]["value"]  # the browser now holds the default choice of extra signals
    out2 = app.tick("live", "", True, more, st)
    assert out2[0] == gr.skip() and out2[3] == gr.skip()  # nothing new: the run list and the charts are skipped


def test_launcher_builds_a_safe_command(tmp_path):
    root = PanelRoot(tmp_path / "out")
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    with pytest.raises(PathError):
        launcher.build_command(root, model=str(tmp_path / "none"), data=str(tmp_path), optimizer="EmoNavi",
                               steps=5, name="x")
    name = launcher.safe_run_name("../../etc/passwd run", "fallback")
    assert "/" not in name and not name.startswith(".")
    assert launcher.safe_run_name("...", "fallback") == "fallback"
    cmd = launcher.build_command(root, model=str(model), data=str(tmp_path), optimizer="EmoSens", steps=5,
                                 name=name, preset="concept", resolution=64)
    assert cmd[1:4] == ["-m", "trainer", "train"]
    assert cmd[cmd.index("--output") + 1] == str(root.root / f"{name}.safetensors")
    assert f"runs_dir={root.runs_dir}" in cmd


def test_launch_refuses_other_interfaces_without_the_flag(capsys):
    import web.panel as panel

    with pytest.raises(ValueError, match="allow_remote"):
        panel.launch("unused", host="0.0.0.0")
    assert panel.main(["--host", "192.168.1.5"]) == 2
    assert "--listen-all" in capsys.readouterr().out
    args = panel.build_parser().parse_args([])
    assert args.host is None and args.port == 7861 and not args.listen_all


# ---- imports: top-level trainer and the ComfyUI package layout -------------------------------------------------
def test_imports_the_top_level_trainer():
    assert _trainer.runstore().__name__ == "trainer.runstore"
    assert _trainer.package_root() == str(ROOT)
    assert "EmoNavi" in _trainer.config().OPTIMIZER_NAMES


def test_imports_the_trainer_relatively_inside_a_package(tmp_path):
    pack = tmp_path / "EmoLoRA_pack"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "web", pack / "web", ignore=ignore)
    shutil.copytree(ROOT / "trainer", pack / "trainer", ignore=ignore)
    (pack / "__init__.py").write_text("")
    code = ("import sys; import EmoLoRA_pack.web.panel as p; from EmoLoRA_pack.web.panel import _trainer as t;"
            "assert 'trainer' not in sys.modules, 'top-level trainer imported';"
            "print(t.runstore().__name__, t.package_root())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["EmoLoRA_pack.trainer.runstore", str(pack)]


def test_nothing_unpickles():
    src = "".join(p.read_text() for p in (ROOT / "web" / "panel").glob("*.py"))
    for bad in ("pickle", "torch.load", "np.load", "joblib", "eval(", "exec("):
        assert bad not in src



def test_more_signals_default_arrives_with_the_first_records(tmp_path):
    from web.panel.app import PanelApp

    store = RunStore(tmp_path / "runs" / "new")
    store.set_meta(status="running", optimizer="EmoSens", pid=os.getpid(), signals=["loss", "noise_est"])
    app = PanelApp(tmp_path)
    out = app.tick(None, "", True, [], {})
    assert out[10]["value"] == []  # nothing logged yet
    store.log_step(1, {"loss": 1.0, "noise_est": 0.9, "stop_base": -0.9, "steps_per_s": 3.0})
    out = app.tick("new", "", True, out[10]["value"], out[-1])
    assert out[10]["value"] == ["stop_base", "noise_est", "steps_per_s"]
    store.close()
