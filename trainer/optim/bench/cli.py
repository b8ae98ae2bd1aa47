"""Entry points: run() (the whole benchmark, returns the results dict) and main() (the command line)."""

import argparse
import json
import math
import time

import torch

from .machine import auto_threads, loadavg, machine_info, tune_malloc
from .report import check_targets, render, summarize
from .rows import make_rows
from .shapes import shapes_summary
from .timing import Bench

DESCRIPTION = "Benchmark the optimizer family on an SDXL-UNet-LoRA-shaped parameter set."


def run(device="cpu", rank=16, steps=12, passes=3, quick=False, threads=None, json_path=None, external=True,
        foreach_compare=True, row_budget_s=4.0, mallopt=False, only=None, out=print):
    """Run the benchmark; returns the results dict (also written to json_path when given)."""
    mallopt_applied = tune_malloc() if mallopt else False
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if threads is None:
        threads, note = auto_threads()
    else:
        note = "--threads"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info = machine_info(device, threads, note)
        info["mallopt"] = "applied (trim 1 GiB, mmap 32 MiB)" if mallopt_applied else (
            "requested, not available" if mallopt else "glibc defaults")
        bench = Bench(device, rank, quick)
        rows, notes = make_rows(external=external, foreach_compare=foreach_compare)
        if only:  # a subset (the AdamW baselines always run: every ratio needs them)
            keep = set(only) | {"AdamW(foreach=False)", "AdamW(fused=True)"}
            rows = [r for r in rows if r.label in keep]
        passes = max(1, passes)
        steps_per_pass = max(2, math.ceil(steps / passes))
        config = {"rank": rank, "quick": quick, "modules": len(bench.targets), "tensors": len(bench.shapes),
                  "params": bench.n_params, "param_bytes": bench.param_bytes, "passes": passes,
                  "steps": steps, "steps_per_pass": steps_per_pass, "warmup": 3}
        shape_lines = shapes_summary(bench.targets, rank)
        recs = {r.label: {} for r in rows}
        t_start = time.perf_counter()
        bench.setup_refs()
        for i in range(passes):
            order = rows if i % 2 == 0 else rows[::-1]
            for r in order:
                bench.run_row(r, steps_per_pass, count=(i == 0), row_budget_s=row_budget_s, rec=recs[r.label])
        config["wall_s"] = time.perf_counter() - t_start
        info["loadavg_end"] = loadavg()
        single = bench.device.type == "cpu" and threads == 1
        results = summarize(rows, recs, bench.param_bytes, single_thread=single)
        config["descheduled_filter"] = single
        config["samples"] = sum(len(recs[r.label].get("times", [])) for r in rows)
        config["samples_dropped"] = sum(r["samples_dropped_descheduled"] for r in results)
        checks = check_targets(results)
        text = render(info, config, results, checks, notes, shape_lines)
        if out is not None:
            out(text)
            out(f"\n(benchmark wall time {config['wall_s']:.0f} s)")
        data = {"machine": info, "config": config, "results": results, "checks": checks, "notes": notes}
        if json_path:
            with open(json_path, "w") as f:
                json.dump(data, f, indent=1, default=str)
        return data
    finally:
        torch.set_num_threads(old_threads)


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dispatch" in argv:  # the op-count table (bench/dispatch.py) has its own options
        from .dispatch import main as dispatch_main

        return dispatch_main(argv)
    ap = argparse.ArgumentParser(prog="python -m trainer.optim.bench", description=DESCRIPTION)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per optimizer, over all passes")
    ap.add_argument("--passes", type=int, default=3, help="rebuild and time every row this many times")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")
    ap.add_argument("--quick", action="store_true", help="every 10th LoRA target (a 10x smaller set)")
    ap.add_argument("--no-external", action="store_true", help="skip the pytorch_optimizer rows")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--mallopt", action="store_true",
                    help="what-if: glibc mallopt keeps freed temporaries (no trim/mmap), removing page faults")
    ap.add_argument("--dispatch", action="store_true",
                    help="instead: count the aten ops of one foreach step, full vs half set (see bench/dispatch.py)")
    ap.add_argument("--only", default=None, metavar="LABELS",
                    help="comma-separated row labels to run (plus the AdamW baselines), e.g. AutoTrustGO,EmoNeco")
    args = ap.parse_args(argv)
    run(device=args.device, rank=args.rank, steps=args.steps, passes=args.passes, quick=args.quick,
        threads=args.threads, json_path=args.json, external=not args.no_external, mallopt=args.mallopt,
        only=args.only.split(",") if args.only else None)
    return 0
