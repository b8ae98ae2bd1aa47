"""The panel without a browser: charts, run data, controls, launcher, imports (path safety and
launching: test_panel_security.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")

from trainer.cli import load_pack  # noqa: E402
from trainer.runstore import RunStore  # noqa: E402

PACK = load_pack().__name__  # the panel is part of the pack: it imports the trainer relatively
from _panel_helpers import ATG, fake_run  # noqa: E402
from emolora.web.panel import data, form, launcher, plots, svgplot  # noqa: E402
from emolora.web.panel.paths import PanelRoot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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


def test_the_validation_loss_is_drawn_beside_the_training_loss(tmp_path):
    for name, scale in (("val", 1.0), ("other", 2.0)):
        store = RunStore(tmp_path / name)
        store.set_meta(status="finished", optimizer="EmoNavi", signals=["loss"], pid=os.getpid())
        for s in range(1, 31):
            store.log_step(s, {"loss": 0.2, **({"val_loss": scale / s} if s % 10 == 0 else {})})
        store.close()
    val, other = data.RunData(tmp_path / "val").refresh(), data.RunData(tmp_path / "other").refresh()
    series = {x.name: x for x in plots.charts(val, other)["loss"].series}
    assert (series["validation loss"].xs, series["validation loss"].ys) == ([10, 20, 30], [0.1, 0.05, 1 / 30])
    assert series["other (EmoNavi) validation loss"].ys == [0.2, 0.1, 2 / 30]
    assert "val_loss" not in plots.more_choices(val)  # drawn on the loss chart, not offered again
    alone = [x.name for x in plots.charts(val)["loss"].series]
    assert "validation loss" in alone and not any("other" in n for n in alone)


MOTION_MSG = ("AutoTrustGO at lr 0.0001 has barely changed the LoRA in 20 steps (mean update/weight ratio 3.5e-06 a "
              "step, under 1e-05); try a higher LR")


def _motion_run(runs_dir, name, optimizer, ratio, steps=30, warn=False):
    """A run store as the trainer writes it: each step logged, then logged again one step later completed with
    its update_ratio (the last step has none); the barely_moving event at step 21."""
    store = RunStore(Path(runs_dir) / name)
    store.write_config({"optimizer": optimizer, "steps": steps})
    store.set_meta(status="finished", optimizer=optimizer, signals=["loss"], steps_total=steps, pid=os.getpid())
    for s in range(1, steps + 1):
        store.log_step(s, {"loss": 0.2})
        if s > 1:
            store.log_step(s - 1, {"loss": 0.2, "update_ratio": ratio * (1 + 0.01 * s)})
        if warn and s == 21:
            store.event(s, "barely_moving", {"message": MOTION_MSG, "optimizer": optimizer, "lr": 1e-4,
                                             "update_ratio": 3.5e-6})
    return store


def test_update_ratio_is_plotted_on_a_log_scale_and_the_warning_is_on_the_status(tmp_path):
    from emolora.web.panel.app import PanelApp

    _motion_run(tmp_path / "runs", "atg", "AutoTrustGO", 3.5e-6, warn=True).close()
    _motion_run(tmp_path / "runs", "adamw", "AdamW", 1.1e-3).close()
    app = PanelApp(tmp_path)
    atg, adamw = app.run_data("atg"), app.run_data("adamw")
    chart = plots.charts(atg, adamw)["motion"]
    assert chart.log_y and chart.key == "motion" and chart.hlines[0][0] == pytest.approx(1e-5)
    own, other = chart.series
    assert own.name == "update ratio" and other.name == "adamw (AdamW)"
    assert [(x, y) for x, y in zip(own.xs, own.ys) if y is not None] == \
        [(s, pytest.approx(3.5e-6 * (1 + 0.01 * (s + 1)))) for s in range(1, 30)]
    assert own.ys[-1] is None  # the last step's update is never measured
    assert min(y for y in other.ys if y) > 1e-3
    root = ET.fromstring(plots.svg(chart))
    assert root.get("data-chart") == "motion" and "1e-05" in "".join(root.itertext())  # a decade tick
    assert "update_ratio" not in plots.more_choices(atg)  # its own chart, not offered again
    assert atg.status()["barely_moving"] == MOTION_MSG
    status = app.status_html(atg)
    assert "id='emolora-barely-moving'>AutoTrustGO at lr 0.0001 has barely changed the LoRA in 20 steps" in status
    assert "try a higher LR</div>" in status
    assert adamw.status()["barely_moving"] is None and "emolora-barely-moving" not in app.status_html(adamw)
    fake_run(tmp_path / "runs", "old", steps=5)  # a run without the ratio: no chart
    assert plots.charts(app.run_data("old"))["motion"] is None


def test_a_row_completed_after_it_was_read_is_read_again(tmp_path):
    store = RunStore(tmp_path / "r")
    store.set_meta(status="running", optimizer="AdamW", signals=["loss"], pid=os.getpid())
    for s in (1, 2):
        store.log_step(s, {"loss": 0.5})
    store.log_step(1, {"loss": 0.5, "update_ratio": 1e-3})
    rd = data.RunData(tmp_path / "r").refresh()
    assert rd.series("update_ratio")[1] == [1e-3, None]
    v = rd.version
    store.log_step(2, {"loss": 0.5, "update_ratio": 2e-3, "emo_scalar": 0.1})  # step 3's read completes step 2
    rd.refresh()
    assert rd.version > v and rd.series("update_ratio") == ([1, 2], [1e-3, 2e-3]) and rd.last("emo_scalar") == 0.1
    v = rd.version
    store.log_step(3, {"loss": 0.4})
    rd.refresh()
    rd.refresh()  # step 3 read twice, unchanged: nothing redrawn the second time
    assert rd.steps == [1, 2, 3] and rd.series("update_ratio")[1] == [1e-3, 2e-3, None]
    assert all(len(col) == 3 for col in rd.cols.values())
    v2 = rd.version
    rd.refresh()
    assert rd.version == v2 > v
    store.close()


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
    assert s["status"] == "running" and s["eta_s"] == pytest.approx((10 - 6) / 5.0)  # steps_per_s of step 5
    store.close()


def test_status_eta_memory_rise_and_killed_runs(tmp_path):
    fake_run(tmp_path, "r", steps=20, status="running", rise_at=12)
    rd = data.RunData(tmp_path / "r").refresh()
    rd.meta["steps_total"] = 120  # 100 steps to go at 5 steps/s
    s = rd.status()
    assert s["eta_s"] == pytest.approx(20.0) and s["mem_mb"] == 400.0 and s["should_stop_rises"] == [(12, "mark")]
    fake_run(tmp_path, "dead", status="running", pid=2**22 + 12345)
    assert data.RunData(tmp_path / "dead").refresh().status()["status"] == "interrupted"
    assert {r["name"]: r["status"] for r in data.list_runs(tmp_path)}["dead"] == "interrupted"


# ---- controls, ticks, launcher ----------------------------------------------------------------------------------
def _out(app, out: list, key: str):
    return out[app.ORDER.index(key)]


def test_controls_write_the_control_file_of_the_selected_run(tmp_path):
    from emolora.web.panel.app import PanelApp

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
    assert _out(app, out, "run")["value"] == "live" and "data-step='50'" in _out(app, out, "status")
    assert _out(app, out, "stop_btn")["interactive"] is True and _out(app, out, "save_btn")["interactive"] is True
    import gradio as gr

    more = _out(app, out, "more_sel")["value"]  # the browser now holds the default choice of extra signals
    out2 = app.tick("live", "", True, more, st)
    assert out2[0] == gr.skip() and out2[3] == gr.skip()  # nothing new: the run list and the charts are skipped
    assert _out(app, out2, "stop_btn") == gr.skip()
    # a finished run: Stop and Save now are inactive
    out3 = app.pick("old", "", False, more, out2[-1])[1:]
    assert _out(app, out3, "stop_btn")["interactive"] is False and _out(app, out3, "save_btn")["interactive"] is False


def test_following_shows_a_run_that_started_and_finished_between_two_refreshes(tmp_path):
    """A short run (a 3-step run from the form) can be 'running' only between two refreshes: following, the panel
    still moves to it once it is the newest run; not following, it stays on the pick."""
    from emolora.web.panel.app import PanelApp

    fake_run(tmp_path / "runs", "watched", status="finished", steps=7)
    app = PanelApp(tmp_path)
    assert app.pick_run(None, True) == "watched"
    time.sleep(0.01)
    fake_run(tmp_path / "runs", "quick", status="finished", steps=3)
    app._runs_at = 0.0  # the next refresh re-reads the run list
    assert app.pick_run("watched", False) == "watched"
    assert app.pick_run("watched", True) == "quick"
    out = app.tick("watched", "", True, [], {})
    assert _out(app, out, "run")["value"] == "quick" and "data-step='3'" in _out(app, out, "status")
    # a running run comes first, even an older one
    fake_run(tmp_path / "runs", "older-live", status="running", steps=2).set_meta(started_at=1.0)
    app._runs_at = 0.0
    assert app.pick_run("quick", True) == "older-live"


def test_a_link_with_a_run_name_opens_that_run(tmp_path):
    from types import SimpleNamespace

    from emolora.web.panel.app import PanelApp

    fake_run(tmp_path / "runs", "live", status="running")
    fake_run(tmp_path / "runs", "old", status="finished", steps=7)
    app = PanelApp(tmp_path)
    for query, follow, shown in (({"run": "old"}, False, "old"), ({"run": "../x"}, True, "live"), ({}, True, "live")):
        out = app.open_page(None, "", True, [], {}, SimpleNamespace(query_params=query))
        assert out[0] == follow and out[1]["value"] == shown, query


def test_stop_reason_and_message_are_shown(tmp_path):
    from emolora.web.panel.app import PanelApp

    store = fake_run(tmp_path / "runs", "div", status="stopped", steps=8)
    msg = "EmoNavi diverged at step 8: 3 steps in a row made a weight non-finite; try a lower lr"
    store.event(8, "stop", {"reason": "diverged", "error": msg})
    store.set_meta(stop_reason="diverged")
    app = PanelApp(tmp_path)
    html_ = app.status_html(app.run_data("div"))
    assert "data-stop-reason='diverged'" in html_ and "stopped (diverged)" in html_
    assert "id='emolora-stop-message'>EmoNavi diverged at step 8" in html_
    store.set_meta(message="a newer message from the meta")
    assert app.run_data("div").status()["error"] == "a newer message from the meta"
    fake_run(tmp_path / "runs", "fine", status="finished")
    assert "emolora-stop-message" not in app.status_html(app.run_data("fine"))
    store.close()


def test_launcher_builds_a_safe_command(tmp_path):
    from emolora.trainer.config import ConfigError

    root = PanelRoot(tmp_path / "out")
    name = launcher.safe_run_name("../../etc/passwd run", "fallback")
    assert "/" not in name and not name.startswith(".")
    assert launcher.safe_run_name("...", "fallback") == "fallback"
    overrides = {"model": str(tmp_path / "m.safetensors"), "data": str(tmp_path), "optimizer": "EmoSens",
                 "steps": 5, "resolution": 64, "optimizer_args": {"stopcoef": 0.1}}
    cmd = launcher.build_command(root, ["concept"], overrides, name)
    assert cmd[1:4] == ["-m", "trainer", "train"]
    assert cmd[cmd.index("--output") + 1] == str(root.root / f"{name}.safetensors")
    assert cmd[cmd.index("--preset") + 1] == "concept" and cmd[cmd.index("--resolution") + 1] == "64"
    assert f"runs_dir={json.dumps(str(root.runs_dir))}" in cmd and 'optimizer_args={"stopcoef": 0.1}' in cmd
    with pytest.raises(ConfigError, match="resolution"):  # validated here, not in the log of a dead process
        launcher.build_command(root, [], {**overrides, "resolution": 65}, name)


def test_form_offers_the_optimizers_own_arguments():
    from emolora.trainer.config import ConfigError

    navi = form.optimizer_defaults("EmoNavi")
    assert navi == {"eps": 1e-08, "betas": [0.9, 0.995], "weight_decay": 0.01, "use_shadow": False}
    assert form.optimizer_defaults("AutoTrustGO") == {"trust_level": 0.4, "eps": 1e-08}  # its preset's 0.4
    assert form.optimizer_defaults("AdamW")["betas"] == [0.9, 0.999]
    assert "stopcoef" in form.optimizer_defaults("EmoTion")  # through EmoTion's *args/**kw to the v3.9 base
    assert form.recommended_lr("EmoLynx") == 8e-05
    assert form.optimizer_args("EmoNavi", json.dumps(navi)) == {}  # nothing changed: nothing passed
    assert form.optimizer_args("EmoNavi", '{"use_shadow": true}') == {"use_shadow": True}
    # a changed AdamW argument passes the preset's too: optimizer_args replaces the preset's as a whole
    assert form.optimizer_args("AdamW", '{"eps": 1e-7}') == {"betas": [0.9, 0.999], "eps": 1e-07,
                                                             "weight_decay": 0.01}
    for bad, match in (('{"trust": 1}', "takes no 'trust'"), ('{"betas": [0.9]}', "betas must be like"),
                       ('{"use_shadow": 1}', "use_shadow must be like"), ("[1]", "JSON object"), ("{", "JSON")):
        with pytest.raises(ConfigError, match=match):
            form.optimizer_args("EmoNavi", bad)


def test_a_run_from_the_form_equals_the_same_run_from_the_cli(tmp_path, monkeypatch):
    """The form's command, parsed and merged by the CLI, gives the config a hand-written CLI command gives."""
    from emolora.web.panel.app import PanelApp

    from trainer import cli

    tmp_path = tmp_path.resolve()
    models, datasets = tmp_path / "models", tmp_path / "datasets"
    (datasets / "photos").mkdir(parents=True)
    (datasets / "held-out").mkdir()
    models.mkdir()
    (models / "sdxl.safetensors").write_bytes(b"x")
    app = PanelApp(tmp_path / "out", model_roots=[models], data_roots=[datasets])
    started = []
    monkeypatch.setattr(launcher, "start", lambda root, cmd, name: started.append(cmd))
    choices = {"model": "sdxl.safetensors", "dataset": "photos", "optimizer": "AutoTrustGO", "preset": "style",
               "steps": 7, "lr": 2e-4, "args_text": '{"trust_level": 0.3, "eps": 1e-08}', "resolution": 64,
               "rank": 4, "name": "from form", "network": "loha", "dora": True, "rslora": False,
               "validation_split": 0.0, "validation_data": "held-out", "validation_every": 3,
               "auto_stop_on": "val-plateau", "mask": "alpha"}
    msg, _ = app.start_run(*[choices[k] for k in app.FORM])
    assert msg.startswith("started `from-form`"), msg
    hand = ["train", "--model", str(models / "sdxl.safetensors"), "--data", str(datasets / "photos"),
            "--output", str(app.root.root / "from-form.safetensors"), "--run-name", "from-form",
            "--optimizer", "AutoTrustGO", "--preset", "style", "--steps", "7", "--lr", "2e-4", "--resolution", "64",
            "--rank", "4", "--set", 'optimizer_args={"trust_level": 0.3}', "--set", f"runs_dir={app.root.runs_dir}",
            "--set", "network=loha", "--set", "dora=true", "--set", "validation_every=3",
            "--set", f"validation_data={datasets / 'held-out'}", "--auto-stop-on", "val-plateau", "--mask", "alpha"]

    class Merged(Exception):
        pass

    def merged(argv):
        def capture(cfg, progress):
            raise Merged(cfg)

        monkeypatch.setattr(cli, "_run", capture)
        with pytest.raises(Merged) as e:
            cli.main(argv)
        return e.value.args[0].to_dict()

    (cmd,) = started
    from_form, from_cli = merged(cmd[3:]), merged(hand)
    assert from_form == from_cli
    assert from_form["optimizer_args"] == {"trust_level": 0.3} and from_form["rank"] == 4
    assert from_form["shuffle_caption"] is True and from_form["steps"] == 7  # the style preset, steps overridden
    # paths outside the roots and bad values are refused in the form, nothing started
    for key, bad, match in (("model", "../out/x.safetensors", "outside"), ("dataset", "/etc", "outside"),
                            ("resolution", 65, "resolution"), ("args_text", '{"nope": 1}', "takes no")):
        msg, _ = app.start_run(*[{**choices, key: bad}[k] for k in app.FORM])
        assert msg.startswith("⚠") and match in msg, msg
    assert len(started) == 1
    # a held-out share instead of a folder; both at once are refused by the trainer's check
    _, overrides = form.run_options(app.model_roots, app.data_roots, **{
        **{k: v for k, v in choices.items() if k != "name"}, "validation_data": None, "validation_split": 0.25})
    assert overrides["validation_split"] == 0.25 and "validation_data" not in overrides
    msg, _ = app.start_run(*[{**choices, "validation_split": 0.25}[k] for k in app.FORM])
    assert msg.startswith("⚠") and "exclude each other" in msg


