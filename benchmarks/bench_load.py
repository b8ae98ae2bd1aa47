"""Model start-up: load time and peak memory of load_sdxl, and the checkpoint hash (cold and cached).

    python benchmarks/bench_load.py                                 # the tiny checkpoint, fp32 and fp16
    python benchmarks/bench_load.py --model ~/.cache/emolora/models/vega-layout.safetensors --dtype fp16
    python benchmarks/bench_load.py --tree /tmp/old-checkout        # the same figures for another source tree

Every measurement runs in a fresh subprocess (imports excluded from the time); load_s is wall time, cpu_s the
process's CPU time (user + system, the figure to compare on a busy machine), the run with the least CPU is
shown. Memory is sampled from /proc/self/status every 5 ms: peak VmRSS, and peak RssAnon (the process's own
memory; RssFile is the page cache of the mapped checkpoint, which the kernel can drop). Hash figures: the
whole-file SHA-256 the first time (throughput in MB/s) and the cached look-up a second start does.
Prints one JSON line per case.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, os.environ["BENCH_TREE"])
import torch
from trainer.model import load_sdxl
from trainer.model import hashes

peak = {"VmRSS": 0, "RssAnon": 0}
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in peak:
                out[key] = int(line.split()[1]) // 1024
    return out
done = threading.Event()
def sample():
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
base = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0, c0 = time.perf_counter(), time.process_time()
model = load_sdxl(os.environ["BENCH_MODEL"], dtype=getattr(torch, os.environ["BENCH_DTYPE"]))
load_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
done.set(); thread.join()
after = status()
res = {"load_s": round(load_s, 3), "cpu_s": round(cpu_s, 3), "base_rss_mb": base["VmRSS"], "peak_rss_mb": peak["VmRSS"],
       "peak_anon_mb": peak["RssAnon"], "after_rss_mb": after["VmRSS"], "after_anon_mb": after["RssAnon"]}
if os.environ.get("BENCH_HASH"):
    t0 = time.perf_counter(); model.model_hash; res["hash_s"] = round(time.perf_counter() - t0, 3)
    size = os.path.getsize(model.hash_file)
    res["hash_mb_per_s"] = round(size / 1e6 / max(res["hash_s"], 1e-9))
print(json.dumps(res))
"""


def run_case(tree: str, model: str, dtype: str, threads: int, hash_: bool, env_extra: dict) -> dict:
    env = dict(os.environ, BENCH_TREE=tree, BENCH_MODEL=model, BENCH_DTYPE=dtype, BENCH_THREADS=str(threads),
               **env_extra)
    if hash_:
        env["BENCH_HASH"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint file or diffusers folder (default: the tiny checkpoint)")
    ap.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                    help="weight dtype(s) to load in (default: float32 and float16)")
    ap.add_argument("--tree", default=str(ROOT), help="source tree to import trainer from")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hash", action="store_true", help="also time the checkpoint hash, cold then cached")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.tree)
    if args.model is None:
        from trainer.model import tiny_model_path

        args.model = tiny_model_path()
    for dtype in args.dtype or ["float32", "float16"]:
        runs = [run_case(args.tree, args.model, dtype, args.threads, False, {}) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["cpu_s"])
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        best["peak_anon_mb"] = max(r["peak_anon_mb"] for r in runs)
        print(json.dumps({"model": os.path.basename(args.model), "dtype": dtype, "tree": args.tree, **best}))
    if args.hash:
        with __import__("tempfile").TemporaryDirectory() as cache:  # an empty hash cache: the first start
            env = {"EMOLORA_CACHE": cache}
            cold = run_case(args.tree, args.model, "float16", args.threads, True, env)
            warm = run_case(args.tree, args.model, "float16", args.threads, True, env)
        print(json.dumps({"model": os.path.basename(args.model), "hash_first_start_s": cold["hash_s"],
                          "hash_mb_per_s": cold["hash_mb_per_s"], "hash_second_start_s": warm["hash_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
