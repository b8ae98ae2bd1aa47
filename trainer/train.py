"""The training loop. Trainer.setup() builds everything; Trainer.run() trains; train(config) does both.

Per optimizer step: `grad_accum` micro-batches (noise, timesteps, UNet, loss, backward), then ONE host sync
that reads the mean micro-batch loss and the gradient norm together. The optimizer gets that mean, unscaled
(no GradScaler factor, no 1/grad_accum), as a python float. A non-finite step is skipped: its gradients
are dropped, it is counted, and the optimizer is not fed. (Logging the optimizer's signals afterwards costs
one more transfer: they are stacked on the device and read at once.)

Everything random is a function of the seed and the position (data order and augmentation of (epoch, batch),
noise and timesteps of (step, micro-batch)), or is in the saved state (RNGs for LoRA dropout), so a resumed
run ends with the same LoRA, bit for bit on the CPU, as an uninterrupted one.

The rest lives beside it: build.py (setup), checkpoint.py (LoRA files), state.py (the resumable state),
telemetry.py (step records, summary), samples.py (preview images).
"""

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import build, checkpoint, telemetry
from .config import TrainConfig
from .diffusion import per_sample_loss
from .runstore import RunStore
from .state import rng_state, save_trainer_state, set_rng_state

__all__ = ["TrainResult", "Trainer", "lr_factor", "train"]

log = logging.getLogger("emolora.train")


@dataclass
class TrainResult:
    lora_path: str | None  # the final LoRA (None if the run failed before saving one)
    run_dir: str
    steps_done: int
    stop_reason: str | None  # finished, stopped, should_stop, nonfinite, interrupted; None while paused
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    saved: list = field(default_factory=list)  # every LoRA file written
    summary: dict = field(default_factory=dict)  # loss start/end/min, eval loss, signal ranges, speed, memory


def train(config: TrainConfig, *, stop_event: threading.Event | None = None, on_step=None, on_setup=None,
          progress_bar: bool = False) -> TrainResult:
    """Train a LoRA as `config` says. See Trainer for the arguments."""
    trainer = Trainer(config, stop_event=stop_event, on_step=on_step, on_setup=on_setup, progress_bar=progress_bar)
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


