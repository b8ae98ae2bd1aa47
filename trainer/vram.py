"""The VRAM estimate made before the first step: what the run will hold on its device, part by part, against the
device's free memory, with the options that would make it fit when it does not.

Exact parts (bytes counted on the live tensors, or on the tensors the optimizer builds):
- frozen weights by network, dtype and place (device / host), and the offloaded blocks' working set (a block and
  its neighbour arriving: trainer/offload.py);
- the adapters' parameters and their gradients (one gradient per parameter, its dtype);
- the optimizer state: a throwaway optimizer of the run's kind steps twice over one small CPU tensor per distinct
  (shape, dtype) of the parameters, and its state tensors are counted and multiplied out (every optimizer here
  keeps its state per tensor; EmoClan's, which grows phase by phase, at its largest);
- the finiteness rollback's copy of the parameters and the optimizer state (trainer/rollback.py): on the device,
  or nothing there with rollback_on_host;
- the feature caches held on the device.
Modelled part: the activations of the UNet at the run's resolution, batch and checkpointing setting
(`activation_bytes`, elements per token and channel of each module kind; benchmarks/bench_gpu.py --vram reports
its error against the measured peak). Not counted: the CUDA context, allocator fragmentation, kernels' workspace,
the text encoders' activations when they train.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from .config import TrainConfig
from .offload import tensor_bytes

log = logging.getLogger("emolora.train")
MiB = 2**20
GiB = 2**30

# Elements saved for the backward per token, in units of the level's channel count (a model: see the docstring).
RESNET = 10  # two GroupNorm+SiLU+conv stages and the residual
TRANSFORMER_BLOCK = 30  # three norms, q/k/v, two attention outputs, GEGLU feed-forward (8C in, 4C out)
TRANSFORMER_WRAPPER = 5  # Transformer2DModel's norm, proj_in, proj_out around its blocks
CHECKPOINTED = 1  # a checkpointed module keeps only its input
GRADIENTS_IN_FLIGHT = 4  # activation gradients alive while one module's backward runs


def weight_bytes(model, device: torch.device) -> dict:
    """{network: {"<place>:<dtype>": bytes}} of every parameter and buffer, place "device" or "host"."""
    out = {}
    for name in ("unet", "te1", "te2", "vae"):
        net = getattr(model, name, None)
        if not isinstance(net, torch.nn.Module):
            continue
        parts: Counter = Counter()
        for t in [*net.parameters(), *net.buffers()]:
            place = "device" if t.device.type == device.type else "host"
            parts[f"{place}:{str(t.dtype).removeprefix('torch.')}"] += tensor_bytes(t)
        if parts:
            out[name] = dict(parts)
    return out


def optimizer_state_bytes(make_optimizer, params) -> int:
    """The bytes of the optimizer state `make_optimizer(params)` builds for `params`, counted on a throwaway
    optimizer over one small CPU tensor per distinct (shape, dtype), stepped twice."""
    from .build import step_signature

    counts = Counter((tuple(p.shape), p.dtype) for p in params)
    proxies = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in counts]
    if not proxies:
        return 0
    opt = make_optimizer(proxies)
    takes_loss, takes_max_steps = step_signature(opt)
    kwargs = {"max_steps": 1000} if takes_max_steps else {}
    for loss in (1.0, 0.9):
        for p in proxies:
            p.grad = torch.full_like(p, 1e-3)
        opt.step(**({"loss": loss} if takes_loss else {}), **kwargs)
    if hasattr(opt, "build_full_state"):  # state that grows with what the loss does (EmoClan's phases)
        opt.build_full_state()
    total = 0
    for p, key in zip(proxies, counts):
        total += counts[key] * sum(tensor_bytes(v) for v in opt.state[p].values() if torch.is_tensor(v))
    return total


def activation_bytes(unet_config: dict, resolution: int, batch: int, checkpointing: bool, dtype_bytes: int) -> int:
    """A model of the UNet's activation memory at its peak (the backward's start), for a square `resolution`."""
    channels = list(unet_config["block_out_channels"])
    depth = unet_config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)
    resnets = int(unet_config.get("layers_per_block", 2))
    kinds = list(unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels)))
    side = resolution // 8
    saved = largest = 0
    for level, (c, d, kind) in enumerate(zip(channels, depth, kinds)):
        tokens = batch * (side >> level) ** 2
        attn = "CrossAttn" in kind
        # down: `resnets` resnets (+ transformers); up: one more of each, taking the skip concatenation (1.5x);
        # the mid block (deepest level): two resnets around one transformer
        n_res = resnets + 1.5 * (resnets + 1) + (2 if level == len(channels) - 1 else 0)
        n_tf = (resnets + resnets + 1 + (1 if level == len(channels) - 1 else 0)) if attn else 0
        per_token = c * ((CHECKPOINTED if checkpointing else RESNET) * n_res +
                         ((CHECKPOINTED if checkpointing else TRANSFORMER_BLOCK) * d + TRANSFORMER_WRAPPER) * n_tf
                         + 2)  # the down/upsampler's input
        saved += tokens * per_token
        largest = max(largest, tokens * c * (TRANSFORMER_BLOCK if attn else RESNET))
    peak = saved + (largest if checkpointing else 0) + GRADIENTS_IN_FLIGHT * batch * side * side * channels[0]
    return int(peak * dtype_bytes)


def estimate(cfg: TrainConfig, run, make_optimizer) -> dict:
    """The estimate of `run` (a RunSetup, everything placed) in bytes, with the device's free memory."""
    dev = run.device
    weights = weight_bytes(run.model, dev)
    on_device = sum(b for parts in weights.values() for k, b in parts.items() if k.startswith("device:"))
    # offloaded blocks live on the host and come to the device a block pair at a time (on the CPU they are on the
    # run's device already, counted above)
    offloaded = any(k.startswith("host:") for k in weights.get("unet", {}))
    streamed = run.offload.streamed_peak_bytes() if run.offload is not None and offloaded else 0
    params = sum(tensor_bytes(p) for p in run.params)
    grads = params  # one gradient per parameter, of its dtype
    state = optimizer_state_bytes(make_optimizer, run.params)
    rollback = 0 if cfg.rollback_on_host and dev.type == "cuda" else params + state
    caches = sum(c.nbytes() for c in (getattr(run.data, "latent_cache", None), getattr(run.data, "text_cache", None))
                 if c is not None and c.mode == "memory" and c.device.type == dev.type)
    unet = run.model.unet
    dtype_bytes = torch.empty((), dtype=run.runtime.weight_dtype).element_size()
    act = activation_bytes(dict(unet.config), cfg.resolution, cfg.batch_size, cfg.gradient_checkpointing,
                           dtype_bytes) if hasattr(unet, "config") else 0
    parts = {"weights_on_device": on_device, "offload_working_set": streamed, "adapter_params": params,
             "adapter_grads": grads, "optimizer_state": state, "rollback_copy": rollback, "caches_on_device": caches,
             "activations_model": act}
    total = sum(parts.values())
    out = {"device": str(dev), "parts": parts, "weights": weights, "total": total}
    if dev.type == "cuda":
        free, capacity = torch.cuda.mem_get_info(dev)
        held = on_device + params + caches  # allocated already; the rest arrives with the first step
        out.update(free=free, capacity=capacity, held=held, fits=total - held <= free)
    return out


