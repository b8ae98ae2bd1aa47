"""What the VRAM estimate (trainer/vram.py) predicts for the full-size SDXL UNet at 1024x1024, batch 1, under the
low-VRAM presets and a bf16 baseline: a prediction from the estimate's exact parts and its activation model, made
without a GPU (the UNet and the LoRA are built on the meta device; the optimizer state is counted on small CPU
tensors). Latents and text outputs are cached (the VAE and text encoders off the GPU), as in the presets.

    python benchmarks/estimate_presets.py [--optimizer EmoNavi]

Not a measurement: benchmarks/bench_gpu.py --vram measures the peaks and reports the estimate's error.
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_sdxl import SDXL_UNET  # noqa: E402

GiB = 2**30


def sdxl_parts(settings: dict, optimizer: str, resolution: int = 1024) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from trainer.config import TrainConfig, offload_block_count
    from trainer.model import LoRANetwork
    from trainer.model import base_weights as BW
    from trainer.offload import tensor_bytes, unet_blocks
    from trainer.optim import create_optimizer
    from trainer.vram import activation_bytes, optimizer_state_bytes

    cfg = TrainConfig(**settings)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
    if cfg.base_dtype == "fp8":  # what store_unet holds: float8 weights with a float32 scale per storable layer
        for _, layer in BW.storable_layers(unet):
            layer.weight = torch.nn.Parameter(layer.weight.to(BW.fp8_dtype()), requires_grad=False)
            layer.register_buffer("weight_scale", torch.ones((), device="meta"))

    def nbytes(module):
        return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))

    blocks = [(name, nbytes(b)) for name, b in unet_blocks(unet)]
    count = offload_block_count(cfg.offload)
    if count == 0:
        chosen = []
    elif count is None:
        chosen = [name for name, _ in blocks]
    else:
        chosen = [name for name, _ in sorted(blocks, key=lambda nb: -nb[1])[:count]]
    sizes = [b for name, b in blocks if name in chosen]
    working = max((a + b for a, b in zip(sizes, sizes[1:])), default=sum(sizes))
    net = LoRANetwork(SimpleNamespace(unet=unet, te1=torch.nn.Module(), te2=torch.nn.Module()), cfg.rank,
                      cfg.network_alpha)
    params = net.trainable_parameters()
    adapter = sum(tensor_bytes(p) for p in params)
    state = optimizer_state_bytes(lambda ps: create_optimizer(optimizer, ps, lr=1e-4), params)
    return {"weights_on_device": nbytes(unet) - sum(sizes), "offload_working_set": working,
            "adapter_params": adapter, "adapter_grads": adapter, "optimizer_state": state,
            "rollback_copy": 0 if cfg.rollback_on_host else adapter + state,
            "activations_model": activation_bytes(SDXL_UNET, resolution, cfg.batch_size,
                                                  cfg.gradient_checkpointing, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="EmoNavi")
    args = p.parse_args(argv)
    from trainer.config import load_preset

    rows = [("bf16 base, rank 16 (no preset)", {"rank": 16, "base_dtype": "bf16"})]
    rows += [(f"preset {name}", load_preset(name)) for name in ("8gb", "6gb", "4gb")]
    cols = ("weights_on_device", "offload_working_set", "adapter_params", "adapter_grads", "optimizer_state",
            "rollback_copy", "activations_model")
    print(f"SDXL UNet at 1024x1024, batch 1, {args.optimizer}, caches off the GPU; GiB (a prediction, not measured)")
    print("\n| setting | " + " | ".join(cols) + " | total |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for label, settings in rows:
        parts = sdxl_parts(settings, args.optimizer)
        print(f"| {label} | " + " | ".join(f"{parts[c] / GiB:.2f}" for c in cols) +
              f" | {sum(parts.values()) / GiB:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