class Trainer:
    """One run. stop_event: set it to save and stop at the next step boundary. on_step(info): called after
    every step with the step's telemetry record plus steps_total and run_dir (an exception raised there
    saves the LoRA and the state, marks the run stopped, and propagates). on_setup(phase, done, total): called
    while setting up ("model" around the checkpoint load, "latents"/"text" while caching), so a host can cancel
    before the first step by raising there. progress_bar: tqdm on stderr."""

    def __init__(self, config: TrainConfig, *, stop_event: threading.Event | None = None, on_step=None,
                 on_setup=None, progress_bar: bool = False):
        self.cfg = config
        self.stop_event = stop_event or threading.Event()
        self.on_step = on_step
        self.on_setup = on_setup
        self.progress_bar = progress_bar
        self.model = None
        self.store: RunStore | None = None
        self.step = 0  # optimizer steps done
        self.epoch, self.batch_in_epoch = 0, 0  # the next batch to draw
        self._step_start = None  # (epoch, batch, RNGs) at the start of the step in progress
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

    # ---- setup (the pieces are in build.py) ----------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Scan the data, open the run folder, load the model, build LoRA, caches, optimizer; resume if asked."""
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference_mode
            build.setup(self)
        return self

    # Seams (the GPU benchmark replaces the first two with a random UNet and synthetic cached latents; tests
    # substitute the optimizer).
    def _load_model(self) -> None:
        self.model, self.prediction_type, self.schedule = build.load_model(self.cfg, self.device, self.precision)
        self._prepare_model()

    def _build_data(self) -> None:
        build.build_data(self)

    def _prepare_model(self) -> None:
        build.prepare_model(self.cfg, self.model)

    def build_optimizer(self, params):
        """The optimizer over the LoRA parameters (a seam: tests substitute their own)."""
        cfg = self.cfg
        if cfg.train_text_encoder and cfg.text_encoder_lr is not None:
            params = self.network.param_groups(cfg.lr, cfg.text_encoder_lr)  # UNet, TE1, TE2 groups
        return build.make_optimizer(cfg, params)

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train until cfg.steps (or `until_step`, to run in slices), a stop request or should_stop."""
        if self.model is None:
            self.setup()
        end = self.cfg.steps if until_step is None else min(self.cfg.steps, until_step)
        if self.progress_bar and self._bar is None:
            self._bar = telemetry.progress_bar(total=self.cfg.steps, initial=self.step, desc="training")
        with torch.inference_mode(False), torch.enable_grad():
            try:
                while self.step < end and self.stop_reason is None:
                    self._poll_control()
                    if self.stop_reason is None:
                        # Where this step started: an interrupt before it commits rewinds here, so the saved
                        # state resumes exactly (the data position and RNGs move during the micro-batches).
                        self._step_start = (self.epoch, self.batch_in_epoch, rng_state())
                        record = self.train_step()
                        self._after_step(record)
                if self.stop_reason is None and self.step >= self.cfg.steps:
                    self.stop_reason = "finished"
                if self.stop_reason is not None and not self._closed:
                    self._finish()
            except KeyboardInterrupt:
                self._rewind_partial_step()
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
        self.step += 1
        self._step_start = None  # committed: from here an interrupt saves this step as done
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow
        opt.zero_grad(set_to_none=True)
        record = telemetry.step_record(self, loss_value, norm_value, scale, finite, time.perf_counter() - t0)
        record["should_stop"] = self._should_stop_flag()
        return record

    def _rewind_partial_step(self) -> None:
        if self._step_start is None:
            return
        self.epoch, self.batch_in_epoch, rng = self._step_start
        set_rng_state(rng)
        self.optimizer.zero_grad(set_to_none=True)
        self._step_start = None

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
            telemetry.log_tensorboard(self._tb, step, record)
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
                self.save_lora(checkpoint.step_path(cfg.output, step))
                if not cfg.save_state_every:
                    self.save_state()
            if cfg.save_state_every and step % cfg.save_state_every == 0:
                self.save_state()
        if cfg.sample_every and step % cfg.sample_every == 0:
            self.sample()
        if self._bar is not None:
            telemetry.update_bar(self._bar, record)
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
                self.save_lora(checkpoint.step_path(self.cfg.output, self.step))
                self.save_state()
        if self.stop_event.is_set() or state.get("stop"):
            self.stop_reason = "stopped"

    def request_stop(self) -> None:
        """Save and stop at the next step boundary (thread-safe)."""
        self.stop_event.set()

    # ---- evaluation and samples ----------------------------------------------------------------------------------
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
        with build.evaluating(self):
            loss = self._loss(latents, noise, t, b.prompt_embeds.to(self.device).repeat(rep, 1, 1),
                              b.pooled.to(self.device).repeat(rep, 1), b.time_ids.to(self.device).repeat(rep, 1),
                              snr_weighting=False)
        return float(loss)

    def sample(self) -> list:
        """Sample images for cfg.sample_prompts with the LoRA as it is now; saved under samples/."""
        from .samples import sample_during_training

        return sample_during_training(self)

    # ---- saving and finishing (the pieces are in checkpoint.py and state.py) -------------------------------------
    def save_lora(self, path=None) -> str:
        """Write the LoRA (kohya keys, ss_* metadata) atomically; default: the configured output."""
        return checkpoint.save_lora(self, path)

    def save_state(self) -> Path:
        """The resumable state, atomically, to <run>/state/state.pt."""
        return save_trainer_state(self)

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
        return telemetry.summary(self.run_dir, self.step, self.skipped, self.device)

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

