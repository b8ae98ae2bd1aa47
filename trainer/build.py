"""Building a run: device and precision, the model, the run folder, the LoRA, data and caches, the optimizer.

Trainer.setup() calls these in order and keeps what they return (trainer/parts.py). The model loader and the
data builder are reached through Trainer.load_model/build_data so a subclass can replace them (the benchmark
feeds a random full-size UNet and synthetic latents that way).
"""

import inspect
import logging
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_text
from .config import ConfigError, TrainConfig
from .data import FeatureCache, TrainingData, scan_dataset, split_validation
from .devices import pick_device, pick_precision
from .diffusion import NoiseSchedule
from .parts import Hooks, LoadedModel, Runtime
from .placement import offload_cached_encoders, onload
from .runstore import ControlPoller, RunReader, RunStore
from .state import STATE_FILE
from .telemetry import progress_bar

log = logging.getLogger("emolora.train")


def scan_and_place(cfg: TrainConfig):
    """The cheap part of setup, before any model loads: validate, scan the data (a bad or empty folder fails in
    a second, not after a multi-GB checkpoint), hold out the validation images, pick device and precision,
    resolve the LR. -> (cfg, training items, validation items, report, runtime)."""
    cfg = cfg.validate(require_paths=not cfg.resume)
    if cfg.resume and not (Path(cfg.resume) / "state" / STATE_FILE).is_file():
        raise ConfigError(f"resume: no saved training state in {cfg.resume} (expected state/{STATE_FILE})")
    if cfg.base_dtype == "fp8":
        from .model.base_weights import fp8_dtype

        if fp8_dtype() is None:
            raise ConfigError(f"base_dtype fp8 needs a torch with float8 dtypes (torch >= 2.1); this is torch "
                              f"{torch.__version__}: use base_dtype bf16 or upgrade torch")
    for name in ("model", "network_weights"):  # before the data scan and the multi-GB checkpoint load
        path = getattr(cfg, name)
        if path and not Path(path).expanduser().exists():
            raise ConfigError(f"{name} not found: {path}")
    items, report = scan_dataset(cfg.data, caption_extensions=cfg.caption_extensions,
                                 default_repeats=cfg.default_repeats, mask=cfg.mask)
    items, val_items = hold_out_validation(cfg, items, report)
    device = pick_device(cfg.device)
    runtime = Runtime(device, pick_precision(cfg.mixed_precision, device))
    if cfg.lr is None:
        from .optim import OPTIMIZER_INFO

        cfg = cfg.replace(lr=OPTIMIZER_INFO[cfg.optimizer].recommended_lr)
    return cfg, items, val_items, report, runtime


def hold_out_validation(cfg: TrainConfig, items, report) -> tuple[list, list]:
    """-> (training items, validation items): a seeded share of the data, or a separate folder. The report
    counts only what trains and names what was held out."""
    if cfg.validation_data:
        val_items, val_report = scan_dataset(cfg.validation_data, caption_extensions=cfg.caption_extensions,
                                             default_repeats=1, mask=cfg.mask)
        report.add(Path(cfg.validation_data), "note", f"validation set: {val_report.summary()}")
        return items, val_items
    items, val_items = split_validation(items, cfg.validation_split, cfg.seed)
    if val_items:
        report.images -= len(val_items)
        report.samples_per_epoch -= sum(it.repeats for it in val_items)
        names = ", ".join(it.image.name for it in val_items)
        report.add(Path(report.root), "note", f"validation split: {len(val_items)} images held out ({names})")
    return items, val_items


