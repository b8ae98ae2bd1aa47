"""A training run as N local processes, for hosts (the panel's start form, a ComfyUI node): its command line,
and run_child, which runs it as a child process and follows it through its run store.

`gpus=2` means `torchrun --standalone --nproc_per_node=2 -m trainer train ...` (trainer/distributed.py does the
rest inside the processes). Torch-free at import: the panel imports it. No POSIX signal is needed anywhere: a
child is stopped through its control file (it saves, then ends), and only ended by force (kill_tree) when it does
not within STOP_GRACE_S.
"""

import os
import subprocess
import sys

STOP_GRACE_S = 60.0  # how long a child asked to stop may take to save before it is ended


def launch_command(cli_args: list, processes: int = 1) -> list:
    """The command that runs `python -m trainer <cli_args>` as `processes` local ranks: torchrun with its
    single-machine rendezvous (--standalone: it picks a free port) for more than one, the plain CLI for one."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return [sys.executable, "-m", "trainer", *cli_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trainer", *cli_args]


def child_env(root, environ=None, windows: bool = os.name == "nt") -> dict:
    """The child's environment: the trainer package importable (PYTHONPATH), and on Windows USE_LIBUV=0: torch's
    Windows wheels (2.4 and later) are built without libuv, which torchrun's TCPStore would otherwise ask for."""
    environ = os.environ if environ is None else environ
    env = {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), environ.get("PYTHONPATH")]))}
    if windows:
        env.setdefault("USE_LIBUV", "0")
    return env


def popen_group_options(windows: bool = os.name == "nt") -> dict:
    """Start a child that outlives its host (the panel's runs) in its own process group (POSIX: session), so a
    Ctrl+C in the host's console does not reach it; it is stopped through its control file."""
    if windows:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_tree(proc, windows: bool = os.name == "nt") -> None:
    """End a child and every process it started, now (no save: the last resort after the control file's Stop).
    Windows has no process-group signals: TerminateProcess on torchrun would leave its ranks running, so
    taskkill /T ends the tree; on POSIX the child's own session gets SIGKILL."""
    if proc.poll() is not None:
        return
    if windows:
        subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    else:
        import signal

        try:
            if os.getpgid(proc.pid) != proc.pid:  # not a group leader: its children are not reachable as a group
                raise ProcessLookupError
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
    proc.wait()


def run_child(config, processes: int, *, on_step=None, should_stop=None, poll_s: float = 0.5):
    """Train `config` (a TrainConfig) in a child process, as `processes` ranks under torchrun when more than one,
    and follow it through its run store, as an in-process run is followed: on_step(record + step, steps_total,
    run_dir) for each new step, should_stop() polled (True: Stop through the control file, as the panel does). An
    exception from on_step stops the child too (it saves), then propagates. -> the TrainResult read from the run
    store; a child that fails raises RuntimeError with the end of its output."""
    import json
    import tempfile
    import time
    from pathlib import Path

    from .runstore import RunController, RunReader
    from .train import TrainResult

    runs_dir = Path(config.runs_dir or Path(config.output).expanduser().parent / "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    name = config.run_name or f"{Path(config.output).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    while (runs_dir / name).exists():
        name += "-2"
    run_dir = runs_dir / name
    cfg_file = tempfile.NamedTemporaryFile("w", suffix=".json", prefix=f"{name}-", dir=runs_dir, delete=False)
    with cfg_file:
        json.dump({**config.to_dict(), "run_name": name, "runs_dir": str(runs_dir)}, cfg_file)
    log_path = runs_dir / f"{name}.launch.log"
    cmd = launch_command(["train", "--config", cfg_file.name, "--no-progress"], processes)
    seen, stopping, error = 0, False, None
    root = Path(__file__).resolve().parent.parent  # the folder holding trainer/: `-m trainer` runs there
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=child_env(root), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # ComfyUI's group: a Ctrl+C there reaches it too
    try:
        while True:
            done = proc.poll() is not None
            if run_dir.joinpath("telemetry.sqlite").is_file():
                reader = RunReader(run_dir)
                try:
                    records = [r for r in reader.steps(since=seen) if "loss" in r]
                finally:
                    reader.close()
                for rec in records:
                    seen = rec["step"]
                    if on_step is not None and error is None:
                        try:
                            on_step({**rec, "steps_total": config.steps, "run_dir": str(run_dir)})
                        except BaseException as e:  # e.g. ComfyUI's interrupt: stop the child, then re-raise
                            error = e
            if not stopping and (error is not None or (should_stop is not None and should_stop())):
                RunController(run_dir).request_stop()
                stopping = True
            if done:
                break
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # our caller is going away: the child (and its ranks) must not outlive it
            if not stopping:
                RunController(run_dir).request_stop()
            try:
                proc.wait(timeout=STOP_GRACE_S)  # the Stop saves the LoRA first
            except subprocess.TimeoutExpired:
                kill_tree(proc)
        Path(cfg_file.name).unlink(missing_ok=True)
    if error is not None:
        raise error
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"training in {processes} process(es) failed (exit {proc.returncode}); log "
                           f"{log_path}:\n{tail}")
    reader = RunReader(run_dir)
    try:
        meta = reader.meta()
        saved = [e["data"]["path"] for e in reader.events(kind="save") if e.get("data")]
    finally:
        reader.close()
    return TrainResult(meta.get("lora_path"), str(run_dir), meta.get("steps_done", 0), meta.get("stop_reason"),
                       meta.get("skipped_steps", 0), saved, meta.get("summary") or {})
