"""Multi-process training (trainer/distributed.py) on the CPU with gloo, launched as users do: torchrun (one node,
two nodes over loopback) and `accelerate launch --multi_gpu`.

Each launch is a real `python -m torch.distributed.run ... -m trainer train` (or accelerate's launcher) on the tiny
SDXL at 64 px.
"""

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainer_helpers import lora_tensors, tiny_config
from conftest import require_module

from trainer.launch import launch_command

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # per launch; a healthy one takes well under a minute even on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EMOLORA_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def _config_file(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return path


def _torchrun(nproc: int, *args, nnodes: int = 1, node_rank: int = 0, endpoint: str | None = None) -> list:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:  # torchrun's multi-node rendezvous, here two "nodes" on one machine over loopback
        launcher += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={endpoint}", "--rdzv-id=emolora-test"]
    else:
        launcher += [f"--master_port={_free_port()}"]
    return launcher + list(args)


def _train_args(config: Path, *extra) -> list:
    return ["-m", "trainer", "train", "--config", str(config), "--threads", "1", "--no-progress", *extra]


def _run(cmd, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single_process(cfg):
    from trainer.train import train

    return train(cfg)


def _max_rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a-b| / max|b| (tensors that are all zero in b compare absolutely)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in b:
        scale = float(b[k].abs().max()) or 1.0
        worst = max(worst, float((a[k] - b[k]).abs().max()) / scale)
    return worst


def _step_losses(run_dir) -> list:
    from trainer.runstore import RunReader

    reader = RunReader(run_dir)
    try:
        return [s["loss"] for s in reader.steps() if "loss" in s]
    finally:
        reader.close()


# AdamW's eps is raised so that gradient elements that cancel to ~0 (whose sign is float noise) do not become
# full-size steps: with eps=1e-8 even one process on 1 vs 2 BLAS threads differs by ~1e-2 of max|b| in a
# zero-initialised lora_up after 6 steps. A real fault (other noise, a rank-local loss) differs by O(1).
def _accelerate(nproc: int, *args) -> list:
    """`accelerate launch --multi_gpu`: accelerate starts the workers through torchrun's launcher with the same
    RANK/WORLD_SIZE/LOCAL_RANK variables (gloo here, as no CUDA device is visible). Every choice is given, so no
    accelerate config file is read."""
    require_module("accelerate", "pip install accelerate (requirements-dev.txt)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
            "--num_machines=1", f"--main_process_port={_free_port()}", "--mixed_precision=no",
            "--dynamo_backend=no", *args]


@pytest.mark.parametrize("optimizer,args,launcher", [("AdamW", {"eps": 1e-4}, "two-nodes"),
                                                     ("EmoNavi", {"eps": 1e-4}, "standalone"),
                                                     ("EmoNavi", {"eps": 1e-4}, "accelerate")],
                         ids=["AdamW-two-nodes-loopback", "EmoNavi-one-node", "EmoNavi-accelerate-launch"])
def test_two_ranks_train_the_same_lora_as_one_process_with_twice_the_batch(tmp_path, one_thread, optimizer,
                                                                           args, launcher):
    one = tiny_config(tmp_path / "one", optimizer=optimizer, optimizer_args=args, batch_size=2, steps=6,
                      cache_latents="disk", cache_text="disk")
    ref = _single_process(one)
    two = one.replace(batch_size=1, output=str(tmp_path / "two" / "lora.safetensors"), cache_dir=None)
    config = _config_file(two, tmp_path / "two.json")
    if launcher == "standalone":  # the command a host (panel, node) gets for gpus=2: torchrun --standalone
        results = [_run(launch_command(_train_args(config)[2:], 2))]
    elif launcher == "accelerate":
        results = [_run(_accelerate(2, *_train_args(config)))]
    else:
        endpoint = f"127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen(_torchrun(1, *_train_args(config), nnodes=2, node_rank=r, endpoint=endpoint),
                                  cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in (0, 1)]
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _max_rel_diff(lora_tensors(two.output), lora_tensors(ref.lora_path)) <= 1e-3
    # The optimizer was fed the global mean: the logged losses are one process's, step for step.
    losses2, losses1 = _step_losses(next((tmp_path / "two" / "runs").iterdir())), _step_losses(ref.run_dir)
    assert len(losses2) == len(losses1) == 6
    assert max(abs(a - b) / abs(b) for a, b in zip(losses2, losses1)) < 1e-4
    # Rank 0 alone wrote: one run folder, one LoRA; the disk cache holds each entry once.
    out_dir = tmp_path / "two"
    assert sorted(p.name for p in out_dir.iterdir()) == ["cache", "lora.safetensors", "runs"]
    assert len(list((out_dir / "runs").iterdir())) == 1
    n_latents = len(list((out_dir / "cache" / "latents").rglob("*.safetensors")))
    assert n_latents == len(list((tmp_path / "one" / "out" / "cache" / "latents").rglob("*.safetensors"))) > 0


def test_launch_command_is_the_plain_cli_for_one_process():
    assert launch_command(["train", "--steps", "3"]) == [sys.executable, "-m", "trainer", "train", "--steps", "3"]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        launch_command(["train"], 0)


