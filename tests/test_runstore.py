import json
import math
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from trainer.runstore import ControlPoller, RunController, RunReader, RunStore


def test_records_events_meta_roundtrip(tmp_path):
    store = RunStore(tmp_path / "runs" / "r1")
    store.set_meta(status="running", optimizer="EmoNavi", signals=["emo_scalar", "trust"], pid=123)
    store.log_step(1, {"loss": 0.5, "lr": 1e-4, "emo_scalar": -0.1, "should_stop": False})
    store.log_step(2, {"loss": float("nan"), "skipped": True})
    store.event(2, "should_stop", {"value": True})
    reader = RunReader(tmp_path / "runs" / "r1")
    steps = reader.steps()
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["emo_scalar"] == -0.1 and steps[1]["loss"] is None and steps[1]["skipped"] is True
    assert reader.steps(since=1)[0]["step"] == 2
    assert reader.meta()["signals"] == ["emo_scalar", "trust"]
    ev = reader.events()
    assert ev[0]["kind"] == "should_stop" and ev[0]["data"] == {"value": True}
    assert reader.events(since_id=ev[0]["id"]) == []
    assert reader.last_step() == 2
    store.truncate_after(1)
    assert reader.last_step() == 1
    store.close()
    reader.close()
    db = sqlite3.connect(tmp_path / "runs" / "r1" / "telemetry.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reader_in_another_thread_sees_steps_while_the_writer_writes(tmp_path):
    store = RunStore(tmp_path / "r")
    reader = RunReader(tmp_path / "r")
    seen, errors, done = [], [], threading.Event()

    def poll():
        last = -1
        try:
            while not done.is_set() or last < 199:
                for rec in reader.steps(since=last):
                    assert rec["step"] == last + 1 if last >= 0 else True
                    last = rec["step"]
                    seen.append(last)
                time.sleep(0.001)
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=poll)
    t.start()
    for step in range(200):
        store.log_step(step, {"loss": 1.0 / (step + 1), "t": time.time()})
    done.set()
    t.join(10)
    assert not errors and seen == list(range(200))
    store.close()


def test_reader_in_another_process_while_writing(tmp_path):
    store = RunStore(tmp_path / "r")
    store.log_step(0, {"loss": 1.0})
    code = (
        "import sys, time; sys.path.insert(0, '.');"
        "from trainer.runstore import RunReader;"
        f"r = RunReader({str(tmp_path / 'r')!r}); last = -1; t0 = time.time()\n"
        "while last < 49 and time.time() - t0 < 20:\n"
        "    rows = r.steps(since=last)\n"
        "    last = rows[-1]['step'] if rows else last\n"
        "print(last)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for step in range(1, 50):
        store.log_step(step, {"loss": 1.0})
        time.sleep(0.002)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "49"
    store.close()


def test_list_runs_newest_first_and_liveness(tmp_path):
    for i, status in enumerate(["finished", "running"]):
        s = RunStore(tmp_path / "runs" / f"run{i}")
        s.set_meta(status=status, started_at=1000.0 + i, pid=999_999_999, host=None)
        s.close()
    runs = RunReader.list_runs(tmp_path)  # an output folder that holds runs/
    assert [r["name"] for r in runs] == ["run1", "run0"] and runs[0]["status"] == "running"
    assert RunReader(runs[0]["run_dir"]).is_alive() is False  # 'running' but no such process
    assert RunReader.list_runs(tmp_path / "missing") == []


def test_controller_and_poller(tmp_path):
    poller = ControlPoller(tmp_path, auto_stop="stop")
    assert poller.poll()["stop"] is False and poller.poll()["auto_stop"] == "stop"
    ctl = RunController(tmp_path)
    assert ctl.request_save() == 1 and ctl.request_save() == 2
    ctl.set_auto_stop("mark")
    assert poller.poll()["save_now"] == 2 and poller.poll()["auto_stop"] == "mark"
    ctl.request_stop()
    assert poller.poll()["stop"] is True
    with pytest.raises(ValueError, match="auto_stop"):
        ctl.set_auto_stop("sometimes")
    assert json.loads((tmp_path / "control.json").read_text())["seq"] == 4


def test_non_finite_values_are_stored_as_null(tmp_path):
    store = RunStore(tmp_path)
    store.log_step(1, {"a": math.inf, "b": [1.0, -math.inf], "c": {"d": math.nan}})
    (rec,) = RunReader(tmp_path).steps()
    assert rec["a"] is None and rec["b"] == [1.0, None] and rec["c"] == {"d": None}
    store.close()
