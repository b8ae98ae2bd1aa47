"""Resuming from the node: which runs can continue (stale-run detection by pid and process start time), the
resume choice, the conflict message, and a cancelled node run resumed to the LoRA of an uninterrupted one."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig, resume_conflicts
from trainer.runstore import RunStore, process_started, run_state, unfinished_runs

ROOT = Path(__file__).resolve().parents[1]


# ---- stale-run detection ----------------------------------------------------------------------------------------
def test_a_run_whose_process_was_killed_shows_as_interrupted(tmp_path):
    """A real process records itself as the trainer does (build.open_run's meta), is killed: its run reads
    'running' while it lives and 'interrupted' after, and is then listed as resumable once it has a state."""
    code = f"""
import os, socket, sys, time
sys.path.insert(0, {str(ROOT)!r})
from trainer.runstore import RunStore, process_started
s = RunStore({str(tmp_path / "runs" / "killed")!r})
s.set_meta(status="running", optimizer="EmoNavi", steps_total=10, pid=os.getpid(),
           pid_started=process_started(os.getpid()), host=socket.gethostname(), started_at=time.time())
s.event(4, "state", {{}})
print("ready", flush=True)
time.sleep(60)
"""
    (tmp_path / "runs" / "killed" / "state").mkdir(parents=True)
    (tmp_path / "runs" / "killed" / "state" / "state.pt").write_bytes(b"x")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        from trainer.runstore import RunReader

        meta = RunReader(tmp_path / "runs" / "killed").meta()
        assert run_state(meta) == "running" and unfinished_runs(tmp_path / "runs") == []
    finally:
        proc.kill()
        proc.wait()
    assert run_state(meta) == "interrupted"
    runs = unfinished_runs(tmp_path / "runs")
    assert [(r["name"], r["step"], r["how"]) for r in runs] == [("killed", 4, "interrupted")]


def test_a_reused_pid_is_not_the_run_alive():
    """Same pid, another start time: the process that holds the pid now is not the trainer (a restarted
    ComfyUI in a container often gets its old pid)."""
    me, host = os.getpid(), socket.gethostname()
    started = process_started(me)
    assert started is not None and abs(started - time.time()) < 24 * 3600 * 365
    assert run_state({"status": "running", "pid": me, "pid_started": started, "host": host}) == "running"
    assert run_state({"status": "running", "pid": me, "pid_started": started - 50.0, "host": host}) == "interrupted"
    assert run_state({"status": "running", "pid": me, "host": host}) == "running"  # older runs: pid only
    assert run_state({"status": "running", "pid": 2**22 + 12345, "host": host}) == "interrupted"
    assert run_state({"status": "running", "pid": 2**22 + 12345, "host": "elsewhere"}) == "running"  # unknown


def test_process_start_time_without_psutil_agrees_with_psutil(monkeypatch):
    pytest.importorskip("psutil")
    with_psutil = process_started(os.getpid())
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    if sys.platform.startswith("linux") or os.name == "nt":
        assert process_started(os.getpid()) == pytest.approx(with_psutil, abs=1.0)


# ---- which runs can continue ---------------------------------------------------------------------------------------
def _run(runs, name, *, status, reason=None, step=3, total=10, state=True, pid=None):
    s = RunStore(runs / name)
    s.set_meta(status=status, stop_reason=reason, optimizer="EmoLynx", steps_total=total, started_at=time.time(),
               pid=pid or os.getpid(), host=socket.gethostname())
    if state:
        (runs / name / "state").mkdir()
        (runs / name / "state" / "state.pt").write_bytes(b"x")
        s.event(step, "state", {})
    s.close()


def test_unfinished_runs_lists_stopped_cancelled_and_interrupted_runs_with_their_step(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "stopped", status="stopped", reason="stopped", step=5)
    _run(runs, "cancelled", status="stopped", reason="interrupted", step=2)
    _run(runs, "killed", status="running", step=7, pid=2**22 + 12345)
    _run(runs, "finished", status="finished", reason="finished", step=10)
    _run(runs, "auto", status="stopped", reason="should_stop", step=6)  # the optimizer's stop: done, not paused
    _run(runs, "failed", status="failed", step=3)
    _run(runs, "nostate", status="stopped", reason="stopped", state=False)
    _run(runs, "alive", status="running", step=4)  # this process: alive
    _run(runs, "extended", status="stopped", reason="stopped", step=10, total=10)  # no steps left
    got = {r["name"]: (r["step"], r["steps_total"], r["optimizer"], r["how"]) for r in unfinished_runs(runs)}
    assert got == {"stopped": (5, 10, "EmoLynx", "stopped"), "cancelled": (2, 10, "EmoLynx", "cancelled"),
                   "killed": (7, 10, "EmoLynx", "interrupted")}
    assert unfinished_runs(tmp_path / "nothing") == []


def test_resume_conflicts_name_each_setting_that_decides_the_result():
    run = TrainConfig(model="/m.safetensors", data="/d", output="/o.safetensors", rank=4, lr=1e-3, seed=1).to_dict()
    same = TrainConfig(**{**run, "steps": 5000, "save_every": 100, "output": "/other.safetensors", "device": "cuda"})
    assert resume_conflicts(run, same) == []  # steps, saves and where it runs may change
    other = TrainConfig(**{**run, "rank": 8, "optimizer": "EmoSens", "lr": None})
    assert resume_conflicts(run, other) == ["rank: 8 here, 4 in the run", "optimizer: 'EmoSens' here, 'EmoNavi' in "
                                                                           "the run"]


# ---- the node --------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_a_cancelled_node_run_resumes_to_the_uninterrupted_lora(tmp_path, monkeypatch):
    from test_comfy_nodes import _spec, _tiny_dataset, sub

    from trainer.model import tiny_model_path

    common, training = sub("nodes._common"), sub("nodes.training")
    monkeypatch.setattr(training, "send_event", lambda name, data: None)
    dataset = sub("nodes.dataset_spec").build_dataset(str(_tiny_dataset(tmp_path / "d", n=3)), 64, False, 64, 1,
                                                      True)
    runs = str(tmp_path / "runs")
    kw = dict(checkpoint=tiny_model_path(), dataset=dataset, optimizer=_spec("EmoNavi", lr=1e-3),
              lora_dir=str(tmp_path / "loras"), runs_dir=runs, cache_dir=str(tmp_path / "cache"), node_id="3",
              device="cpu", rank=4, steps=5, mixed_precision="no", gradient_checkpointing=False, seed=7,
              network_dropout=0.1)
    ref = training.run_training(output_name="ref", progress=None, **kw)

    class Cancelled(Exception):  # ComfyUI's InterruptProcessingException
        pass

    def cancel_at_2(step, total, preview=None):
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        training.run_training(output_name="cut", progress=cancel_at_2, **kw)
    choices = training.resume_choices(runs)
    assert len(choices) == 1 and choices[0].startswith("cut_00001-") and \
        choices[0].endswith(" (step 2/5, EmoNavi, cancelled)")
    run_dir = training.resume_run_dir(runs, choices[0])
    assert Path(run_dir).parent == Path(runs) and training.resume_run_dir(runs, training.NO_RESUME) is None
    with pytest.raises(common.EmoLoRAError, match="^EmoLoRA Trainer: resume: no run 'gone'"):
        training.resume_run_dir(runs, "gone (step 1/2, EmoNavi, stopped)")
    # a setting that decides the result differs from the run's: one message naming it, nothing trains
    with pytest.raises(common.EmoLoRAError, match=r"^EmoLoRA Trainer: cannot resume cut_00001-\S+ with other "
                                                  r"settings: rank: 8 here, 4 in the run\. Set them back"):
        training.run_training(output_name="cut", progress=None, resume=run_dir, **{**kw, "rank": 8})
    steps = []
    out = training.run_training(output_name="whatever", progress=lambda s, t, p=None: steps.append((s, t)),
                                resume=run_dir, **kw)
    assert steps == [(3, 5), (4, 5), (5, 5)] and out["stop_reason"] == "finished"
    assert out["lora_name"] == "cut_00001.safetensors"  # the run's own file, not a new name
    from _trainer_helpers import lora_tensors

    a, b = lora_tensors(ref["lora_path"]), lora_tensors(out["lora_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert training.resume_choices(runs) == []  # finished: nothing left to resume


def test_the_runs_command_shows_killed_runs_as_interrupted_and_where_they_resume(tmp_path, capsys):
    from trainer.cli import main

    runs = tmp_path / "runs"
    _run(runs, "killed", status="running", step=7, pid=2**22 + 12345)
    _run(runs, "done", status="finished", reason="finished", step=10)
    assert main(["runs", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " interrupted " in lines["killed"] and lines["killed"].endswith("(--resume continues from step 7)")
    assert " finished " in lines["done"] and "--resume" not in lines["done"]
