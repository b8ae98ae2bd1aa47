"""Starting a run from the panel's form: a background `python -m trainer train` that the panel then follows."""

import time

import pytest

pytest.importorskip("gradio")

from _trainer_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.slow


def test_start_a_run_from_the_panel(tmp_path):
    from trainer.model import tiny_model_path
    from web.panel import launcher
    from web.panel.app import PanelApp

    app = PanelApp(tmp_path / "out")
    data = make_dataset(tmp_path / "data", n=2)
    msg, _ = app.start_run(str(tmp_path / "missing.safetensors"), str(data), "EmoNavi", "(none)", 3, 64, "x")
    assert msg.startswith("⚠") and "model not found" in msg
    msg, follow = app.start_run(tiny_model_path(), str(data), "EmoLynx", "(none)", 3, 64, "../my run")
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
    # the same name again gets its own folder and LoRA
    assert launcher.unique_name(app.root, "my-run") == "my-run-2"
