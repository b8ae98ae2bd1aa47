"""Profile single optimizer steps on the SDXL LoRA parameter set (the one trainer.optim.bench uses).

    python benchmarks/profile_optim.py [--threads 1] [--quick] [--steps 2] [--rows 30] NAME [NAME ...]

NAME is a registry name, AdamW (foreach=False) or AdamW-fused. Prints torch.profiler's per-op table (self CPU
time over the profiled steps) for each.
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from trainer.optim import OPTIMIZERS  # noqa: E402
from trainer.optim.bench import Bench, make_losses  # noqa: E402


def build(name, params):
    if name == "AdamW":
        opt = torch.optim.AdamW(params, foreach=False)
        return lambda loss: opt.step()
    if name == "AdamW-fused":
        opt = torch.optim.AdamW(params, fused=True)
        return lambda loss: opt.step()
    opt = OPTIMIZERS[name](params)
    if name == "RefAdamWminiScheduleFree":
        return lambda loss: opt.step(loss=loss, max_steps=1000)
    return lambda loss: opt.step(loss=loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench("cpu", 16, args.quick)
    losses = make_losses()
    for name in args.names:
        params = bench.fresh_params()
        step = build(name, params)
        for k in range(3):
            step(losses[k])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(3, 3 + args.steps):
                step(losses[k])
        print(f"\n===== {name}: {args.steps} steps =====")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
