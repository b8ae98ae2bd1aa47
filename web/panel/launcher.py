"""Start a training run from the panel: `python -m trainer train ...` in a background process.

A subprocess keeps a crash, a CUDA out-of-memory or a hung data loader away from the panel (and from ComfyUI).
The run's folder, LoRA and caches go under the panel's output folder; the panel follows it through RunReader
like any other run. The process's output goes to <output folder>/panel-logs/<run name>.log.
"""

import json
import re
import subprocess
import threading
import time
from pathlib import Path

from ...trainer.config import build_config
from ...trainer.launch import child_env, launch_command, popen_group_options
from .paths import SAFE_NAME, PathError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding trainer/: `-m trainer` runs there
# Options with a flag of their own on the trainer's command line (the rest go as --set KEY=JSON).
FLAGS = {"model": "--model", "data": "--data", "optimizer": "--optimizer", "steps": "--steps", "lr": "--lr",
         "resolution": "--resolution", "rank": "--rank"}

_procs: dict = {}  # run name -> Popen
_lock = threading.Lock()


def safe_run_name(name: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip(".-")[:80]
    return name if name and SAFE_NAME.match(name) else fallback


def unique_name(root, base: str) -> str:
    name, n = base, 1
    while (root.runs_dir / name).exists() or (root.root / f"{name}.safetensors").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def build_command(root, presets: list, overrides: dict, name: str, gpus: int = 1) -> list:
    """The trainer's command line for a run named `name` whose LoRA is <root>/<name>.safetensors, its run folder
    under the panel's runs folder. The merged config is validated here first (a bad value is reported in the
    form, not in a log). gpus > 1: the same CLI under torchrun, one process per GPU."""
    overrides = {**overrides, "output": str(root.root / f"{name}.safetensors"), "run_name": name,
                 "runs_dir": str(root.runs_dir)}
    build_config(presets=presets, overrides=overrides)  # raises ConfigError naming the bad option
    args = ["train", "--no-progress", "--output", overrides.pop("output"), "--run-name", overrides.pop("run_name")]
    for p in presets:
        args += ["--preset", p]
    for k, v in overrides.items():
        args += [FLAGS[k], str(v)] if k in FLAGS else ["--set", f"{k}={json.dumps(v)}"]
    return launch_command(args, gpus)


def resume_command(run_dir, processes: int = 1) -> list:
    """The trainer's command line that continues `run_dir` from its saved state (the CLI's --resume), with as
    many processes as it was trained with."""
    return launch_command(["train", "--no-progress", "--resume", str(run_dir)], processes)


def start(root, cmd: list, name: str) -> subprocess.Popen:
    """Run `cmd` in the background from the folder holding the trainer package; output to a log file."""
    logs = root.root / "panel-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    cwd = str(PACKAGE_ROOT)
    env = child_env(cwd)  # the trainer importable; USE_LIBUV=0 for torchrun on Windows
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **popen_group_options())
    proc.log_path = log_path
    proc.started = time.time()
    with _lock:
        _procs[name] = proc
    return proc


def poll() -> dict:
    """name -> (return code or None while running, log path); reaps finished processes."""
    with _lock:
        return {n: (p.poll(), p.log_path) for n, p in _procs.items()}


def log_tail(root, name: str, lines: int = 12) -> str:
    try:
        path = root.file(root.root / "panel-logs" / f"{name}.log")
    except PathError:
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])
