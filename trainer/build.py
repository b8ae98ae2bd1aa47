"""Building a run: device and precision, the model, the run folder, the LoRA, data and caches, the optimizer.

Trainer.setup() calls these in order; they fill in the trainer's attributes. The model loader and the
data builder are reached through Trainer._load_model/_build_data so a subclass can replace them (the
benchmark feeds a random full-size UNet and synthetic latents that way).
"""

import contextlib
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
from .config import ConfigError
from .data import FeatureCache, TrainingData, scan_dataset
from .diffusion import NoiseSchedule
from .runstore import ControlPoller, RunReader, RunStore
from .state import STATE_FILE, restore_trainer_state
from .telemetry import open_tensorboard, progress_bar

log = logging.getLogger("emolora.train")

DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup(t) -> None:
    """Trainer.setup(): validate, scan the data, pick device and precision, load the model, open the run folder,
    build the rest. Cheap failures come first; a failure after the run folder exists is recorded in it."""
    cfg = t.cfg.validate(require_paths=not t.cfg.resume)
    if cfg.resume and not (Path(cfg.resume) / "state" / STATE_FILE).is_file():
        raise ConfigError(f"resume: no saved training state in {cfg.resume} (expected state/{STATE_FILE})")
    if not Path(cfg.model).expanduser().exists():
        raise ConfigError(f"model not found: {cfg.model}")
    # The data first: a bad or empty folder fails in a second, before a multi-GB checkpoint loads.
    t.items, t.report = scan_dataset(cfg.data, caption_extensions=cfg.caption_extensions,
                                     default_repeats=cfg.default_repeats)
    t.device = pick_device(cfg.device)
    t.precision = pick_precision(cfg.mixed_precision, t.device)
    t.weight_dtype = DTYPES[t.precision]
    if cfg.lr is None:
        from .optim import OPTIMIZER_INFO

        cfg = t.cfg = cfg.replace(lr=OPTIMIZER_INFO[cfg.optimizer].recommended_lr)
    setup_phase(t, "model", 0, 1)
    t._load_model()  # a bad checkpoint fails here, before a run folder exists for it
    setup_phase(t, "model", 1, 1)
    open_run(t)
    try:
        build_training(t)
    except BaseException as e:
        t._fail(e)
        raise


def setup_phase(t, phase: str, done: int, total: int) -> None:
    if t.on_setup is not None:
        t.on_setup(phase, done, total)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_precision(mp: str, device: torch.device) -> str:
    if mp != "auto":
        return "fp32" if mp == "no" else mp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"  # bf16 autocast on the CPU is slower than fp32 on most CPUs


# ---- the model ---------------------------------------------------------------------------------------------------
def load_model(cfg, device: torch.device, precision: str):
    """-> (model, prediction_type, noise schedule). The UNet and text encoders in the precision's dtype, the
    VAE in float32."""
    from . import model as M

    log.info("loading %s (%s on %s)", cfg.model, precision, device)
    model = M.load_sdxl(cfg.model, dtype=DTYPES[precision], vae_dtype=torch.float32, tokenizer_dir=cfg.tokenizer)
    prediction_type = model.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    schedule = NoiseSchedule(zero_terminal_snr=bool(getattr(model, "zero_terminal_snr", False)))
    return model, prediction_type, schedule


def prepare_model(cfg, m) -> None:
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


@contextlib.contextmanager
def evaluating(t):
    """UNet and every LoRA module (the text encoders' too, created after the encoders went to eval) in eval
    mode, so LoRA dropout is off for evaluation and samples; back to training afterwards."""
    t.model.unet.eval()
    t.network.eval()
    try:
        yield
    finally:
        t.model.unet.train()
        t.network.train()


def offload(device: torch.device, *modules) -> None:
    if device.type != "cpu":
        for module in modules:
            module.to("cpu")


def onload(device: torch.device, *modules) -> None:
    for module in modules:
        module.to(device)


# ---- the run folder ----------------------------------------------------------------------------------------------
def open_run(t) -> None:
    """A new run folder (or the resumed one) with config, dataset report and meta; sets store, run_dir, control."""
    cfg = t.cfg
    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser()
    else:
        runs_dir = Path(cfg.runs_dir or Path(cfg.output).expanduser().parent / "runs")
        name = cfg.run_name or f"{Path(cfg.output).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = runs_dir / name, 1
        while run_dir.exists():
            n += 1
            run_dir = runs_dir / f"{name}-{n}"
    t.store = RunStore(run_dir)
    t.run_dir = run_dir
    if cfg.resume:  # the LoRA's ss_training_started_at is the run's start, not this session's
        reader = RunReader(run_dir)
        t._started_at = reader.meta().get("started_at") or t._started_at
        reader.close()
    t.store.write_config({**cfg.to_dict(), "resume": None})
    atomic_write_text(run_dir / "dataset.txt", t.report.text())
    t.store.set_meta(status="running", run_name=run_dir.name, optimizer=cfg.optimizer, pid=os.getpid(),
                     host=socket.gethostname(), steps_total=cfg.steps, output=str(cfg.output),
                     device=str(t.device), precision=t.precision, error=None,
                     **{"resumed_at" if cfg.resume else "started_at": time.time()})
    lines = [str(x) for x in t.report.lines]
    t.store.event(0, "dataset", {"summary": t.report.summary(), "lines": lines})
    t.control = ControlPoller(run_dir, cfg.auto_stop)