def options_to_fit(cfg: TrainConfig, est: dict) -> list[str]:
    """The options (not set already) that would lower the estimate, each with about what it saves."""
    parts, weights = est["parts"], est["weights"]
    unet_dev = {k: b for k, b in weights.get("unet", {}).items() if k.startswith("device:")}
    out = []
    two_byte = sum(b for k, b in unet_dev.items() if k.split(":")[1] in ("bfloat16", "float16", "float32"))
    if getattr(cfg, "base_dtype", None) != "fp8" and two_byte:
        out.append(f"base_dtype=fp8 (about -{two_byte / 2 / GiB:.1f} GiB)")
    if cfg.offload == "none" and unet_dev:
        out.append("offload=blocks (most of the UNet's weights leave the GPU)")
    te = sum(b for n in ("te1", "te2") for k, b in weights.get(n, {}).items() if k.startswith("device:"))
    if te and cfg.cache_text == "off" and not cfg.train_text_encoder:
        out.append(f"cache_text=memory (the text encoders leave the GPU: -{te / GiB:.1f} GiB)")
    if not cfg.gradient_checkpointing:
        out.append("gradient_checkpointing=true")
    if parts["rollback_copy"] and not cfg.rollback_on_host:
        out.append(f"rollback_on_host=true (-{parts['rollback_copy'] / GiB:.2f} GiB)")
    if cfg.batch_size > 1:
        out.append("batch_size=1")
    if cfg.resolution > 768:
        out.append("a lower resolution (768: about -40% activations)")
    return out


def report(cfg: TrainConfig, est: dict) -> tuple[str, str | None]:
    """-> (one line of the estimate, a warning when it does not fit, else None)."""
    p = est["parts"]
    names = {"weights_on_device": "weights", "offload_working_set": "offloaded blocks", "adapter_params": "adapter",
             "adapter_grads": "grads", "optimizer_state": "optimizer", "rollback_copy": "rollback copy",
             "caches_on_device": "caches", "activations_model": "activations (model)"}
    line = (f"VRAM estimate on {est['device']}: {est['total'] / GiB:.2f} GiB = " +
            " + ".join(f"{names[k]} {v / MiB:.0f} MiB" for k, v in p.items() if v))
    if "free" in est:
        line += f"; {est['free'] / GiB:.2f} GiB free besides the {est['held'] / GiB:.2f} GiB this run holds"
    if est.get("fits", True):
        return line, None
    need = (est["total"] - est["held"] - est["free"]) / GiB
    tips = options_to_fit(cfg, est)
    return line, (f"this run may not fit on {est['device']}: about {need:.2f} GiB short. Options that lower it: "
                  + ("; ".join(tips) if tips else "a smaller rank or resolution"))