def test_ranks_out_of_lockstep_fail_loudly_at_the_save(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="AdamW", batch_size=1, steps=3)
    config = _config_file(cfg, tmp_path / "cfg.json")
    r = _run(_torchrun(2, str(ROOT / "tests" / "_dist_worker.py"), str(config), "desync"))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "out of lockstep at step 3" in out and "rank(s) [1]" in out, out[-3000:]
    assert not Path(cfg.output).exists()  # nothing was saved from diverged ranks
    # The features were encoded once, by rank 0; rank 1 found them in the shared disk cache.
    assert "ENCODED rank=0 latents=6 text=6" in out and "ENCODED rank=1 latents=0 text=0" in out, out[-3000:]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _last_state_step(runs: Path):
    from trainer.runstore import RunReader

    for run in runs.iterdir() if runs.is_dir() else ():
        try:
            reader = RunReader(run)
            states = reader.events(kind="state")
            reader.close()
        except Exception:  # the store may not exist yet
            return None
        return max((e["step"] for e in states), default=None)
    return None


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc/<pid>/environ)."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="kill -9 and /proc: Linux")
def test_killed_worker_ends_the_job_naming_the_rank_and_the_run_resumes_under_torchrun(tmp_path):
    from trainer.state import load_state

    cfg = tiny_config(tmp_path, optimizer="EmoNavi", batch_size=1, steps=500, save_state_every=2)
    config = _config_file(cfg, tmp_path / "cfg.json")
    runs = tmp_path / "out" / "runs"
    job = subprocess.Popen(_torchrun(2, *_train_args(config)), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        saved = _wait_for(lambda: (_last_state_step(runs) or 0) >= 2, TIMEOUT, "a saved state")
        assert saved
        pid = _rank_pid(job.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = job.communicate(timeout=120)  # bounded: gloo sees the peer gone; torchrun ends the rest
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert time.monotonic() - t0 < 120
    # torchrun's report: the killed rank is the root cause (the survivor was ended by torchrun or failed its
    # collective with a LockstepError naming itself).
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*-9", out, re.S), out[-3000:]
    run_dir = next(runs.iterdir())
    state = load_state(run_dir / "state" / "state.pt")
    assert len(state["rank_rngs"]) == 2  # every rank's RNGs
    resumed_from = state["loop"]["step"]
    r = _run(_torchrun(2, "-m", "trainer", "train", "--resume", str(run_dir), "--steps", str(resumed_from + 2),
                       "--threads", "1", "--no-progress"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert load_state(run_dir / "state" / "state.pt")["loop"]["step"] == resumed_from + 2
    assert len(list(runs.iterdir())) == 1


def test_panel_stop_ends_every_rank_at_the_same_step_and_a_different_world_resumes(tmp_path):
    from trainer.runstore import RunController, RunReader

    cfg = tiny_config(tmp_path, optimizer="EmoNavi", batch_size=1, steps=500)
    config = _config_file(cfg, tmp_path / "cfg.json")
    runs = tmp_path / "out" / "runs"
    job = subprocess.Popen(_torchrun(2, *_train_args(config)), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        def stepping():
            if not runs.is_dir() or not any(runs.iterdir()):
                return None
            reader = RunReader(next(runs.iterdir()))
            try:
                return (reader.last_step() or 0) >= 2
            finally:
                reader.close()

        _wait_for(stepping, TIMEOUT, "training steps")
        run_dir = next(runs.iterdir())
        RunController(run_dir).request_stop()  # what the panel's Stop button does
        out, _ = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
    # Exit 0: the final save's lockstep check passed, so both ranks stopped after the same step.
    assert job.returncode == 0, out[-3000:]
    reader = RunReader(run_dir)
    meta = reader.meta()
    reader.close()
    assert meta["status"] == "stopped" and meta["stop_reason"] == "stopped" and meta["world_size"] == 2
    done = meta["steps_done"]
    assert 2 <= done < 500
    from safetensors import safe_open

    with safe_open(cfg.output, "pt") as f:
        assert int(f.metadata()["ss_steps"]) == done
        assert int(f.metadata()["ss_total_batch_size"]) == 2  # 1 per rank x 2 ranks
    # A different number of processes (1) continues from the same save.
    r = _run([sys.executable, "-m", "trainer", "train", "--resume", str(run_dir), "--steps", str(done + 1),
              "--threads", "1", "--no-progress"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "saved by 2 process(es), this run has 1" in r.stderr, r.stderr[-3000:]


def test_lockstep_checksum_covers_the_emotion_state_not_only_tensors():
    import torch

    from trainer.distributed import state_checksum
    from trainer.optim import create_optimizer

    p = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = create_optimizer("EmoNavi", p, lr=1e-3)
    for loss in (1.0, 0.9):
        p[0].grad = torch.randn(4, 4)
        opt.step(loss=loss)
    before = state_checksum(p, opt)
    assert state_checksum(p, opt) == before
    sd = opt.state_dict()
    sd["emo"]["hist"][-1] += 1e-9  # a loss history that differs in the last bits, moments untouched
    opt.load_state_dict(sd)
    assert state_checksum(p, opt) != before


def test_panel_start_with_two_gpus_runs_the_same_cli_under_torchrun(tmp_path):
    require_module("gradio", "the panel needs gradio (requirements.txt)")
    from trainer.cli import load_pack

    pack = load_pack().__name__  # the panel imports the trainer relatively, as part of the pack
    launcher = importlib.import_module(f"{pack}.web.panel.launcher")
    PanelRoot = importlib.import_module(f"{pack}.web.panel.paths").PanelRoot

    root = PanelRoot(tmp_path / "out")
    overrides = {"model": str(tmp_path / "m.safetensors"), "data": str(tmp_path), "steps": 5, "resolution": 64}
    one = launcher.build_command(root, [], dict(overrides), "run")
    two = launcher.build_command(root, [], dict(overrides), "run", gpus=2)
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:] == one[1:]  # `-m trainer train ...`, unchanged


def test_panel_start_form_gpus_field_starts_the_run_under_torchrun(tmp_path, monkeypatch):
    require_module("gradio", "the panel needs gradio (requirements.txt)")
    from trainer.cli import load_pack

    pack = load_pack().__name__
    app_mod = importlib.import_module(f"{pack}.web.panel.app")
    launcher = importlib.import_module(f"{pack}.web.panel.launcher")
    (tmp_path / "data" / "photos").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sdxl.safetensors").write_bytes(b"x")
    app = app_mod.PanelApp(tmp_path / "out", model_roots=[tmp_path / "models"], data_roots=[tmp_path / "data"])
    started = []
    monkeypatch.setattr(launcher, "start", lambda root, cmd, name: started.append(cmd))
    values = {"model": "sdxl.safetensors", "dataset": "photos", "optimizer": "EmoNavi", "preset": "(none)",
              "steps": 3, "lr": None, "args_text": "", "resolution": 64, "rank": 4, "name": "multi",
              "network": "lora", "dora": False, "rslora": False, "validation_split": 0.0, "validation_data": None,
              "validation_every": 0, "auto_stop_on": "should_stop", "gpus": 2}
    msg, _ = app.start_run(*[values.get(k) for k in app.FORM + app.LAUNCH])
    assert msg.startswith("started `multi`"), msg
    assert started[0][2:5] == ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert started[0][5:8] == ["-m", "trainer", "train"]


def test_a_host_follows_a_two_rank_child_run_and_stops_it(tmp_path):
    """What a ComfyUI node with gpus=2 does: run_child starts torchrun, relays each step, Stops via the control file."""
    from trainer.launch import run_child

    cfg = tiny_config(tmp_path, optimizer="EmoNavi", batch_size=1, steps=500)
    records = []
    result = run_child(cfg, 2, on_step=records.append, should_stop=lambda: len(records) >= 2, poll_s=0.2)
    assert result.stop_reason == "stopped" and 2 <= result.steps_done < 500
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["steps_total"] == 500 and r["run_dir"] == result.run_dir for r in records)
    assert Path(result.lora_path).is_file() and result.lora_path in result.saved
    from trainer.runstore import RunReader

    reader = RunReader(result.run_dir)
    assert reader.meta()["world_size"] == 2
    reader.close()


def test_comfy_trainer_with_two_gpus_trains_in_a_torchrun_child_and_cancel_saves(tmp_path, monkeypatch):
    """The Trainer node's gpus=2 path (nodes/training.py): steps relayed to the progress bar, Cancel stops the
    child through the control file and the LoRA so far is saved, as for an in-process run."""
    from test_comfy_nodes import _spec, _tiny_dataset, sub

    from trainer.model import tiny_model_path
    from trainer.runstore import RunReader

    training = sub("nodes.training")
    events = []
    monkeypatch.setattr(training, "send_event", lambda name, data: events.append((name, data)))
    dataset = sub("nodes.dataset_spec").build_dataset(str(_tiny_dataset(tmp_path)), 64, False, 64, 1, False)

    class Cancelled(Exception):  # stands in for ComfyUI's InterruptProcessingException
        pass

    seen = []

    def cancel_at_2(step, total, preview=None):
        seen.append(step)
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        training.run_training(checkpoint=tiny_model_path(), dataset=dataset, optimizer=_spec("EmoNavi"),
                              lora_dir=str(tmp_path / "loras"), runs_dir=str(tmp_path / "runs"),
                              cache_dir=str(tmp_path / "cache"), output_name="multi", node_id="3", device="cpu",
                              progress=cancel_at_2, rank=4, steps=50, batch_size=1, mixed_precision="no",
                              gradient_checkpointing=False, gpus=2)
    assert seen == [1, 2]
    assert (tmp_path / "loras" / "multi_00001.safetensors").is_file()
    assert events[-1][1]["status"] == "interrupted"
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    reader = RunReader(run_dir)
    meta = reader.meta()
    reader.close()
    assert meta["world_size"] == 2 and meta["stop_reason"] == "stopped" and meta["steps_done"] < 50