def test_form_defaults_follow_the_preset_and_the_optimizer(tmp_path):
    from emolora.web.panel.app import PanelApp

    app = PanelApp(tmp_path)
    shown = dict(zip(app.SHOWN, app.form_defaults("style", "EmoLynx")))
    assert (shown["steps"], shown["resolution"], shown["rank"], shown["lr"]) == (2000, 1024, 32, 8e-05)
    assert json.loads(shown["args_text"]) == form.optimizer_defaults("EmoLynx")
    assert "caption_dropout=0.05" in shown["note"].replace("`", "")
    shown = dict(zip(app.SHOWN, app.form_defaults(form.NONE, "EmoSens")))
    assert shown["lr"] == 1.0 and shown["network"] == "lora" and shown["steps"] == 1000


# ---- imports: the pack's trainer, relatively -------------------------------------------------------------------
def test_the_panel_imports_the_packs_trainer():
    assert data.runstore.__name__ == f"{PACK}.trainer.runstore"
    assert launcher.PACKAGE_ROOT == ROOT
    from emolora.web.panel import app

    assert app.runstore is data.runstore and form.build_config.__module__ == f"{PACK}.trainer.config"


def test_imports_the_trainer_relatively_inside_a_package(tmp_path):
    pack = tmp_path / "EmoLoRA_pack"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "web", pack / "web", ignore=ignore)
    shutil.copytree(ROOT / "trainer", pack / "trainer", ignore=ignore)
    (pack / "__init__.py").write_text("")
    code = ("import sys; import EmoLoRA_pack.web.panel.app as a;"
            "assert 'trainer' not in sys.modules, 'top-level trainer imported';"
            "print(a.runstore.__name__, a.launcher.PACKAGE_ROOT)")
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
    from emolora.web.panel.app import PanelApp

    store = RunStore(tmp_path / "runs" / "new")
    store.set_meta(status="running", optimizer="EmoSens", pid=os.getpid(), signals=["loss", "noise_est"])
    app = PanelApp(tmp_path)
    out = app.tick(None, "", True, [], {})
    assert _out(app, out, "more_sel")["value"] == []  # nothing logged yet
    store.log_step(1, {"loss": 1.0, "noise_est": 0.9, "stop_base": -0.9, "steps_per_s": 3.0})
    out = app.tick("new", "", True, _out(app, out, "more_sel")["value"], out[-1])
    assert _out(app, out, "more_sel")["value"] == ["stop_base", "noise_est", "steps_per_s"]
    store.close()