def build_validation(cfg: TrainConfig, rt: Runtime, loaded: LoadedModel, data, val_items) -> list:
    """The validation batches: every held-out image once, centred, unaugmented, its text encoded once; features
    go through the training data's caches (keyed by content)."""
    from . import model as M

    if not val_items:
        return []
    m = loaded.model
    val = TrainingData(val_items, cfg.replace(flip_aug=False, random_crop=False), encode_images=data.encode_images,
                       encode_text=data.encode_text, model_hash=data.model_hash, latent_cache=data.latent_cache,
                       text_cache=data.text_cache, vae_dtype=data.vae_dtype, te_dtype=data.te_dtype)
    onload(rt.device, m.vae, m.te1, m.te2)
    try:
        val.fill_caches()
        batches = val.fixed_batches(cfg.batch_size)
        for b in batches:
            if b.prompt_embeds is None:
                with torch.no_grad():
                    b.prompt_embeds, b.pooled = M.encode_prompts(m, b.captions, device=rt.device)
            b.prompt_embeds, b.pooled = b.prompt_embeds.detach(), b.pooled.detach()
    finally:
        offload_cached_encoders(cfg, rt.device, m)
    return batches


# ---- the model ---------------------------------------------------------------------------------------------------
def load_model(cfg: TrainConfig, rt: Runtime) -> LoadedModel:
    """The UNet and text encoders in the precision's dtype (the UNet's Linear/Conv weights held as base_dtype
    says), the VAE in float32; frozen and prepared."""
    from . import model as M

    log.info("loading %s (%s on %s)", cfg.model, rt.precision, rt.device)
    model = M.load_sdxl(cfg.model, dtype=rt.weight_dtype, vae_dtype=torch.float32, tokenizer_dir=cfg.tokenizer,
                        base_dtype=cfg.base_dtype)
    if model.stored_layers:
        log.info("UNet base weights: %d Linear/Conv layers held as %s, upcast per layer to %s", model.stored_layers,
                 model.base_dtype, rt.precision)
    prediction_type = model.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    schedule = NoiseSchedule(zero_terminal_snr=bool(getattr(model, "zero_terminal_snr", False)))
    prepare_model(cfg, model)
    return LoadedModel(model, prediction_type, schedule)


def prepare_model(cfg: TrainConfig, m) -> None:
    """Freeze, pick attention and checkpointing. Devices are assigned later: the encoders first (to fill
    the caches), the UNet after them, so a small GPU never holds all four networks at once."""
    for module in (m.unet, m.te1, m.te2, m.vae):
        module.requires_grad_(False)
        module.eval()
    if cfg.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        m.unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention kernels
    if cfg.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in (m.te1, m.te2):
                te.gradient_checkpointing_enable()
    m.unet.train()  # checkpointing acts only in train mode; SDXL's UNet has no dropout to switch on
    if cfg.compile:
        log.info("torch.compile: %d transformer blocks (compiled at their first call)", compile_blocks(m.unet))


