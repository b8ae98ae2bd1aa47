"""The panel's path safety (run folders, files, form paths confined to their roots) and its launching rules
(loopback only unless asked, never remote without credentials)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_module

require_module("gradio", "the panel needs gradio (requirements.txt)")

from _panel_helpers import fake_run  # noqa: E402

from trainer.cli import load_pack  # noqa: E402

load_pack()  # the panel is part of the pack: it imports the trainer relatively
from emolora.web.panel import auth  # noqa: E402
from emolora.web.panel.paths import PanelRoot, PathError, Roots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_traversal_symlinks_and_private_files_are_refused(tmp_path):
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
    state = out / "runs" / "ok" / "state"
    state.mkdir()
    for private in (state / "state.pt", state / "lora.safetensors"):
        private.write_bytes(b"private")
    root = PanelRoot(out)
    assert root.runs_dir == out.resolve() / "runs"
    assert root.run_dir("ok") == (out / "runs" / "ok").resolve()
    for bad in ("../secret/elsewhere", "..", ".", "/etc", "ok/../../secret", "linked", "missing", "", None,
                "ok\x00", "%2e%2e"):
        with pytest.raises(PathError):
            root.run_dir(bad)
    for bad in (secret / "key.safetensors", out / ".." / "secret" / "key.safetensors", "/etc/passwd",
                out / "runs" / "escape.safetensors", out / "runs" / "ok" / "samples" / "evil.png",
                state / "state.pt", state / "lora.safetensors", out / "runs" / "ok" / "telemetry.sqlite",
                out / "runs" / "ok" / "telemetry.sqlite-wal", out / "runs" / "ok" / "telemetry.sqlite-shm"):
        with pytest.raises(PathError):
            root.file(bad)
    with pytest.raises(PathError, match="private"):
        root.file(state / "state.pt")
    assert root.file(out / "mine.safetensors") == (out / "mine.safetensors").resolve()
    from emolora.web.panel.app import PanelApp

    app = PanelApp(out)
    rd = app.run_data("ok")
    assert app.lora_files(rd) == [] and app.sample_files(rd) == []
    assert app.run_data("../secret/elsewhere") is None and app.run_data("linked") is None
    assert "outside the output folder" in app.status_html(rd)
    assert app.request_stop("../secret/elsewhere").startswith("⚠")
    assert app.set_auto_stop("linked", True).startswith("⚠")
    assert not (secret / "elsewhere" / "control.json").exists()


def test_form_paths_are_confined_to_their_roots(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "m.safetensors").write_bytes(b"x")
    (models / "diffusers-model").mkdir()
    (models / "diffusers-model" / "model_index.json").write_text("{}")
    (models / ".hidden").mkdir()
    (models / ".hidden" / "h.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (models / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    roots = Roots("model", "--model-root", [models])
    assert roots.resolve("sub/m.safetensors") == (models / "sub" / "m.safetensors").resolve()  # relative: 1st root
    assert roots.resolve(str(models / "sub" / "m.safetensors")) == (models / "sub" / "m.safetensors").resolve()
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "link.safetensors", "/etc/passwd",
                "sub/../../outside.safetensors", "", None):
        with pytest.raises(PathError):
            roots.resolve(bad)
    with pytest.raises(PathError, match="--model-root DIR"):
        roots.resolve("/etc/passwd")
    found = roots.scan(lambda p: p.suffix == ".safetensors" and p.is_file()
                       or p.is_dir() and (p / "model_index.json").is_file())
    assert found == [str(models.resolve() / "diffusers-model"), str(models.resolve() / "link.safetensors"),
                     str(models.resolve() / "sub" / "m.safetensors")]  # a link is listed; resolve() refuses it


def test_launch_refuses_other_interfaces_without_the_flag_or_credentials(capsys, tmp_path, monkeypatch):
    import emolora.web.panel as panel

    monkeypatch.delenv(auth.ENV, raising=False)
    before = panel.url()  # an earlier test's loopback panel may still be up in this process
    with pytest.raises(ValueError, match="allow_remote"):
        panel.launch("unused", host="0.0.0.0")
    with pytest.raises(ValueError, match="needs credentials.*--auth USER:PASS.*--auth-file.*EMOLORA_PANEL_AUTH"):
        panel.launch("unused", host="0.0.0.0", allow_remote=True)
    assert panel.main(["--host", "192.168.1.5"]) == 2
    assert "--listen-all" in capsys.readouterr().out
    assert panel.main(["--listen-all"]) == 2
    assert "needs credentials" in capsys.readouterr().out and panel.url() == before  # nothing new started
    args = panel.build_parser().parse_args([])
    assert args.host is None and args.port == 7861 and not args.listen_all
    assert args.auth is None and args.model_root is None and args.data_root is None
    # the CLI's entry
    r = subprocess.run([sys.executable, "-m", "trainer", "panel", "--host", "0.0.0.0", "--listen-all"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, auth.ENV: ""})
    assert r.returncode == 2 and "needs credentials" in r.stdout, r.stdout + r.stderr


def test_credentials_from_flags_file_and_environment(tmp_path):
    f = tmp_path / "logins"
    f.write_text("# the panel's users\nann:pa:ss word\n\nbob:x\n")
    assert auth.credentials(["me:1"], f, env="env:2") == [("me", "1"), ("ann", "pa:ss word"), ("bob", "x"),
                                                          ("env", "2")]
    assert auth.credentials([], None, env="") == []
    for pairs, file, env, match in ((["nocolon"], None, "", "--auth #1, line 1"), ([":p"], None, "", "user:pass"),
                                    ([], tmp_path / "none", "", "cannot read"), ([], None, "u:", "EMOLORA_PANEL_AUTH")):
        with pytest.raises(auth.AuthError, match=match):
            auth.credentials(pairs, file, env=env)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(auth.AuthError, match="no user:pass"):
        auth.credentials([], tmp_path / "empty", env="")
