"""What the benchmarks share: SDXL's UNet (its real config, random weights) or a tiny one, synthetic cached
latents and text-encoder outputs of SDXL's shapes, a Trainer that trains on them, and step timing.

Nothing here needs a checkpoint, a VAE or text encoders: the UNet is built from its config and the "cached"
features are random tensors of the shapes the encoders would produce.
"""

import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
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
UNETS = {"sdxl": SDXL_UNET, "tiny": TINY_UNET}


def pooled_width(config: dict) -> int:
    """The pooled text embedding's width: what add_embedding takes besides the 6 size embeddings."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def random_unet(config: dict, device, dtype):
    """diffusers' UNet2DConditionModel of `config`, built on the device (no CPU copy), with random weights."""
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


def synthetic_batch(batch_size: int, resolution: int, config: dict, seed: int = 0):
    """(latents, time_ids, prompt_embeds, pooled) of SDXL's shapes, on the CPU, float32."""
    import torch

    r, b = resolution, batch_size
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, r // 8, r // 8, generator=g),
            torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),
            torch.randn(b, 77, config["cross_attention_dim"], generator=g),
            torch.randn(b, pooled_width(config), generator=g))


class SyntheticData:
    """Stands in for TrainingData with cached latents and text outputs of SDXL's shapes."""

    def __init__(self, cfg, config: dict):
        from trainer.data import Batch

        self.cfg, self.buckets = cfg, [(cfg.resolution, cfg.resolution)]
        b = cfg.batch_size
        latents, time_ids, embeds, pooled = synthetic_batch(b, cfg.resolution, config)
        self._batch = Batch(list(range(b)), ["benchmark"] * b, latents, time_ids, embeds, pooled)

    def __len__(self):
        return 1000

    def batch(self, epoch, index):
        return self._batch

    def bucket_counts(self):
        return {self.buckets[0]: self.cfg.batch_size}


def random_unet_trainer(config: dict):
    """A Trainer subclass whose model is a random UNet of `config` (no VAE, no text encoders) and whose data is
    SyntheticData. Its instances record the UNet build time as `build_s`."""
    import torch

    from trainer.train import Trainer

    class RandomUNetTrainer(Trainer):
        def load_model(self, rt):
            from trainer.build import prepare_model
            from trainer.diffusion import NoiseSchedule
            from trainer.model.base_weights import store_unet
            from trainer.model.loader import storage_dtype
            from trainer.parts import LoadedModel

            t0 = time.perf_counter()
            unet = random_unet(config, rt.device, rt.weight_dtype)
            storage = storage_dtype(self.cfg.base_dtype, rt.weight_dtype, False)  # --base-dtype fp8: as loaded
            stored = store_unet(unet, storage, rt.weight_dtype) if storage != rt.weight_dtype else 0
            stub = torch.nn.Module  # the latents and text outputs are "cached"
            model = SimpleNamespace(unet=unet, te1=stub(), te2=stub(), vae=stub(), prediction_type="epsilon",
                                    model_hash="random-sdxl", zero_terminal_snr=False,
                                    base_dtype=str(storage).removeprefix("torch."), stored_layers=stored)
            prepare_model(self.cfg, model)
            self.build_s = time.perf_counter() - t0
            return LoadedModel(model, "epsilon", NoiseSchedule())

        def build_data(self, rt, loaded, items):
            return SyntheticData(self.cfg, config), None

    return RandomUNetTrainer


def synthetic_config(**options):
    """A TrainConfig for RandomUNetTrainer: a throwaway work folder with a one-image dataset (scanned, never
    read) and an empty model file (never read); memory caches, no buckets."""
    from PIL import Image

    from trainer.config import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="emolora-bench-"))
    (work / "data").mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(work / "data" / "x.png")
    (work / "data" / "x.txt").write_text("benchmark")
    (work / "model.safetensors").write_bytes(b"")
    base = dict(model=str(work / "model.safetensors"), data=str(work / "data"),
                output=str(work / "out" / "bench.safetensors"), enable_buckets=False, steps=10_000,
                cache_latents="memory", cache_text="memory")
    return TrainConfig(**{**base, **options}).validate()


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step() after `warmup` calls; CUDA is synchronised around each call
    and its peak-memory counter reset after the warm-up."""
    import torch

    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