def compile_blocks(unet) -> int:
    """Regional compilation, as diffusers (compile_repeated_blocks) and OneTrainer do: each transformer block is
    compiled on its own (nn.Module.compile, in place), so SDXL's 70 blocks share a few graphs, start-up stays
    in seconds per shape rather than minutes for the whole UNet, and the LoRA wrappers injected later inside
    the blocks are traced with them. -> the number of blocks."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [mod for mod in unet.modules() if isinstance(mod, BasicTransformerBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


# ---- the run folder ----------------------------------------------------------------------------------------------
def open_run(cfg: TrainConfig, rt: Runtime, report) -> tuple[RunStore, ControlPoller, float]:
    """A new run folder (or the resumed one) with config, dataset report and meta.
    -> (store, control, the run's first start time)."""
    started_at = time.time()
    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser()
    else:
        runs_dir = Path(cfg.runs_dir or Path(cfg.output).expanduser().parent / "runs")
        name = cfg.run_name or f"{Path(cfg.output).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = runs_dir / name, 1
        while run_dir.exists():
            n += 1
            run_dir = runs_dir / f"{name}-{n}"
    store = RunStore(run_dir)
    if cfg.resume:  # the LoRA's ss_training_started_at is the run's start, not this session's
        reader = RunReader(run_dir)
        started_at = reader.meta().get("started_at") or started_at
        reader.close()
    store.write_config({**cfg.to_dict(), "resume": None})
    atomic_write_text(run_dir / "dataset.txt", report.text())
    store.set_meta(status="running", run_name=run_dir.name, optimizer=cfg.optimizer, pid=os.getpid(),
                   host=socket.gethostname(), steps_total=cfg.steps, output=str(cfg.output),
                   device=str(rt.device), precision=rt.precision, error=None,
                   **{"resumed_at" if cfg.resume else "started_at": time.time()})
    store.event(0, "dataset", {"summary": report.summary(), "lines": [str(x) for x in report.lines]})
    return store, ControlPoller(run_dir, cfg.auto_stop), started_at


# ---- LoRA, data, optimizer ---------------------------------------------------------------------------------------
def place_unet(cfg: TrainConfig, rt: Runtime, unet):
    """The UNet on the run's device; with cfg.offload, its down/mid/up blocks (or the N largest) stay in pinned
    host memory and stream in (trainer/offload.py). -> the BlockOffloader, or None."""
    from .config import offload_block_count
    from .offload import BlockOffloader

    count = offload_block_count(cfg.offload)
    if count == 0:
        unet.to(rt.device)
        return None
    if rt.device.type != "cuda":
        log.warning("offload=%s on %s: it runs, but the weights are on the host anyway, so it saves nothing "
                    "here (it saves GPU memory on CUDA)", cfg.offload, rt.device)
    return BlockOffloader(unet, rt.device, count).attach()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # LoRA initialisation draws from the global generator


def make_network(cfg: TrainConfig, model):
    from . import model as M

    network = M.LoRANetwork(model, cfg.rank, cfg.network_alpha, dropout=cfg.network_dropout,
                            conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha, train_te=cfg.train_text_encoder,
                            network=cfg.network, dora=cfg.dora, rslora=cfg.rslora, lokr_factor=cfg.lokr_factor,
                            lokr_full_matrix=cfg.lokr_full_matrix, lokr_decompose_both=cfg.lokr_decompose_both,
                            tucker=cfg.tucker)
    if cfg.network_weights:  # continue an existing file (a resume then restores the saved state over it)
        M.load_network_weights(network, cfg.network_weights)
    return network


def trainable_params(network, device: torch.device) -> list:
    """The LoRA weights (they live in the network, not in the UNet's registry) on the device, with grads."""
    network.to(device)
    params = list(network.trainable_parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def step_signature(optimizer) -> tuple[bool, bool]:
    """-> (step takes loss=, step takes max_steps=)."""
    from .optim import takes_loss

    step_params = inspect.signature(optimizer.step).parameters
    return takes_loss(optimizer) or "loss" in step_params, "max_steps" in step_params


def build_data(cfg: TrainConfig, rt: Runtime, loaded: LoadedModel, items, store: RunStore, hooks: Hooks):
    """TrainingData with its caches filled (encoders on the device meanwhile) and the fixed evaluation batch;
    the encoders that the cached features replace leave the accelerator afterwards. -> (data, eval_batch)."""
    from . import model as M

    m, dev = loaded.model, rt.device
    cache_root = Path(cfg.cache_dir or Path(cfg.output).expanduser().parent / "cache")

    def cache(mode, kind):
        return None if mode == "off" else FeatureCache(mode, cache_root / kind if mode == "disk" else None)

    def encode_images(pixels, seed):
        # Seeded per batch by content: the posterior sample does not touch the global generator.
        g = torch.Generator(dev).manual_seed(seed)
        return M.encode_latents(m, pixels, generator=g)

    def encode_text(captions):
        with torch.no_grad():
            return M.encode_prompts(m, captions, device=dev)

    model_hash = str(getattr(m, "model_hash", "unknown"))
    data = TrainingData(items, cfg, encode_images=encode_images, encode_text=encode_text,
                        model_hash=model_hash, latent_cache=cache(cfg.cache_latents, "latents"),
                        text_cache=cache(cfg.cache_text, "text"), vae_dtype=m.vae.dtype, te_dtype=rt.weight_dtype)
    bar = progress_bar(desc="caching") if hooks.progress_bar else None

    def progress(kind, done, total):
        hooks.setup_phase(kind, done, total)
        if bar is not None:
            bar.total = total
            bar.set_description(f"caching {kind}")
            bar.n = done
            bar.refresh()

    onload(dev, m.vae, m.te1, m.te2)
    t0 = time.perf_counter()
    encoded = data.fill_caches(progress)
    keep_caches_on_device(dev, data.latent_cache, data.text_cache)
    if bar is not None:
        bar.close()
    if any(encoded.values()):
        log.info("cached %d latents and %d captions in %.1fs", encoded["latents"], encoded["text"],
                 time.perf_counter() - t0)
    eval_batch = make_eval_batch(data, cfg.eval_size, m, dev) if cfg.eval_every else None
    offload_cached_encoders(cfg, dev, m)
    store.set_meta(buckets={f"{w}x{h}": n for (w, h), n in data.bucket_counts().items()},
                   batches_per_epoch=len(data))
    return data, eval_batch


def keep_caches_on_device(device: torch.device, *caches, share: float = 0.1) -> bool:
    """Memory caches that together take at most `share` of the accelerator's free memory (measured before the
    UNet arrives: a margin for it and its activations) move onto it, so a
    batch is stacked there (no host copy per step); otherwise batches travel through pinned memory."""
    caches = [c for c in caches if c is not None and c.mode == "memory"]
    if device.type != "cuda" or not caches:
        return False
    need, (free, _) = sum(c.nbytes() for c in caches), torch.cuda.mem_get_info(device)
    if need > share * free:
        log.info("feature caches (%.0f MiB) stay in host memory: more than %d%% of the free GPU memory",
                 need / 2**20, share * 100)
        return False
    for c in caches:
        c.move_to(device)
    log.info("feature caches (%.0f MiB) kept on %s", need / 2**20, device)
    return True


def make_eval_batch(data, size: int, model, device: torch.device):
    """The fixed evaluation batch with its text encoded once, detached."""
    from . import model as M

    b = data.fixed_batch(size)
    if b.prompt_embeds is None:
        with torch.no_grad():
            b.prompt_embeds, b.pooled = M.encode_prompts(model, b.captions, device=device)
    b.prompt_embeds, b.pooled = b.prompt_embeds.detach(), b.pooled.detach()
    return b


def make_optimizer(cfg: TrainConfig, params):
    """cfg.optimizer with cfg.optimizer_args over `params` (tensors or param groups)."""
    from .optim import create_optimizer

    args = {k: tuple(v) if k.endswith("betas") and isinstance(v, list) else v  # JSON has no tuples
            for k, v in cfg.optimizer_args.items()}
    return create_optimizer(cfg.optimizer, params, lr=cfg.lr, **args)


def build_pulse(cfg: TrainConfig, optimizer):
    if cfg.lr_scheduler != "emopulse":
        return None
    from .optim import EmoPulseScheduler

    args = {"notify": False, **cfg.scheduler_args}
    return EmoPulseScheduler(optimizer, **args)


def build_scaler(rt: Runtime):
    return torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None


def warn_if_schedule_ignored(cfg: TrainConfig) -> None:
    from .optim import OPTIMIZER_INFO

    info = OPTIMIZER_INFO.get(cfg.optimizer)
    self_lr = info is not None and "emo_pulse" in info.signals
    if self_lr and (cfg.lr_scheduler != "constant" or cfg.warmup_steps):
        log.warning("%s sets its own step size (emoPulse): lr_scheduler=%s and warmup_steps have no effect",
                    cfg.optimizer, cfg.lr_scheduler)
    elif cfg.lr_scheduler == "emopulse" and cfg.warmup_steps:
        log.warning("lr_scheduler=emopulse sets the LR from the loss every step: warmup_steps=%d has no effect",
                    cfg.warmup_steps)


def signal_names(cfg: TrainConfig) -> list:
    """The optimizer's telemetry signals (for the panel's plots), from its registry entry."""
    from .optim import OPTIMIZER_INFO

    info = OPTIMIZER_INFO.get(cfg.optimizer)
    return list(info.signals) if info else []

