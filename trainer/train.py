"""The training loop. Trainer.setup() builds everything; Trainer.run() trains; train(config) does both.

Per optimizer step: `grad_accum` micro-batches (noise, timesteps, UNet, loss, backward), then ONE host sync
that reads the mean micro-batch loss and the gradient norm together. The optimizer gets that mean, unscaled
(no GradScaler factor, no 1/grad_accum), as a python float. A non-finite step is skipped: its gradients
are dropped, it is counted, and the optimizer is not fed. (Logging the optimizer's signals afterwards costs
one more transfer: they are stacked on the device and read at once.)

Everything random is a function of the seed and the position (data order and augmentation of (epoch, batch),
noise and timesteps of (step, micro-batch)), or is in the saved state (RNGs for LoRA dropout), so a resumed
run ends with the same LoRA, bit for bit on the CPU, as an uninterrupted one.
"""

import contextlib
import hashlib
import inspect
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_text
from .config import ConfigError, TrainConfig
from .data import FeatureCache, TrainingData, scan_dataset
from .diffusion import NoiseSchedule, per_sample_loss
from .runstore import ControlPoller, RunReader, RunStore
from .state import STATE_FILE, load_state, rng_state, save_state, set_rng_state

log = logging.getLogger("emolora.train")

_DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    lora_path: str | None  # the final LoRA (None if the run failed before saving one)
    run_dir: str
    steps_done: int
    stop_reason: str | None  # finished, stopped, should_stop, nonfinite, interrupted; None while paused
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    saved: list = field(default_factory=list)  # every LoRA file written
    summary: dict = field(default_factory=dict)  # loss start/end/min, eval loss, signal ranges, speed, memory


