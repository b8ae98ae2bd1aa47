"""What Windows does differently, simulated on Linux: a file another process holds open cannot be replaced
(PermissionError), WAL does not work on network or synced folders, os.kill(pid, 0) is not a liveness probe, no
NCCL and no libuv in torch's Windows builds, and no process-group signals. docs/windows.md says what these
simulations cover and what has never run on Windows."""

import json
import logging
import os
import sqlite3
import subprocess
import sys
import types

import pytest

from trainer import atomic, launch, runstore
from trainer.distributed import process_backend


def held_open(monkeypatch, targets, times=None):
    """os.replace raises PermissionError (WinError 5) onto `targets` (all of them: `times` None, forever), as on
    Windows while another process has the file open; returns the list of blocked attempts."""
    real = os.replace
    blocked = []

    def fake(src, dst, *a, **k):
        if os.fspath(dst) in {os.fspath(t) for t in targets} and (times is None or len(blocked) < times):
            blocked.append(os.fspath(dst))
            raise PermissionError(13, "Access is denied", os.fspath(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(atomic.os, "replace", fake)
    return blocked


def test_a_short_hold_is_waited_out(tmp_path, monkeypatch):
    """An antivirus or sync client holds the file for a moment: the replace is retried and lands on the name."""
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"old")
    blocked = held_open(monkeypatch, [path], times=3)
    assert atomic.atomic_write_bytes(path, b"new", new_name_if_held=True) == path
    assert len(blocked) == 3 and path.read_bytes() == b"new"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_lora_held_open_goes_to_a_new_name_and_other_files_fail_cleanly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(atomic, "REPLACE_WAIT_S", 0.2)
    path = tmp_path / "my lora.safetensors"
    path.write_bytes(b"loaded in ComfyUI")
    (tmp_path / "my lora-2.safetensors").write_bytes(b"an earlier fallback")
    held_open(monkeypatch, [path])
    with caplog.at_level(logging.WARNING, logger="emolora.atomic"):
        written = atomic.atomic_write_bytes(path, b"weights", new_name_if_held=True)
    assert written == tmp_path / "my lora-3.safetensors" and written.read_bytes() == b"weights"
    assert path.read_bytes() == b"loaded in ComfyUI"
    assert "could not replace" in caplog.text and "my lora-3.safetensors" in caplog.text
    # a file that must keep its name (state, control, config): the error, the old file, no temporary left
    control = tmp_path / "control.json"
    control.write_text("{}")
    held_open(monkeypatch, [control])
    with pytest.raises(PermissionError):
        atomic.atomic_write_json(control, {"stop": True})
    assert control.read_text() == "{}" and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_training_over_a_held_lora_keeps_the_weights_under_a_new_name(tmp_path, monkeypatch, one_thread):
    """The CLI's fixed --output while ComfyUI has that LoRA loaded (Windows): the run still ends with its weights
    on disk, under a new name recorded in the run; paths with spaces and non-ASCII letters throughout."""
    from _trainer_helpers import lora_tensors, tiny_config

    from trainer.runstore import RunReader
    from trainer.train import train

    monkeypatch.setattr(atomic, "REPLACE_WAIT_S", 0.2)
    root = tmp_path / "Zoë's LoRAs" / "日本 語"
    cfg = tiny_config(root, steps=1, n_images=2, output=str(root / "out dir" / "my lora ü.safetensors"))
    out = root / "out dir" / "my lora ü.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"the LoRA ComfyUI has loaded")
    held_open(monkeypatch, [out])
    result = train(cfg)
    renamed = root / "out dir" / "my lora ü-2.safetensors"
    assert result.lora_path == str(renamed) and out.read_bytes() == b"the LoRA ComfyUI has loaded"
    import torch
    from safetensors import safe_open

    tensors = lora_tensors(renamed)
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    with safe_open(str(renamed), "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "my lora ü", meta.get("ss_output_name")  # UTF-8 in the header, as kohya
    reader = RunReader(result.run_dir)
    try:
        assert [e["data"] for e in reader.events(kind="save_renamed")] == [{"path": str(renamed), "held": str(out)}]
        assert reader.meta()["lora_path"] == str(renamed)
    finally:
        reader.close()


def test_windows_paths_in_options_stay_as_typed(monkeypatch):
    """Drive letters, backslashes, spaces and non-ASCII letters pass the CLI's --set and a config file unchanged
    (no ':' or '\\' is taken apart), and the ComfyUI Dataset node's folder box takes a quoted Windows path
    ("Copy as path" in Explorer) as absolute."""
    import ntpath

    from trainer.cli import _parse_set, load_pack
    from trainer.config import build_config

    typed = {"validation_data": "C:\\Users\\Zoë\\val set", "data": "D:\\データ\\1_sks",
             "output": "E:\\LoRAs\\my lora.safetensors", "model": "\\\\nas\\models\\sdxl base.safetensors"}
    parsed = _parse_set([f"{k}={v}" for k, v in typed.items()])
    assert parsed == typed
    cfg = build_config(presets=[], overrides=json.loads(json.dumps(parsed)), validate=False)
    assert {k: getattr(cfg, k) for k in typed} == typed
    load_pack()
    from emolora.nodes import _common

    assert _common.resolve_input_path('"C:\\Users\\Zoë\\my set"', pathmod=ntpath) == "C:\\Users\\Zoë\\my set"


def test_wal_that_fails_falls_back_to_the_rollback_journal(tmp_path, monkeypatch, caplog):
    class NoWal(sqlite3.Connection):  # a filesystem without shared memory for -shm
        def execute(self, sql, *args):
            if sql.replace(" ", "").upper() == "PRAGMAJOURNAL_MODE=WAL":
                raise sqlite3.OperationalError("disk I/O error")
            return super().execute(sql, *args)

    real = sqlite3.connect
    monkeypatch.setattr(runstore.sqlite3, "connect", lambda *a, **k: real(*a, factory=NoWal, **k))
    with caplog.at_level(logging.WARNING, logger="emolora.runstore"):
        store = runstore.RunStore(tmp_path / "run")
    store.log_step(1, {"loss": 0.5})
    monkeypatch.setattr(runstore.sqlite3, "connect", real)
    reader = runstore.RunReader(tmp_path / "run")
    try:  # a reader in another connection sees the step: the store works without WAL
        assert [r["loss"] for r in reader.steps()] == [0.5]
        assert reader.meta()["journal_mode"] == "delete" and "disk I/O error" in reader.meta()["journal_note"]
        assert reader._conn().execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        reader.close()
        store.close()
    assert "telemetry without WAL" in caplog.text


@pytest.mark.parametrize("folder, expected", [
    ("\\\\nas\\share\\runs", "network share"), ("//nas/share/runs", "network share"),
    ("/home/a/OneDrive - Firma/runs", "synced folder"), ("/Users/a/Dropbox/loras/runs", "synced folder"),
    ("/home/a/loras/runs", None), ("/home/a/onedrive_backup_notes/runs", None)])
def test_network_and_synced_folders_are_recognised(folder, expected):
    reason = runstore.wal_unsafe_reason(folder)
    assert (reason is None) if expected is None else (expected in reason), reason


def test_a_run_store_in_a_synced_folder_does_not_use_wal(tmp_path):
    store = runstore.RunStore(tmp_path / "Dropbox" / "runs" / "r1")
    try:
        assert store.journal_mode == "delete" and "synced folder (dropbox)" in store.journal_note
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        store.close()
    local = runstore.RunStore(tmp_path / "runs" / "r2")
    assert local.journal_mode == "wal" and local.journal_note is None
    local.close()


def test_liveness_on_windows_asks_the_kernel_not_os_kill(monkeypatch):
    """os.kill(pid, 0) is CTRL_C_EVENT on Windows (it would interrupt the trainer's console): never called there.
    An ended process whose handle someone still holds opens fine: its exit code says it ended."""
    exit_codes = {101: 259, 102: 0}  # 259 = STILL_ACTIVE

    class Kernel32:
        def OpenProcess(self, access, inherit, pid):  # noqa: N802 - the Win32 names
            return pid if pid in exit_codes else 0

        def GetExitCodeProcess(self, handle, ref):  # noqa: N802
            ref._obj.value = exit_codes[handle]
            return 1

        def CloseHandle(self, handle):  # noqa: N802
            return 1

    import ctypes

    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=Kernel32()), raising=False)
    monkeypatch.setattr(runstore.os, "name", "nt")
    monkeypatch.setattr(runstore.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    assert runstore._pid_alive(101) is True
    assert runstore._pid_alive(102) is False  # ended, handle still open somewhere
    assert runstore._pid_alive(103) is False  # no such process


def test_torchrun_on_windows_gets_gloo_and_no_libuv():
    assert process_backend("cuda", windows=True) == "gloo" and process_backend("cuda", windows=False) == "nccl"
    assert process_backend("cpu", windows=False) == "gloo"
    env = launch.child_env("C:\\Program Files\\ComfyUI\\custom_nodes\\emolora", {"PATH": "x"}, windows=True)
    assert env["USE_LIBUV"] == "0" and env["PYTHONPATH"].startswith("C:\\Program Files\\ComfyUI")
    assert "USE_LIBUV" not in launch.child_env("/opt/emolora", {"PATH": "x"}, windows=False)
    assert launch.child_env("/r", {"USE_LIBUV": "1"}, windows=True)["USE_LIBUV"] == "1"  # the user's choice stays
    if os.name != "nt":
        assert launch.popen_group_options(windows=False) == {"start_new_session": True}


def test_ending_a_child_on_windows_ends_its_whole_tree(monkeypatch):
    """No process-group signals on Windows: torchrun's ranks would outlive a TerminateProcess of torchrun."""
    calls = []

    class Proc:
        pid, returncode = 4242, None

        def poll(self):
            return self.returncode

        def wait(self, timeout=None):
            self.returncode = 1
            return 1

    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **k: calls.append(cmd))
    launch.kill_tree(Proc(), windows=True)
    assert calls == [["taskkill", "/PID", "4242", "/T", "/F"]]


def test_ending_a_child_tree_on_posix_ends_its_grandchildren(tmp_path):
    """The same on POSIX, for real: a child in its own session with a grandchild; kill_tree ends both."""
    if os.name == "nt":
        pytest.skip("POSIX sessions")
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], **launch.popen_group_options(windows=False))
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        import time

        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    launch.kill_tree(proc, windows=False)
    assert proc.returncode is not None
    for _ in range(100):  # the grandchild is reparented and reaped by init: it disappears
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.05)
    else:
        pytest.fail("the grandchild outlived kill_tree")
