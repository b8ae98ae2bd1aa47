"""A training run as N local processes, for hosts (the panel's start form, a ComfyUI node): its command line,
and run_child, which runs it as a child process and follows it through its run store.

`gpus=2` means `torchrun --standalone --nproc_per_node=2 -m trainer train ...` (trainer/distributed.py does the
rest inside the processes). Torch-free at import: the panel imports it.
"""

import os
import sys


def launch_command(cli_args: list, processes: int = 1) -> list:
    """The command that runs `python -m trainer <cli_args>` as `processes` local ranks: torchrun with its
    single-machine rendezvous (--standalone: it picks a free port) for more than one, the plain CLI for one."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1:
        return [sys.executable, "-m", "trainer", *cli_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trainer", *cli_args]


def run_child(config, processes: int, *, on_step=None, should_stop=None, poll_s: float = 0.5):
    """Train `config` (a TrainConfig) in a child process, as `processes` ranks under torchrun when more than one,
    and follow it through its run store, as an in-process run is followed: on_step(record + step, steps_total,
    run_dir) for each new step, should_stop() polled (True: Stop through the control file, as the panel does). An
    exception from on_step stops the child too (it saves), then propagates. -> the TrainResult read from the run
    store; a child that fails raises RuntimeError with the end of its output."""
    import json
    import subprocess
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
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
        if proc.poll() is None:  # our caller is going away: the child must not outlive it
            proc.terminate()
            proc.wait()
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
