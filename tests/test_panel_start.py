"""Starting a run from the panel's form: a background `python -m trainer train` that the panel then follows."""

import time
from pathlib import Path

import pytest
from conftest import require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")

from _trainer_helpers import make_dataset  # noqa: E402

from trainer.cli import load_pack  # noqa: E402

pytestmark = pytest.mark.slow
load_pack()  # the panel is part of the pack (it imports the trainer relatively)


def test_start_a_run_from_the_panel(tmp_path):
    from emolora.web.panel import launcher
    from emolora.web.panel.app import PanelApp

    from trainer.model import tiny_model_path

    model = tiny_model_path()
    make_dataset(tmp_path / "data", n=2)
    app = PanelApp(tmp_path / "out", model_roots=[tmp_path, Path(model).parent], data_roots=[tmp_path])
    form = {"model": str(tmp_path / "missing.safetensors"), "dataset": "data", "optimizer": "EmoNavi",
            "preset": "(none)", "steps": 3, "lr": None, "args_text": "", "resolution": 64, "rank": 4, "name": "x",
            "network": "lora", "dora": False, "rslora": False, "validation_split": 0.0, "validation_data": None,
            "validation_every": 0, "auto_stop_on": "should_stop", "mask": "off"}
    msg, _ = app.start_run(*[form[k] for k in app.FORM])
    assert msg.startswith("⚠") and "model not found" in msg
    form.update(model=model, optimizer="EmoLynx", name="../my run")
    msg, follow = app.start_run(*[form[k] for k in app.FORM])
    assert msg.startswith("started `my-run`"), msg
    end = time.monotonic() + 120
    while time.monotonic() < end and launcher.poll()["my-run"][0] is None:
        time.sleep(0.5)
    rc, log = launcher.poll()["my-run"]
    assert rc == 0, log.read_text()[-3000:]
    assert log.parent == app.root.root / "panel-logs"
    s = app.run_data("my-run").status()
    assert s["status"] == "finished" and s["step"] == 3 and s["optimizer"] == "EmoLynx"
    assert app.lora_files(app.run_data("my-run")) == [str(app.root.root / "my-run.safetensors")]
    out = app.tick(None, "", True, [], {})
    assert out[0]["value"] == "my-run" and "data-step='3'" in out[2]
    assert out[app.ORDER.index("stop_btn")]["interactive"] is False  # finished: nothing to stop
    # the same name again gets its own folder and LoRA
    assert launcher.unique_name(app.root, "my-run") == "my-run-2"


def test_resume_a_stopped_run_from_the_panel(tmp_path):
    """A run stopped at step 2 of 4 (Ctrl-C: its state saved) is resumed with the panel's Resume: a background
    `python -m trainer train --resume` that finishes it in its own folder and file."""
    from _trainer_helpers import tiny_config
    from emolora.web.panel import launcher
    from emolora.web.panel.app import PanelApp

    from trainer.train import train

    app = PanelApp(tmp_path / "out")
    cfg = tiny_config(tmp_path, n_images=2, steps=4, batch_size=1, run_name="paused",
                      runs_dir=str(app.root.runs_dir), output=str(app.root.root / "paused.safetensors"))

    def stop_at_2(info):
        if info["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop_at_2)
    assert [r["name"] for r in app.runs(max_age=0) if r["resume"]] == ["paused"]
    msg, follow = app.resume_run("paused")
    assert msg.startswith("resuming `paused` from step 2 of 4"), msg
    end = time.monotonic() + 180
    while time.monotonic() < end and launcher.poll()["paused"][0] is None:
        time.sleep(0.5)
    rc, log = launcher.poll()["paused"]
    assert rc == 0, log.read_text()[-3000:]
    s = app.run_data("paused").status()
    assert s["status"] == "finished" and s["step"] == 4
    assert [e["step"] for e in app.run_data("paused").reader.events(kind="resume")] == [2]
    assert app.lora_files(app.run_data("paused"))[-1] == str(app.root.root / "paused.safetensors")
    assert not [r for r in app.runs(max_age=0) if r["resume"]]
