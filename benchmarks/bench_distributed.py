"""Steps/s of one process against N ranks under torchrun (gloo on the CPU, NCCL on GPUs), same per-rank batch.

    python benchmarks/bench_distributed.py [--ranks 2] [--steps 30] [--batch-size 1] [--resolution 64]
                                           [--device cpu] [--threads 1]

Trains the tiny SDXL (offline, cached) on a generated dataset through the real CLI, once as one process and once
under `torchrun --nproc_per_node=N`, and prints each run's steps/s and samples/s (global batch = per-rank batch x
ranks) from its run store, as a table and as JSON. Each rank gets --threads CPU threads: on a machine with fewer
cores than ranks x threads the ranks compete for the cores, and the figure shows that, not the scaling.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ranks: int, args, work: Path) -> dict:
    from trainer.runstore import RunReader

    out = work / f"r{ranks}"
    train = ["-m", "trainer", "train", "--config", str(work / "cfg.json"), "--output", str(out / "lora.safetensors"),
             "--threads", str(args.threads), "--no-progress"]
    if ranks == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={_free_port()}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{r.stderr[-4000:]}")
    reader = RunReader(next((out / "runs").iterdir()))
    try:
        steps = [s for s in reader.steps() if "step_time" in s]
    finally:
        reader.close()
    times = sorted(s["step_time"] for s in steps[args.warmup:])  # the first steps pay one-time costs
    median = times[len(times) // 2]
    global_batch = args.batch_size * ranks
    return {"ranks": ranks, "global_batch": global_batch, "steps": len(steps), "steps_per_s": 1 / median,
            "samples_per_s": global_batch / median, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1, help="per rank")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--optimizer", default="EmoNavi")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()

    from _trainer_helpers import make_dataset

    from trainer.model import tiny_model_path

    work = Path(tempfile.mkdtemp(prefix="emolora-bench-dist-"))
    data = make_dataset(work / "data", n=16, sizes=((96, 64), (64, 96), (80, 80)))
    cfg = {"model": tiny_model_path(), "data": str(data), "resolution": args.resolution, "bucket_step": 32,
           "rank": 4, "batch_size": args.batch_size, "steps": args.steps, "seed": 1, "optimizer": args.optimizer,
           "lr": 1e-3, "gradient_checkpointing": False, "device": args.device, "cache_latents": "disk",
           "cache_text": "disk", "cache_dir": str(work / "cache")}
    (work / "cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    rows = [_run(n, args, work) for n in (1, args.ranks)]
    print(f"tiny SDXL, {args.resolution} px, {args.optimizer}, batch {args.batch_size} per rank, device "
          f"{args.device}, {args.threads} thread(s) per rank, {os.cpu_count()} CPU cores; median step time after "
          f"{args.warmup} warm-up steps")
    print("| ranks | global batch | steps/s | samples/s |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['global_batch']} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
