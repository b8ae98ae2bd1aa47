"""The sweep's overhead: one sweep of N runs against the same N runs trained standalone (each loading the model).

    python benchmarks/bench_sweep.py [--optimizers EmoNavi,EmoSens,AdamW] [--steps 30] [--threads 1]

On the tiny SDXL (offline, cached) and the tests' generated dataset (64 px, rank 4, batch 2, 34% held out,
validation every 10 steps). Prints the sweep's wall time, the sum of its runs' own times (setup, training,
saves), the time outside them (model load, caches, report), the sum of the runs' training-step times, and the
standalone runs' total, in wall and process CPU time (CPU time is the steadier figure on a shared machine).
The tiny model loads in well under a second, so the figure shows the per-run overhead
the sweep keeps, not the load it saves on a real checkpoint.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="EmoNavi,EmoSens,AdamW")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from _trainer_helpers import tiny_config

    from trainer.runstore import RunReader
    from trainer.sweep import plan_sweep, run_sweep
    from trainer.train import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    base = tiny_config(tmp, steps=args.steps, validation_split=0.34, validation_every=10)
    plan = plan_sweep(base, args.optimizers, steps=args.steps, output_dir=tmp / "sweep")
    train(base.replace(steps=2, output=str(tmp / "warmup" / "w.safetensors")))  # first-call costs go here
    t0, c0 = time.perf_counter(), time.process_time()
    for spec in plan.runs:
        train(spec.cfg.replace(output=str(tmp / "alone" / f"{spec.name}.safetensors"),
                               runs_dir=str(tmp / "alone" / "runs")))
    alone_s, alone_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_sweep(plan)
    sweep_s, sweep_cpu = time.perf_counter() - t0, time.process_time() - c0
    runs_s = sum(r["seconds"] for r in result.rows)
    step_s = sum(sum(x["step_time"] for x in RunReader(r["run_dir"]).steps() if x.get("step_time"))
                 for r in result.rows)
    figures = {"runs": len(plan.runs), "steps": args.steps, "sweep_s": sweep_s, "runs_s": runs_s,
               "outside_runs_s": sweep_s - runs_s, "training_steps_s": step_s, "standalone_s": alone_s,
               "model_loads": result.model_loads, "sweep_cpu_s": sweep_cpu, "standalone_cpu_s": alone_cpu}
    print(f"{len(plan.runs)} runs x {args.steps} steps: sweep {sweep_s:.1f}s (runs {runs_s:.1f}s, of which "
          f"training steps {step_s:.1f}s; outside the runs {sweep_s - runs_s:.1f}s), standalone {alone_s:.1f}s; "
          f"CPU time: sweep {sweep_cpu:.1f}s, standalone {alone_cpu:.1f}s")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
