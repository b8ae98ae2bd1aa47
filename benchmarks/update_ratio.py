"""How far each optimizer moves the LoRA per step (the update/weight ratio), at its preset LR, on the tiny SDXL.

    python benchmarks/update_ratio.py [--optimizers all] [--steps 100] [--threads 1] [--output DIR]

Runs `trainer.sweep` over the tiny SDXL (offline, cached) and the tests' generated dataset (6 photo-like images,
64 px buckets, rank 4, batch 2, seed 1, 34% held out) and prints, per optimizer: the mean update/weight ratio
over the first 20 steps (what the "barely changed the LoRA" warning reads; trainer/telemetry.py BARELY_MOVING),
over the whole run, its range, the per-step CV of the raw loss and of the loss the optimizer got, and the zone
shares. It measures the tiny random model: a real SDXL's LoRA and loss behave differently.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="all")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--optimizer-loss", default="raw", help="comma list: raw, normalized")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", help="the sweep folder (default: a temporary one)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from _trainer_helpers import tiny_config

    from trainer.runstore import RunReader
    from trainer.sweep import plan_sweep, run_sweep

    tmp = Path(args.output or tempfile.mkdtemp(prefix="update-ratio-"))
    base = tiny_config(tmp, steps=args.steps, validation_split=0.34, validation_every=max(1, args.steps // 2))
    plan = plan_sweep(base, args.optimizers, steps=args.steps, output_dir=tmp / "sweep",
                      optimizer_loss_modes=tuple(args.optimizer_loss.split(",")))
    result = run_sweep(plan)
    out = []
    print(f"{'optimizer':<26} {'lr':>8} {'loss':<10} {'ratio first 20':>14} {'ratio mean':>10} "
          f"{'ratio min..max':>20} {'loss CV':>8} {'fed CV':>8}  zones")
    for r in result.rows:
        ratios = [x["update_ratio"] for x in RunReader(r["run_dir"]).steps() if x.get("update_ratio") is not None]
        first = ratios[:20]
        rec = {"optimizer": r["optimizer"], "lr": r["lr"], "optimizer_loss": r["optimizer_loss"],
               "ratio_first20": sum(first) / len(first), "ratio_mean": sum(ratios) / len(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios), "loss_cv": r["loss_cv"],
               "optimizer_loss_cv": r["optimizer_loss_cv"], "zones": r["zones"]}
        out.append(rec)
        zones = ", ".join(f"{z} {s:.0%}" for z, s in rec["zones"].items())
        print(f"{rec['optimizer']:<26} {rec['lr']:>8.3g} {rec['optimizer_loss']:<10} {rec['ratio_first20']:>14.3g} "
              f"{rec['ratio_mean']:>10.3g} {rec['ratio_min']:>9.3g}..{rec['ratio_max']:<9.3g} "
              f"{rec['loss_cv']:>8.3f} {rec['optimizer_loss_cv']:>8.3f}  {zones}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