# ---- LoRA, data, optimizer ---------------------------------------------------------------------------------------
def build_training(t) -> None:
    """Everything after the model and the run folder: LoRA, data and caches, optimizer, LR pulse, fp16 scaler;
    then the saved state (resume) or the step-0 evaluation."""
    from . import model as M
    from .optim import takes_loss

    cfg = t.cfg
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)  # LoRA initialisation draws from the global generator
    t.network = M.LoRANetwork(t.model, cfg.rank, cfg.network_alpha, dropout=cfg.network_dropout,
                              conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha, train_te=cfg.train_text_encoder)
    t._build_data()
    t.model.unet.to(t.device)
    t.network.to(t.device)  # the LoRA weights live in the network, not in the UNet's registry
    t.params = list(t.network.trainable_parameters())
    for p in t.params:
        p.requires_grad_(True)
    t.optimizer = t.build_optimizer(t.params)
    t._base_lrs = [g["lr"] for g in t.optimizer.param_groups]
    step_params = inspect.signature(t.optimizer.step).parameters
    t._takes_loss = takes_loss(t.optimizer) or "loss" in step_params
    t._takes_max_steps = "max_steps" in step_params
    t.pulse = build_pulse(cfg, t.optimizer) if cfg.lr_scheduler == "emopulse" else None
    t.scaler = torch.amp.GradScaler(t.device.type) if t.precision == "fp16" else None
    warn_if_schedule_ignored(cfg)
    n = sum(p.numel() for p in t.params)
    t.store.set_meta(signals=signal_names(cfg), lora_params=n, prediction_type=t.prediction_type,
                     lr=cfg.lr, model_hash=getattr(t.model, "model_hash", None))
    if cfg.resume:
        restore_trainer_state(t)
    else:
        t.store.event(0, "start", {"lora_params": n, "batches_per_epoch": len(t.data)})
        if cfg.eval_every:
            t.store.log_step(0, {"eval_loss": t.evaluate(), "epoch": 0})
    if cfg.tensorboard:
        t._tb = open_tensorboard(t.run_dir)
    log.info("training %d LoRA parameters with %s (lr %g) for %d steps; run folder %s", n, cfg.optimizer,
             cfg.lr, cfg.steps, t.run_dir)


def build_data(t) -> None:
    """TrainingData with its caches filled (encoders on the device meanwhile), the fixed evaluation batch; the
    encoders that the cached features replace leave the accelerator afterwards."""
    from . import model as M

    cfg, m, dev = t.cfg, t.model, t.device
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
    t.data = TrainingData(t.items, cfg, encode_images=encode_images, encode_text=encode_text,
                          model_hash=model_hash, latent_cache=cache(cfg.cache_latents, "latents"),
                          text_cache=cache(cfg.cache_text, "text"), vae_dtype=m.vae.dtype, te_dtype=t.weight_dtype)
    bar = progress_bar(desc="caching") if t.progress_bar else None

    def progress(kind, done, total):
        setup_phase(t, kind, done, total)
        if bar is not None:
            bar.total = total
            bar.set_description(f"caching {kind}")
            bar.n = done
            bar.refresh()

    onload(dev, m.vae, m.te1, m.te2)
    t0 = time.perf_counter()
    encoded = t.data.fill_caches(progress)
    if bar is not None:
        bar.close()
    if any(encoded.values()):
        log.info("cached %d latents and %d captions in %.1fs", encoded["latents"], encoded["text"],
                 time.perf_counter() - t0)
    t.eval_batch = make_eval_batch(t) if cfg.eval_every else None
    # Encoders that are no longer needed every step leave the accelerator (sampling brings them back).
    if cfg.cache_latents != "off":
        offload(dev, m.vae)
    if cfg.cache_text != "off" and not cfg.train_text_encoder:
        offload(dev, m.te1, m.te2)
    t.store.set_meta(buckets={f"{w}x{h}": n for (w, h), n in t.data.bucket_counts().items()},
                     batches_per_epoch=len(t.data))


def make_eval_batch(t):
    """The fixed evaluation batch with its text encoded once, detached."""
    b = t.data.fixed_batch(t.cfg.eval_size)
    if b.prompt_embeds is None:
        with torch.no_grad():
            b.prompt_embeds, b.pooled = t._encode_prompts(b.captions, grad=False)
    b.prompt_embeds, b.pooled = b.prompt_embeds.detach(), b.pooled.detach()
    return b


def make_optimizer(cfg, params):
    """cfg.optimizer with cfg.optimizer_args over `params` (tensors or param groups)."""
    from .optim import create_optimizer

    args = {k: tuple(v) if k.endswith("betas") and isinstance(v, list) else v  # JSON has no tuples
            for k, v in cfg.optimizer_args.items()}
    return create_optimizer(cfg.optimizer, params, lr=cfg.lr, **args)


def build_pulse(cfg, optimizer):
    from .optim import EmoPulseScheduler

    args = {"notify": False, **cfg.scheduler_args}
    return EmoPulseScheduler(optimizer, **args)


def warn_if_schedule_ignored(cfg) -> None:
    from .optim import OPTIMIZER_INFO

    info = OPTIMIZER_INFO.get(cfg.optimizer)
    self_lr = info is not None and "emo_pulse" in info.signals
    if self_lr and (cfg.lr_scheduler != "constant" or cfg.warmup_steps):
        log.warning("%s sets its own step size (emoPulse): lr_scheduler=%s and warmup_steps have no effect",
                    cfg.optimizer, cfg.lr_scheduler)
    elif cfg.lr_scheduler == "emopulse" and cfg.warmup_steps:
        log.warning("lr_scheduler=emopulse sets the LR from the loss every step: warmup_steps=%d has no effect",
                    cfg.warmup_steps)


def signal_names(cfg) -> list:
    """The optimizer's telemetry signals (for the panel's plots), from its registry entry."""
    from .optim import OPTIMIZER_INFO

    info = OPTIMIZER_INFO.get(cfg.optimizer)
    return list(info.signals) if info else []
