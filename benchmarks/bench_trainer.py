"""Trainer speed and memory: steps/s and peak memory of the real training loop.

    python benchmarks/bench_trainer.py                 # CPU: the tiny SDXL checkpoint, generated photos
    python benchmarks/bench_trainer.py --gpu           # CUDA: full-size SDXL UNet (its real config, random
                                                       # weights), 1024x1024, rank 32, batch 1, bf16,
                                                       # gradient checkpointing, cached latents: s/it, peak VRAM
    python benchmarks/bench_trainer.py --gpu --device cpu --unet tiny   # the GPU code path, smoke-tested anywhere
    python benchmarks/bench_trainer.py --network boft --rank 10          # another adapter type (default lora)

Both modes time Trainer.train_step(), the loop the nodes and the CLI run (LoRA on kohya's 722 SDXL targets,
SDPA attention, the optimizer fed the real loss). The GPU mode feeds synthetic cached latents and
text-encoder outputs of SDXL's shapes, so it needs neither a checkpoint nor a VAE or text encoders.
Prints a table and, with --json, one JSON line.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_sdxl import UNETS, median, random_unet_trainer, synthetic_config, time_steps  # noqa: E402


def _peak_cpu_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _time_steps(trainer, warmup: int, steps: int) -> list[float]:
    return time_steps(trainer.train_step, trainer.device, warmup, steps)


def _report(name: str, args, trainer, times, extra: dict) -> dict:
    import torch

    out = {"mode": name, "device": str(trainer.device), "precision": trainer.precision,
           "optimizer": trainer.cfg.optimizer, "network": trainer.cfg.network, "rank": trainer.cfg.rank,
           "batch_size": trainer.cfg.batch_size,
           "resolution": trainer.cfg.resolution, "gradient_checkpointing": trainer.cfg.gradient_checkpointing,
           "lora_params": sum(p.numel() for p in trainer.params), "steps_timed": len(times),
           "s_per_it_median": median(times), "steps_per_s": 1.0 / median(times), **extra}
    if trainer.device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        out["peak_reserved_mb"] = torch.cuda.max_memory_reserved(trainer.device) / 2**20
        out["gpu"] = torch.cuda.get_device_name(trainer.device)
    else:
        out["peak_rss_mb"] = _peak_cpu_mb()
    width = max(map(len, out))
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        print(json.dumps(out))
    return out


# ---- CPU: the real pipeline on the tiny checkpoint ---------------------------------------------------------------
def bench_tiny(args) -> dict:
    import torch

    from trainer.cli import demo_dataset
    from trainer.config import TrainConfig
    from trainer.model import tiny_model_path
    from trainer.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="emolora-bench-"))
    data = demo_dataset(work / "demo")
    cfg = TrainConfig(model=tiny_model_path(), data=str(data), output=str(work / "out" / "bench.safetensors"),
                      resolution=args.resolution or 64, bucket_step=32, rank=args.rank or 8,
                      batch_size=args.batch_size, optimizer=args.optimizer, lr=1e-3, steps=10_000,
                      device=args.device or "cpu", mixed_precision="no", network=args.network,
                      gradient_checkpointing=not args.no_checkpointing).validate()
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    try:
        times = _time_steps(trainer, args.warmup, args.steps)
        return _report("tiny-cpu", args, trainer, times, {"setup_s": setup_s, "threads": torch.get_num_threads()})
    finally:
        trainer.close()


# ---- GPU: full-size SDXL UNet, random weights, synthetic cached latents (benchmarks/random_sdxl.py) ---------------
def bench_sdxl(args) -> dict:
    unet_config = UNETS[args.unet]
    device = args.device or "cuda"
    cfg = synthetic_config(resolution=args.resolution or (1024 if args.unet == "sdxl" else 128),
                           rank=args.rank or 32, batch_size=args.batch_size, optimizer=args.optimizer, lr=1e-4,
                           device=device, mixed_precision="bf16" if device.startswith("cuda") else "no",
                           gradient_checkpointing=not args.no_checkpointing, network=args.network)
    trainer = random_unet_trainer(unet_config)(cfg)
    trainer.setup()
    try:
        times = _time_steps(trainer, args.warmup, args.steps)
        extra = {"unet": args.unet, "unet_params": sum(p.numel() for p in trainer.model.unet.parameters()),
                 "lora_modules": len(trainer.network.loras), "unet_build_s": trainer.build_s}
        return _report("sdxl-" + ("gpu" if device.startswith("cuda") else device), args, trainer, times, extra)
    finally:
        trainer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="full-size SDXL UNet mode (needs CUDA unless --device)")
    p.add_argument("--unet", choices=["sdxl", "tiny"], default="sdxl", help="--gpu mode: which UNet config")
    p.add_argument("--device", help="default: cpu (tiny mode), cuda (--gpu)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--optimizer", default="EmoNavi")
    p.add_argument("--network", default="lora", help="adapter type: lora, loha, lokr, oft, boft")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads (tiny mode)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("emolora").setLevel(logging.WARNING)
    (bench_sdxl if args.gpu else bench_tiny)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