def train(config: TrainConfig, *, stop_event: threading.Event | None = None, on_step=None,
          progress_bar: bool = False) -> TrainResult:
    """Train a LoRA as `config` says. See Trainer for the arguments."""
    trainer = Trainer(config, stop_event=stop_event, on_step=on_step, progress_bar=progress_bar)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
        trainer.release()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers; neighbouring steps get unrelated generators."""
    digest = hashlib.blake2b(b"|".join(str(v).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler in ("constant", "emopulse"):
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_scheduler == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_mb": torch.cuda.memory_allocated(device) / 2**20,
                "mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "mem_reserved_mb": torch.cuda.memory_reserved(device) / 2**20}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
        with open("/proc/self/statm") as f:
            rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        return {"rss_mb": rss_mb, "rss_peak_mb": peak_mb}
    except (ImportError, OSError, ValueError):
        return {}


class Trainer:
    """One run. stop_event: set it to save and stop at the next step boundary. on_step(info): called after
    every step with the step's telemetry record plus steps_total and run_dir (an exception raised there
    saves the LoRA and the state, marks the run stopped, and propagates). progress_bar: tqdm on stderr."""

    def __init__(self, config: TrainConfig, *, stop_event: threading.Event | None = None, on_step=None,
                 progress_bar: bool = False):
        self.cfg = config
        self.stop_event = stop_event or threading.Event()
        self.on_step = on_step
        self.progress_bar = progress_bar
        self.model = None
        self.store: RunStore | None = None
        self.step = 0  # optimizer steps done
        self.epoch, self.batch_in_epoch = 0, 0  # the next batch to draw
        self.skipped = self.consecutive_skips = 0
        self.stop_reason: str | None = None
        self.saved: list[str] = []
        self.lora_path: str | None = None
        self._closed = False
        self._should_stop_prev = False
        self._save_now_seen = 0
        self._step_times: deque = deque(maxlen=20)
        self._bar = None
        self._tb = None
        self._started_at = time.time()

    # =========================================================================================================
    # setup
    # =========================================================================================================
    def setup(self) -> "Trainer":
        """Scan the data, open the run folder, load the model, build LoRA, caches, optimizer; resume if asked."""
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference_mode
            self._setup()
        return self

    def _setup(self) -> None:
        cfg = self.cfg.validate(require_paths=not self.cfg.resume)
        if cfg.resume and not (Path(cfg.resume) / "state" / STATE_FILE).is_file():
            raise ConfigError(f"resume: no saved training state in {cfg.resume} (expected state/{STATE_FILE})")
        if not Path(cfg.model).expanduser().exists():
            raise ConfigError(f"model not found: {cfg.model}")
        # The data first: a bad or empty folder fails in a second, before a multi-GB checkpoint loads.
        self.items, self.report = scan_dataset(cfg.data, caption_extensions=cfg.caption_extensions,
                                               default_repeats=cfg.default_repeats)
        self.device = self._pick_device(cfg.device)
        self.precision = self._pick_precision(cfg.mixed_precision, self.device)
        self.weight_dtype = _DTYPES[self.precision]
        if cfg.lr is None:
            from .optim import OPTIMIZER_INFO

            cfg = self.cfg = cfg.replace(lr=OPTIMIZER_INFO[cfg.optimizer].recommended_lr)
        self._load_model()  # a bad checkpoint fails here, before a run folder exists for it
        self._open_run()
        try:
            self._build()
        except BaseException as e:
            self._fail(e)
            raise

    def _pick_device(self, name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device: unknown device {name!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        return device

    @staticmethod
    def _pick_precision(mp: str, device: torch.device) -> str:
        if mp != "auto":
            return "fp32" if mp == "no" else mp
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"  # bf16 autocast on the CPU is slower than fp32 on most CPUs

    def _open_run(self) -> None:
        cfg = self.cfg
        if cfg.resume:
            run_dir = Path(cfg.resume).expanduser()
        else:
            runs_dir = Path(cfg.runs_dir or Path(cfg.output).expanduser().parent / "runs")
            name = cfg.run_name or f"{Path(cfg.output).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir, n = runs_dir / name, 1
            while run_dir.exists():
                n += 1
                run_dir = runs_dir / f"{name}-{n}"
        self.store = RunStore(run_dir)
        self.run_dir = run_dir
        if cfg.resume:  # the LoRA's ss_training_started_at is the run's start, not this session's
            reader = RunReader(run_dir)
            self._started_at = reader.meta().get("started_at") or self._started_at
            reader.close()
        self.store.write_config({**cfg.to_dict(), "resume": None})
        atomic_write_text(run_dir / "dataset.txt", self.report.text())
        self.store.set_meta(status="running", run_name=run_dir.name, optimizer=cfg.optimizer, pid=os.getpid(),
                            host=socket.gethostname(), steps_total=cfg.steps, output=str(cfg.output),
                            device=str(self.device), precision=self.precision, error=None,
                            **{"resumed_at" if cfg.resume else "started_at": time.time()})
        lines = [str(x) for x in self.report.lines]
        self.store.event(0, "dataset", {"summary": self.report.summary(), "lines": lines})
        self.control = ControlPoller(run_dir, cfg.auto_stop)

    def _load_model(self) -> None:
        from . import model as M

        cfg = self.cfg
        log.info("loading %s (%s on %s)", cfg.model, self.precision, self.device)
        self.model = M.load_sdxl(cfg.model, dtype=self.weight_dtype, vae_dtype=torch.float32,
                                 tokenizer_dir=cfg.tokenizer)
        self.prediction_type = self.model.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
        self.schedule = NoiseSchedule(zero_terminal_snr=bool(getattr(self.model, "zero_terminal_snr", False)))
        self._prepare_model()

    def _build(self) -> None:
        from . import model as M

        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)  # LoRA initialisation draws from the global generator
        self.network = M.LoRANetwork(self.model, cfg.rank, cfg.network_alpha, dropout=cfg.network_dropout,
                                     conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha,
                                     train_te=cfg.train_text_encoder)
        self._build_data()
        self.model.unet.to(self.device)
        self.network.to(self.device)  # the LoRA weights live in the network, not in the UNet's registry
        self.params = list(self.network.trainable_parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = self.build_optimizer(self.params)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        step_params = inspect.signature(self.optimizer.step).parameters
        from .optim import takes_loss

        self._takes_loss = takes_loss(self.optimizer) or "loss" in step_params
        self._takes_max_steps = "max_steps" in step_params
        self.pulse = self._build_pulse() if cfg.lr_scheduler == "emopulse" else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self._check_schedule_applies()
        n = sum(p.numel() for p in self.params)
        self.store.set_meta(signals=self._signal_names(), lora_params=n, prediction_type=self.prediction_type,
                            lr=cfg.lr, model_hash=getattr(self.model, "model_hash", None))
        if cfg.resume:
            self._restore()
        else:
            self.store.event(0, "start", {"lora_params": n, "batches_per_epoch": len(self.data)})
            if cfg.eval_every:
                self.store.log_step(0, {"eval_loss": self.evaluate(), "epoch": 0})
        if cfg.tensorboard:
            self._open_tensorboard()
        log.info("training %d LoRA parameters with %s (lr %g) for %d steps; run folder %s", n, cfg.optimizer,
                 cfg.lr, cfg.steps, self.run_dir)

    def _prepare_model(self) -> None:
        """Freeze, pick attention and checkpointing. Devices are assigned later: the encoders first (to fill
        the caches), the UNet after them, so a small GPU never holds all four networks at once."""
        cfg, m = self.cfg, self.model
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

    def _build_data(self) -> None:
        from . import model as M

        cfg, m, dev = self.cfg, self.model, self.device
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
        self.data = TrainingData(self.items, cfg, encode_images=encode_images, encode_text=encode_text,
                                 model_hash=model_hash, latent_cache=cache(cfg.cache_latents, "latents"),
                                 text_cache=cache(cfg.cache_text, "text"), vae_dtype=m.vae.dtype,
                                 te_dtype=self.weight_dtype)
        bar = self._tqdm(desc="caching") if self.progress_bar else None

        def progress(kind, done, total):
            if bar is not None:
                bar.total = total
                bar.set_description(f"caching {kind}")
                bar.n = done
                bar.refresh()

        self._onload(m.vae, m.te1, m.te2)
        t0 = time.perf_counter()
        encoded = self.data.fill_caches(progress)
        if bar is not None:
            bar.close()
        if any(encoded.values()):
            log.info("cached %d latents and %d captions in %.1fs", encoded["latents"], encoded["text"],
                     time.perf_counter() - t0)
        self.eval_batch = self._prepare_eval_batch() if cfg.eval_every else None
        # Encoders that are no longer needed every step leave the accelerator (sampling brings them back).
        if cfg.cache_latents != "off":
            self._offload(m.vae)
        if cfg.cache_text != "off" and not cfg.train_text_encoder:
            self._offload(m.te1, m.te2)
        self.store.set_meta(buckets={f"{w}x{h}": n for (w, h), n in self.data.bucket_counts().items()},
                            batches_per_epoch=len(self.data))

    def _offload(self, *modules) -> None:
        if self.device.type != "cpu":
            for module in modules:
                module.to("cpu")

    def _onload(self, *modules) -> None:
        for module in modules:
            module.to(self.device)

    def build_optimizer(self, params):
        """The optimizer over the LoRA parameters (a seam: tests substitute their own)."""
        from .optim import create_optimizer

        cfg = self.cfg
        if cfg.train_text_encoder and cfg.text_encoder_lr is not None:
            params = self.network.param_groups(cfg.lr, cfg.text_encoder_lr)  # UNet, TE1, TE2 groups
        args = {k: tuple(v) if k.endswith("betas") and isinstance(v, list) else v  # JSON has no tuples
                for k, v in cfg.optimizer_args.items()}
        return create_optimizer(cfg.optimizer, params, lr=cfg.lr, **args)

    def _build_pulse(self):
        from .optim import EmoPulseScheduler

        args = {"notify": False, **self.cfg.scheduler_args}
        return EmoPulseScheduler(self.optimizer, **args)

    def _check_schedule_applies(self) -> None:
        from .optim import OPTIMIZER_INFO

        info = OPTIMIZER_INFO.get(self.cfg.optimizer)
        self_lr = info is not None and "emo_pulse" in info.signals
        if self_lr and (self.cfg.lr_scheduler != "constant" or self.cfg.warmup_steps):
            log.warning("%s sets its own step size (emoPulse): lr_scheduler=%s and warmup_steps have no effect",
                        self.cfg.optimizer, self.cfg.lr_scheduler)

    def _signal_names(self) -> list:
        from .optim import OPTIMIZER_INFO

        info = OPTIMIZER_INFO.get(self.cfg.optimizer)
        return list(info.signals) if info else []

    def _prepare_eval_batch(self):
        b = self.data.fixed_batch(self.cfg.eval_size)
        if b.prompt_embeds is None:
            with torch.no_grad():
                b.prompt_embeds, b.pooled = self._encode_prompts(b.captions, grad=False)
        b.prompt_embeds, b.pooled = b.prompt_embeds.detach(), b.pooled.detach()
        return b

    # =========================================================================================================
    # the loop
    # =========================================================================================================
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train until cfg.steps (or `until_step`, to run in slices), a stop request or should_stop."""
        if self.model is None:
            self.setup()
        end = self.cfg.steps if until_step is None else min(self.cfg.steps, until_step)
        if self.progress_bar and self._bar is None:
            self._bar = self._tqdm(total=self.cfg.steps, initial=self.step, desc="training")
        with torch.inference_mode(False), torch.enable_grad():
            try:
                while self.step < end and self.stop_reason is None:
                    self._poll_control()
                    if self.stop_reason is None:
                        record = self.train_step()
                        self._after_step(record)
                if self.stop_reason is None and self.step >= self.cfg.steps:
                    self.stop_reason = "finished"
                if self.stop_reason is not None and not self._closed:
                    self._finish()
            except KeyboardInterrupt:
                if not self._closed:
                    self.stop_reason = "interrupted"
                    self._finish()
                raise
            except BaseException as e:
                if not self._closed:
                    self._fail(e)
                raise
        return self.result()

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches -> the step's telemetry record."""
        cfg, opt = self.cfg, self.optimizer
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            loss = self.micro_batch_loss(batch, micro)
            scaled = loss / cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # records found_inf for scaler.update()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if cfg.max_grad_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.max_grad_norm, grad_norm)
        # The one host sync of the step: the optimizer's loss, the gradients' finiteness (and the fp16 scale).
        synced = [loss_sum / cfg.grad_accum, grad_norm.float().to(loss_sum.device)]
        if self.scaler is not None:
            synced.append(self.scaler._scale.float().reshape(()))  # get_scale() would sync on its own
        loss_value, norm_value, *scale = torch.stack(synced).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        self._apply_lr_schedule()
        if finite:
            # Not scaler.step(): it would re-check found_inf with a second sync; finiteness is known already.
            self._optimizer_step(loss_value)
            if self.pulse is not None:
                self.pulse.step(loss_value)
            self.consecutive_skips = 0
        else:
            self.skipped += 1
            self.consecutive_skips += 1
            log.warning("step %d skipped: non-finite %s (%d skipped so far)", self.step + 1,
                        "loss" if not math.isfinite(loss_value) else "gradient", self.skipped)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow
        opt.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        self._step_times.append(dt)
        sps = len(self._step_times) / sum(self._step_times)
        record = {"loss": loss_value, "lr": float(opt.param_groups[0]["lr"]), "grad_norm": norm_value,
                  "skipped": not finite, "skipped_total": self.skipped, "epoch": self.epoch,
                  "step_time": dt, "steps_per_s": sps, "samples_per_s": sps * cfg.batch_size * cfg.grad_accum,
                  "eta_s": (cfg.steps - self.step) / sps,
                  **_memory(self.device)}
        if scale:
            record["grad_scale"] = scale[0]
        if finite:
            for k, v in dict(getattr(opt, "telemetry", None) or {}).items():
                record.setdefault(k, v)
            if self.pulse is not None:
                for k, v in dict(getattr(self.pulse, "telemetry", None) or {}).items():
                    record[f"pulse_{k}"] = v
        record["should_stop"] = self._should_stop_flag()
        return record

    def micro_batch_loss(self, batch, micro: int) -> torch.Tensor:
        """The mean diffusion loss of one micro-batch (a 0-dim float32 tensor, graph attached)."""
        cfg, dev = self.cfg, self.device
        latents = batch.latents.to(dev, torch.float32)
        b, c = latents.shape[:2]
        # Noise and timesteps from a generator of (seed, step, micro): identical after a resume, any device.
        g = torch.Generator().manual_seed(_mix(cfg.seed, self.step, micro))
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((b, c, 1, 1), generator=g)
        t = torch.randint(cfg.timestep_min, cfg.timestep_max, (b,), generator=g)
        noise, t = noise.to(dev), t.to(dev)
        if batch.prompt_embeds is None:
            embeds, pooled = self._encode_prompts(batch.captions, grad=cfg.train_text_encoder)
        else:
            embeds, pooled = batch.prompt_embeds.to(dev), batch.pooled.to(dev)
        return self._loss(latents, noise, t, embeds, pooled, batch.time_ids.to(dev), snr_weighting=True)

    def _loss(self, latents, noise, t, embeds, pooled, time_ids, *, snr_weighting: bool) -> torch.Tensor:
        cfg = self.cfg
        noisy = self.schedule.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.schedule.velocity(latents, noise, t)
        wd = self.weight_dtype
        with self._autocast():
            # time_ids stay float32: sizes such as 1333 are not representable in bf16, and the UNet embeds
            # them sinusoidally in float32 anyway.
            cond = {"text_embeds": pooled.to(wd), "time_ids": time_ids.float()}
            pred = self.model.unet(noisy.to(wd), t, encoder_hidden_states=embeds.to(wd), added_cond_kwargs=cond).sample
        loss = per_sample_loss(pred, target, cfg.loss_type, cfg.huber_c)
        if snr_weighting and cfg.min_snr_gamma > 0:
            loss = loss * self.schedule.min_snr_weight(t, cfg.min_snr_gamma, self.prediction_type)
        return loss.mean()

    def _encode_prompts(self, captions, *, grad: bool):
        from . import model as M

        with torch.set_grad_enabled(grad):
            return M.encode_prompts(self.model, captions, device=self.device)

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=self.weight_dtype)
        return contextlib.nullcontext()

    def _next_batch(self):
        if self.batch_in_epoch >= len(self.data):
            self.epoch += 1
            self.batch_in_epoch = 0
        batch = self.data.batch(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        return batch

    def _apply_lr_schedule(self) -> None:
        if self.cfg.lr_scheduler == "constant" and not self.cfg.warmup_steps:
            return  # leave group['lr'] alone: some optimizers manage it themselves
        if self.cfg.lr_scheduler == "emopulse":
            return
        f = lr_factor(self.cfg, self.step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * f

    def _optimizer_step(self, loss_value: float) -> None:
        kwargs = {}
        if self._takes_loss:
            kwargs["loss"] = loss_value
        if self._takes_max_steps:
            kwargs["max_steps"] = self.cfg.steps
        self.optimizer.step(**kwargs)

    def _should_stop_flag(self) -> bool:
        return bool(getattr(self.optimizer, "should_stop", False)) or bool(getattr(self.pulse, "should_stop", False))

    # ---- after each step: telemetry, stop rules, saves, samples, callbacks ----------------------------------
    def _after_step(self, record: dict) -> None:
        cfg, step = self.cfg, self.step
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["eval_loss"] = self.evaluate()
        self.store.log_step(step, record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        flag = record["should_stop"]
        mode = self.control.state.get("auto_stop") or cfg.auto_stop
        if flag != self._should_stop_prev:
            self.store.event(step, "should_stop", {"value": flag, "auto_stop": mode})
            if flag:
                log.info("step %d: the optimizer signals should_stop (auto_stop=%s)", step, mode)
            self._should_stop_prev = flag
        if flag and mode == "stop" and step < cfg.steps:
            self.stop_reason = "should_stop"
        if self.consecutive_skips >= cfg.max_consecutive_skips:
            log.error("%d non-finite steps in a row: stopping", self.consecutive_skips)
            self.stop_reason = "nonfinite"
        if self.stop_reason is None and step < cfg.steps:
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_lora(self._step_path(step))
                if not cfg.save_state_every:
                    self.save_state()
            if cfg.save_state_every and step % cfg.save_state_every == 0:
                self.save_state()
        if cfg.sample_every and step % cfg.sample_every == 0:
            self.sample()
        if self._bar is not None:
            self._bar.update(1)
            post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.3g}"}
            if "emo_scalar" in record:
                post["emo"] = f"{record['emo_scalar']:+.3f}"
            self._bar.set_postfix(post, refresh=False)
        if self.on_step is not None:
            try:
                self.on_step({**record, "step": step, "steps_total": cfg.steps, "run_dir": str(self.run_dir)})
            except BaseException as e:
                self.stop_reason = "interrupted"
                log.warning("step callback raised %r: saving and stopping", e)
                self._finish(error=repr(e))
                raise

    def _poll_control(self) -> None:
        state = self.control.poll()
        save_now = int(state.get("save_now") or 0)
        if save_now > self._save_now_seen:
            self._save_now_seen = save_now
            if self.step > 0:
                self.save_lora(self._step_path(self.step))
                self.save_state()
        if self.stop_event.is_set() or state.get("stop"):
            self.stop_reason = "stopped"

    def request_stop(self) -> None:
        """Save and stop at the next step boundary (thread-safe)."""
        self.stop_event.set()

    # =========================================================================================================
    # evaluation and samples
    # =========================================================================================================
    @torch.no_grad()
    def evaluate(self) -> float:
        """The loss of the fixed evaluation batch at fixed timesteps and noise (no min-SNR weighting)."""
        b = self.eval_batch
        n = b.latents.shape[0]
        ts = torch.linspace(50, 950, 5).round().long()  # spread over the schedule, the same every time
        latents = b.latents.to(self.device, torch.float32).repeat(len(ts), 1, 1, 1)
        g = torch.Generator().manual_seed(_mix(self.cfg.seed, "eval"))
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = ts.repeat_interleave(n).to(self.device)
        rep = len(ts)
        unet = self.model.unet
        unet.eval()  # LoRA dropout follows the UNet's training flag
        try:
            loss = self._loss(latents, noise, t, b.prompt_embeds.to(self.device).repeat(rep, 1, 1),
                              b.pooled.to(self.device).repeat(rep, 1), b.time_ids.to(self.device).repeat(rep, 1),
                              snr_weighting=False)
        finally:
            unet.train()
        return float(loss)

    def sample(self) -> list:
        """Sample images for cfg.sample_prompts with the LoRA as it is now; saved under samples/."""
        from .samples import generate_samples

        cfg, m = self.cfg, self.model
        devices = [self.device] if self.device.type == "cuda" else []
        self._onload(m.vae, m.te1, m.te2)
        m.unet.eval()
        try:
            # Forked RNG: sampling must not shift the training run's random stream (resume stays exact).
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                paths = generate_samples(m, prompts=cfg.sample_prompts, negative=cfg.sample_negative,
                                         steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg,
                                         size=cfg.sample_size or cfg.resolution, seed=cfg.sample_seed,
                                         prediction_type=self.prediction_type, out_dir=self.store.samples_dir,
                                         step=self.step)
        except Exception as e:  # a failed preview must not end a long run
            log.warning("sampling at step %d failed: %r", self.step, e)
            self.store.event(self.step, "sample_failed", {"error": repr(e)})
            return []
        finally:
            m.unet.train()
            if self.cfg.cache_latents != "off":
                self._offload(m.vae)
            if self.cfg.cache_text != "off" and not self.cfg.train_text_encoder:
                self._offload(m.te1, m.te2)
        self.store.event(self.step, "sample", {"paths": [str(p) for p in paths], "prompts": cfg.sample_prompts})
        return paths

    # =========================================================================================================
    # saving, resuming, finishing
    # =========================================================================================================
    def _step_path(self, step: int) -> Path:
        out = Path(self.cfg.output).expanduser()
        return out.with_name(f"{out.stem}-step{step:06d}{out.suffix}")

    def save_lora(self, path=None) -> str:
        """Write the LoRA (kohya keys, ss_* metadata) atomically; default: the configured output."""
        from . import model as M

        path = Path(path or self.cfg.output).expanduser()
        M.save_lora(path, self.network, self._metadata(), dtype=_DTYPES[self.cfg.save_dtype])
        self.saved.append(str(path))
        self.store.event(self.step, "save", {"path": str(path)})
        log.info("saved %s (step %d)", path, self.step)
        return str(path)

    def _metadata(self) -> dict:
        from . import model as M

        cfg = self.cfg
        buckets = {f"{w}x{h}": n for (w, h), n in self.data.bucket_counts().items()}
        return M.kohya_metadata(
            network=self.network, model=self.model, output_name=Path(cfg.output).stem, steps=self.step,
            epoch=self.epoch, resolution=cfg.resolution, learning_rate=cfg.lr, optimizer=f"emolora.{cfg.optimizer}",
            text_encoder_lr=cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr,
            optimizer_args=cfg.optimizer_args or None, num_train_images=self.report.samples_per_epoch,
            tag_frequency=self._tag_frequency(), training_started_at=self._started_at, seed=cfg.seed,
            timestep_range=(cfg.timestep_min, cfg.timestep_max),
            lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.warmup_steps, max_train_steps=cfg.steps,
            max_grad_norm=cfg.max_grad_norm, gradient_accumulation_steps=cfg.grad_accum,
            gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=self.precision,
            cache_latents=cfg.cache_latents != "off", noise_offset=cfg.noise_offset or None,
            min_snr_gamma=cfg.min_snr_gamma or None, loss_type=cfg.loss_type,
            huber_c=cfg.huber_c if cfg.loss_type == "huber" else None, batch_size_per_device=cfg.batch_size,
            total_batch_size=cfg.batch_size * cfg.grad_accum, num_batches_per_epoch=len(self.data),
            enable_bucket=cfg.enable_buckets, bucket_info={"buckets": buckets},
            min_bucket_reso=min(min(b) for b in self.data.buckets),
            max_bucket_reso=max(max(b) for b in self.data.buckets), keep_tokens=cfg.keep_tokens,
            shuffle_caption=cfg.shuffle_caption, flip_aug=cfg.flip_aug, random_crop=cfg.random_crop,
            caption_dropout_rate=cfg.caption_dropout, caption_tag_dropout_rate=cfg.tag_dropout,
            dataset_dirs={k: {"n_repeats": r, "img_count": n} for k, (r, n) in self.report.folders.items()},
            training_comment=cfg.comment or None,
            extra={"emolora_optimizer": cfg.optimizer, "emolora_auto_stop": cfg.auto_stop,
                   "emolora_stop_reason": self.stop_reason, "emolora_skipped_steps": self.skipped},
        )

    def _tag_frequency(self) -> dict:
        """kohya's ss_tag_frequency: per folder, how often each comma-separated tag occurs."""
        freq: dict = {}
        for it in self.items:
            folder = freq.setdefault(it.image.parent.name, {})
            for tag in (t.strip() for t in it.caption.split(self.cfg.caption_separator)):
                if tag:
                    folder[tag] = folder.get(tag, 0) + it.repeats
        return freq

    def save_state(self) -> Path:
        """The resumable state, atomically, to <run>/state/state.pt."""
        path = self.store.state_dir / STATE_FILE
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "lora": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "pulse": self.pulse.state_dict() if self.pulse is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "counters": {"skipped": self.skipped, "consecutive_skips": self.consecutive_skips,
                         "should_stop_prev": self._should_stop_prev},
            "dataset": self._dataset_fingerprint(),
        }
        save_state(path, state)
        self.store.event(self.step, "state", {"path": str(path)})
        return path

    def _dataset_fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.sha256}|{it.repeats}|{it.caption}\n".encode())
        return h.hexdigest()

    def _restore(self) -> None:
        path = Path(self.cfg.resume).expanduser() / "state" / STATE_FILE
        state = load_state(path)
        saved = state["lora"]
        if len(saved) != len(self.params) or any(s.shape != p.shape for s, p in zip(saved, self.params)):
            raise ConfigError(f"resume: the LoRA in {path} does not match this network (rank, targets or model "
                              "changed)")
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.pulse is not None and state.get("pulse") is not None:
            self.pulse.load_state_dict(state["pulse"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        c = state["counters"]
        self.skipped, self.consecutive_skips = c["skipped"], c["consecutive_skips"]
        self._should_stop_prev = c["should_stop_prev"]
        if state.get("dataset") != self._dataset_fingerprint():
            log.warning("resume: the dataset changed since the state was saved; the data order will differ")
        set_rng_state(state["rng"])
        self.store.truncate_after(self.step)
        self.store.event(self.step, "resume", {"from": str(path)})
        log.info("resumed %s at step %d (epoch %d, batch %d)", self.run_dir, self.step, self.epoch,
                 self.batch_in_epoch)

    def _finish(self, error: str | None = None) -> None:
        """Save the final LoRA and state, record the outcome."""
        self._closed = True
        self.lora_path = self.save_lora(self.cfg.output)
        self.save_state()
        status = "finished" if self.stop_reason == "finished" else "stopped"
        self.store.event(self.step, "stop", {"reason": self.stop_reason, "error": error})
        self.store.set_meta(status=status, stop_reason=self.stop_reason, lora_path=self.lora_path,
                            finished_at=time.time(), steps_done=self.step, skipped_steps=self.skipped,
                            summary=self._summary())
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        log.info("%s at step %d: %s", status, self.step, self.lora_path)

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        if self.store is not None:
            self.store.event(self.step, "error", {"error": repr(exc)})
            self.store.set_meta(status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=time.time(),
                                steps_done=self.step)

    def _summary(self) -> dict:
        reader = RunReader(self.run_dir)
        try:
            rows = reader.steps()
        finally:
            reader.close()
        losses = [r["loss"] for r in rows if r.get("loss") is not None and not r.get("skipped")]
        evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        k = max(1, min(10, len(losses) // 5))
        out = {"steps": self.step, "skipped_steps": self.skipped}
        if losses:
            out.update(loss_start=sum(losses[:k]) / k, loss_end=sum(losses[-k:]) / k, loss_min=min(losses))
        if evals:
            out.update(eval_loss_start=evals[0], eval_loss_end=evals[-1])
        for name in ("emo_scalar", "emo_pulse", "trust", "effective_lr", "lr"):
            vals = [r[name] for r in rows if isinstance(r.get(name), (int, float)) and not isinstance(r[name], bool)]
            if vals:
                out[f"{name}_min"], out[f"{name}_max"] = min(vals), max(vals)
        times = [r["step_time"] for r in rows if r.get("step_time")]
        if times:
            out["steps_per_s"] = len(times) / sum(times)
        mem = _memory(self.device)
        out["peak_mem_mb"] = mem.get("mem_peak_mb", mem.get("rss_peak_mb"))
        return out

    def result(self) -> TrainResult:
        return TrainResult(self.lora_path, str(self.run_dir), self.step, self.stop_reason, self.skipped,
                           list(self.saved), self._summary() if self.stop_reason else {})

    def close(self) -> None:
        """End the session: a run left between steps (run(until_step=...)) gets its resumable state saved.
        The model stays in memory for inspection until release()."""
        if not self._closed and self.store is not None and self.step > 0 and self.optimizer is not None:
            self.save_state()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.store is not None:
            if not self._closed:
                self.store.set_meta(status="stopped", stop_reason="closed", steps_done=self.step,
                                    skipped_steps=self.skipped)
            self.store.close()
            self.store = None

    def release(self) -> None:
        """Drop the model, LoRA, optimizer and caches and return their memory (GPU included)."""
        import gc

        self.model = self.network = self.optimizer = self.data = self.eval_batch = self.pulse = None
        self.params = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- misc ------------------------------------------------------------------------------------------------
    def _tqdm(self, **kw):
        from tqdm import tqdm

        return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard=True but tensorboard is not installed; the run store still has everything")
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
