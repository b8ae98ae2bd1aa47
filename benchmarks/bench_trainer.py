"""Trainer speed and memory: steps/s and peak memory of the real training loop.

    python benchmarks/bench_trainer.py                 # CPU: the tiny SDXL checkpoint, generated photos
    python benchmarks/bench_trainer.py --gpu           # CUDA: full-size SDXL UNet (its real config, random
                                                       # weights), 1024x1024, rank 32, batch 1, bf16,
                                                       # gradient checkpointing, cached latents: s/it, peak VRAM
    python benchmarks/bench_trainer.py --gpu --device cpu --unet tiny   # the GPU code path, smoke-tested anywhere

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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# SDXL base 1.0's unet/config.json (the fields that differ from diffusers' defaults).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
TINY_UNET = {**SDXL_UNET, "block_out_channels": [32, 64, 64], "transformer_layers_per_block": [1, 1, 2],
             "attention_head_dim": [1, 2, 2], "cross_attention_dim": 80, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 40 + 6 * 8}


def _peak_cpu_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _time_steps(trainer, warmup: int, steps: int) -> list[float]:
    import torch

    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()  # ends with the loss's host sync: the step is complete when it returns
        times.append(time.perf_counter() - t0)
    return times


def _report(name: str, args, trainer, times, extra: dict) -> dict:
    import torch

    times = sorted(times)
    median = times[len(times) // 2]
    out = {"mode": name, "device": str(trainer.device), "precision": trainer.precision,
           "optimizer": trainer.cfg.optimizer, "rank": trainer.cfg.rank, "batch_size": trainer.cfg.batch_size,
           "resolution": trainer.cfg.resolution, "gradient_checkpointing": trainer.cfg.gradient_checkpointing,
           "lora_params": sum(p.numel() for p in trainer.params), "steps_timed": len(times),
           "s_per_it_median": median, "steps_per_s": 1.0 / median, **extra}
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
                      device=args.device or "cpu", mixed_precision="no",
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


# ---- GPU: full-size SDXL UNet, random weights, synthetic cached latents ---------------------------------------
def _random_unet(config: dict, device, dtype):
    import math

    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for module in unet.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "weight" and p.ndim >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    return unet


class SyntheticData:
    """Stands in for TrainingData with cached latents and text outputs of SDXL's shapes."""

    def __init__(self, cfg, context: int, pooled: int):
        import torch

        from trainer.data import Batch

        self.cfg, self.buckets = cfg, [(cfg.resolution, cfg.resolution)]
        r, b = cfg.resolution, cfg.batch_size
        g = torch.Generator().manual_seed(0)
        self._batch = Batch(list(range(b)), ["benchmark"] * b, torch.randn(b, 4, r // 8, r // 8, generator=g),
                            torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),
                            torch.randn(b, 77, context, generator=g), torch.randn(b, pooled, generator=g))

    def __len__(self):
        return 1000

    def batch(self, epoch, index):
        return self._batch

    def bucket_counts(self):
        return {self.buckets[0]: self.cfg.batch_size}


def bench_sdxl(args) -> dict:
    import torch

    from trainer.config import TrainConfig
    from trainer.train import Trainer

    unet_config = SDXL_UNET if args.unet == "sdxl" else TINY_UNET
    device = args.device or "cuda"
    precision = "bf16" if device.startswith("cuda") else "no"

    class BenchTrainer(Trainer):
        def load_model(self, rt):
            from trainer.build import prepare_model
            from trainer.diffusion import NoiseSchedule
            from trainer.parts import LoadedModel

            t0 = time.perf_counter()
            unet = _random_unet(unet_config, rt.device, rt.weight_dtype)
            stub = torch.nn.Module  # no VAE and no text encoders: latents and text outputs are "cached"
            model = SimpleNamespace(unet=unet, te1=stub(), te2=stub(), vae=stub(), prediction_type="epsilon",
                                    model_hash="random-sdxl", zero_terminal_snr=False)
            prepare_model(self.cfg, model)
            self.build_s = time.perf_counter() - t0
            return LoadedModel(model, "epsilon", NoiseSchedule())

        def build_data(self, rt, loaded, items):
            c = unet_config  # the pooled width is what add_embedding takes besides the 6 size embeddings
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            return SyntheticData(self.cfg, c["cross_attention_dim"], pooled), None

    work = Path(tempfile.mkdtemp(prefix="emolora-bench-"))
    (work / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (128, 128, 128)).save(work / "data" / "x.png")
    (work / "data" / "x.txt").write_text("benchmark")
    (work / "model.safetensors").write_bytes(b"")  # never read: the UNet is built from its config
    resolution = args.resolution or (1024 if args.unet == "sdxl" else 128)
    cfg = TrainConfig(model=str(work / "model.safetensors"), data=str(work / "data"),
                      output=str(work / "out" / "bench.safetensors"), resolution=resolution, enable_buckets=False,
                      rank=args.rank or 32, batch_size=args.batch_size, optimizer=args.optimizer, lr=1e-4,
                      steps=10_000, device=device, mixed_precision=precision,
                      gradient_checkpointing=not args.no_checkpointing, cache_latents="memory",
                      cache_text="memory").validate()
    trainer = BenchTrainer(cfg)
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