def test_resume_button_continues_a_stopped_run_through_the_cli(tmp_path, monkeypatch):
    """Resume is active on a run that can continue (stopped, cancelled or killed, with a saved state) and starts
    `python -m trainer train --resume RUN_DIR`, a command the trainer's own parser reads as that resume."""
    from emolora.web.panel.app import PanelApp

    from trainer.cli import build_parser

    runs = tmp_path / "runs"
    fake_run(runs, "done", status="finished")
    store = fake_run(runs, "paused", status="stopped", steps=20)
    store.set_meta(stop_reason="stopped", steps_total=50)
    (runs / "paused" / "state").mkdir()
    (runs / "paused" / "state" / "state.pt").write_bytes(b"x")
    store.event(20, "state", {})
    started = []
    monkeypatch.setattr(launcher, "start", lambda root, cmd, name: started.append((cmd, name)))
    app = PanelApp(tmp_path)
    out = app.pick("paused", "", False, [], {})[1:]
    assert _out(app, out, "resume_btn")["interactive"] is True and _out(app, out, "stop_btn")["interactive"] is False
    out = app.pick("done", "", False, [], out[-1])[1:]
    assert _out(app, out, "resume_btn")["interactive"] is False
    assert "cannot be resumed" in app.resume_run("done")[0] and not started
    message, follow = app.resume_run("paused")
    assert "resuming `paused` from step 20 of 50" in message and follow["value"] is True
    (cmd, name), = started
    assert name == "paused" and cmd[1:3] == ["-m", "trainer"]
    args = build_parser().parse_args(cmd[3:])
    assert args.command == "train" and Path(args.resume) == (runs / "paused").resolve()
    assert app.resume_run("../outside")[0].startswith("⚠")
