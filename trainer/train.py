"""The training loop. Trainer.setup() builds everything; Trainer.run() trains; train(config) does both.

Per optimizer step: `grad_accum` micro-batches (noise, timesteps, UNet, loss, backward), then ONE host sync
that reads the mean micro-batch loss and the gradient norm together. The optimizer gets that mean, unscaled
(no GradScaler factor, no 1/grad_accum), as a python float. A non-finite step is skipped: its gradients
are dropped, it is counted, and the optimizer is not fed. (Logging the optimizer's signals afterwards costs
one more transfer: they are stacked on the device and read at once.)

Everything random is a function of the seed and the position (data order and augmentation of (epoch, batch),
noise and timesteps of (step, micro-batch, the sample's row in the global batch)), or is in the saved state
(RNGs for LoRA dropout), so a resumed run ends with the same LoRA, bit for bit on the CPU, as an uninterrupted
one. Under torchrun several processes train one LoRA in lockstep: trainer/distributed.py.

The run's parts are explicit (parts.py): RunSetup (what build.py made), LoopState (where the loop stands, what
state.py saves). The rest lives beside it: checkpoint.py (LoRA files), telemetry.py (step records, summary),
samples.py (preview images).
"""

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import build, checkpoint, distributed, telemetry, vram
from .config import ConfigError, TrainConfig
from .diffusion import draw_noise
from .losses import diffusion_loss, fixed_loss, mix_seed, note_validation
from .optimizer_loss import normalized_loss
from .parts import Hooks, LoadedModel, LoopState, RunSetup, Runtime
from .placement import to_device
from .rollback import UpdateGuard
from .runstore import RunStore
from .schedule import apply_lr_schedule
from .state import STATE_FILE, restore_trainer_state, rng_state, save_trainer_state, set_rng_state
from .step_read import read_step
from .stop_rules import check_step

__all__ = ["TrainResult", "Trainer", "train"]

log = logging.getLogger("emolora.train")


@dataclass
class TrainResult:
    lora_path: str | None  # the final LoRA (None if the run failed before saving one)
    run_dir: str
    steps_done: int
    stop_reason: str | None  # finished/stopped/should_stop/val_plateau/nonfinite/diverged/interrupted; None: paused
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    saved: list = field(default_factory=list)  # every LoRA file written
    summary: dict = field(default_factory=dict)  # loss start/end/min, eval loss, signal ranges, speed, memory
    message: str | None = None  # why the run stopped, in words, when that needs words (diverged: what to try)
    rolled_back: int = 0  # updates undone because they made the LoRA non-finite


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


class Trainer:
    """One run. stop_event: set it to save and stop at the next step boundary. on_step(info): called after
    every step with the step's telemetry record plus steps_total and run_dir, and once barely_moving (the
    warning's text) at the step that raised it (an exception raised there
    saves the LoRA and the state, marks the run stopped, and propagates). on_setup(phase, done, total): called
    while setting up ("model" around the checkpoint load, "latents"/"text" while caching), so a host can cancel
    before the first step by raising there. progress_bar: tqdm on stderr.

    Its parts: `built` (RunSetup: model, network, data, optimizer...), `loop` (LoopState: step, data position,
    skip counters), `store`/`control` (the run folder's record and control channel) and the outcome
    (stop_reason, saved files)."""

    def __init__(self, config: TrainConfig, *, stop_event: threading.Event | None = None, on_step=None,
                 on_setup=None, progress_bar: bool = False):
        self.cfg = config
        self.hooks = Hooks(stop_event or threading.Event(), on_step, on_setup, progress_bar)
        self.dist = distributed.Dist()  # this process's rank; several only under torchrun/accelerate launch
        self.built: RunSetup | None = None
        self.loop = LoopState()
        self.store: RunStore | None = None
        self.control = None
        self.run_dir: Path | None = None
        self.stop_reason: str | None = None
        self.stop_message: str | None = None
        self._guard: UpdateGuard | None = None  # finiteness probe and rollback (trainer/rollback.py)
        self.vram_estimate: dict | None = None  # trainer/vram.py, made before the first step
        self._late = telemetry.LateSignals()  # the previous step's device-side optimizer signals
        self._completed = None  # (step, record) completed by this step's read, logged again by _after_step
        self._draws: list | None = None  # optimizer_loss=normalized: this step's (per-sample losses, timesteps)
        self._motion = telemetry.MotionCheck()  # update ratios and the "barely changed the LoRA" warning
        self.saved: list[str] = []
        self.lora_path: str | None = None
        self._closed = False
        self._save_now_seen = 0
        self._step_start = None  # (epoch, batch, RNGs) at the start of the step in progress
        self._step_times: deque = deque(maxlen=20)
        self._bar = None
        self._tb = None

    # Read-only views of the parts, for hosts and tests.
    model = property(lambda self: self.built.model)
    network = property(lambda self: self.built.network)
    optimizer = property(lambda self: self.built.optimizer)
    params = property(lambda self: self.built.params)
    scaler = property(lambda self: self.built.scaler)
    device = property(lambda self: self.built.device)
    precision = property(lambda self: self.built.runtime.precision)
    step = property(lambda self: self.loop.step)

    # ---- setup (the pieces are in build.py) ----------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Scan the data, load the model, open the run folder, build LoRA, caches, optimizer; resume if asked.
        Cheap failures come first; a failure after the run folder exists is recorded in it."""
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes under inference_mode
            self.cfg, self.dist = distributed.setup(self.cfg)  # a no-op unless launched with WORLD_SIZE > 1
            cfg, items, val_items, report, rt = build.scan_and_place(self.cfg)
            self.cfg = cfg
            self.hooks.setup_phase("model", 0, 1)
            loaded = self.load_model(rt)  # a bad checkpoint fails here, before a run folder exists for it
            self.hooks.setup_phase("model", 1, 1)
            self.store, self.control, started_at = distributed.open_run(self.dist, build.open_run, cfg, rt, report,
                                                                          self.hooks.stop_event)
            self.run_dir = self.store.run_dir
            try:
                self.built = self._build_training(rt, loaded, items, val_items, report, started_at)
                self._start_or_resume()
            except BaseException as e:
                self._fail(e)
                raise
        return self

    # Seams (the GPU benchmark replaces the first two with a random UNet and synthetic cached latents; tests
    # substitute the optimizer).
    def load_model(self, rt: Runtime) -> LoadedModel:
        return build.load_model(self.cfg, rt)

    def build_data(self, rt: Runtime, loaded: LoadedModel, items):
        """-> (TrainingData with filled caches, the fixed evaluation batch or None). Several ranks: the sampler
        draws global batches of batch_size x ranks, of which each rank takes its rows (distributed.shard)."""
        cfg = self.cfg.replace(batch_size=self.cfg.batch_size * self.dist.world) if self.dist.enabled else self.cfg
        return build.build_data(cfg, rt, loaded, items, self.store, self.hooks)

    def build_validation(self, rt: Runtime, loaded: LoadedModel, data, val_items) -> list:
        """The held-out images as fixed batches, text encoded once (the sweep hands in its own)."""
        return build.build_validation(self.cfg, rt, loaded, data, val_items)

    def build_optimizer(self, params):
        """The optimizer over the LoRA parameters or param groups."""
        return build.make_optimizer(self.cfg, params)

    def _build_training(self, rt: Runtime, loaded: LoadedModel, items, val_items, report,
                        started_at: float) -> RunSetup:
        """Everything after the model and the run folder: LoRA, data and caches, optimizer, LR pulse, fp16 scaler."""
        cfg = self.cfg
        if cfg.optimizer_loss == "normalized":
            if self.dist.enabled:
                raise ConfigError("optimizer_loss='normalized' needs per-sample losses of the global batch: not "
                                  "supported with several processes yet; use raw")
            self._draws = []
        self.store.set_meta(base_dtype=getattr(loaded.model, "base_dtype", "") or None)  # the UNet weights' storage
        build.seed_everything(cfg.seed)
        network = build.make_network(cfg, loaded.model)
        with self.dist.main_first("caching"):  # rank 0 fills the disk caches, the others then read them
            data, eval_batch = self.build_data(rt, loaded, items)
            val_batches = self.build_validation(rt, loaded, data, val_items)
        offloader = build.place_unet(cfg, rt, loaded.model.unet)
        params = build.trainable_params(network, rt.device)
        groups = params
        if cfg.train_text_encoder and cfg.text_encoder_lr is not None:
            groups = network.param_groups(cfg.lr, cfg.text_encoder_lr)  # UNet, TE1, TE2 groups
        optimizer = self.build_optimizer(groups)
        takes_loss, takes_max_steps = build.step_signature(optimizer)
        build.warn_if_schedule_ignored(cfg)
        return RunSetup(runtime=rt, loaded=loaded, items=items, report=report, network=network, params=params,
                        data=data, eval_batch=eval_batch, optimizer=optimizer,
                        base_lrs=[g["lr"] for g in optimizer.param_groups], takes_loss=takes_loss,
                        takes_max_steps=takes_max_steps, pulse=build.build_pulse(cfg, optimizer),
                        scaler=build.build_scaler(rt), started_at=started_at, val_batches=tuple(val_batches),
                        offload=offloader)

    def _start_or_resume(self) -> None:
        """The saved state (resume) or the step-0 evaluation; then the run's meta and the optional views."""
        cfg, run = self.cfg, self.built
        self._estimate_vram()
        n = sum(p.numel() for p in run.params)
        self.store.set_meta(signals=build.signal_names(cfg), lora_params=n, prediction_type=run.loaded.prediction_type,
                            lr=cfg.lr, model_hash=getattr(run.model, "model_hash", None))
        if cfg.resume:
            self.loop = restore_trainer_state(cfg, run, self.store, self.dist.rank, self.dist.world)
        else:
            self.store.event(0, "start", {"lora_params": n, "batches_per_epoch": len(run.data)})
            start = {"eval_loss": self.evaluate()} if cfg.eval_every else {}
            if run.val_batches:
                start["val_loss"] = self.validate()
            if start:
                self.store.log_step(0, {**start, "epoch": 0})
        self.dist.broadcast_params(run.params)  # every rank starts from rank 0's weights, as under DDP
        if cfg.tensorboard and self.dist.is_main:
            self._tb = telemetry.open_tensorboard(self.run_dir)
        log.info("training %d LoRA parameters with %s (lr %g) for %d steps; run folder %s", n, cfg.optimizer,
                 cfg.lr, cfg.steps, self.run_dir)

    def _estimate_vram(self) -> None:
        """The VRAM estimate (trainer/vram.py), logged, with a warning naming what would make it fit, and kept in
        the run's meta (and as emolora_vram_estimate_mb in the LoRA's metadata)."""
        with torch.random.fork_rng(devices=[]):  # the throwaway optimizer must not move the run's RNG
            est = vram.estimate(self.cfg, self.built, self.build_optimizer)
        line, warning = vram.report(self.cfg, est)
        log.info(line)
        if warning:
            log.warning(warning)
        self.store.set_meta(vram_estimate=est)
        self.vram_estimate = est

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self, until_step: int | None = None) -> TrainResult:
        """Train until cfg.steps (or `until_step`, to run in slices), a stop request or should_stop."""
        if self.built is None:
            self.setup()
        loop = self.loop
        end = self.cfg.steps if until_step is None else min(self.cfg.steps, until_step)
        if self.hooks.progress_bar and self._bar is None:
            self._bar = telemetry.progress_bar(total=self.cfg.steps, initial=loop.step, desc="training")
        with torch.inference_mode(False), torch.enable_grad():
            try:
                while loop.step < end and self.stop_reason is None:
                    self._poll_control()
                    if self.stop_reason is None:
                        # Where this step started: an interrupt before it commits rewinds here, so the saved
                        # state resumes exactly (the data position and RNGs move during the micro-batches).
                        self._step_start = (loop.epoch, loop.batch_in_epoch, rng_state())
                        record = self.train_step()
                        self._after_step(record)
                if self.stop_reason is None and loop.step >= self.cfg.steps:
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
        cfg, run, loop = self.cfg, self.built, self.loop
        opt, scaler = run.optimizer, run.scaler
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=run.device)
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            loss = self.micro_batch_loss(batch, micro)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        # Several ranks: one all-reduce of gradients and loss (no sync per micro-batch); the loss stays on the
        # device and joins the host read below, so every rank's optimizer is fed the same global mean.
        loss_sum = self.dist.reduce_step(run.params, loss_sum)
        if scaler is not None:
            scaler.unscale_(opt)  # records found_inf for scaler.update()
        grads = [p.grad for p in run.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=run.device)
        if cfg.max_grad_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(run.params, cfg.max_grad_norm, grad_norm)
        # The step's one host read (trainer/step_read.py); the previous step's record is completed by it.
        guard = self._update_guard()
        updated = guard.unverified  # an update was made since the last read: its size is measured now
        got = read_step(loss_sum / cfg.grad_accum, grad_norm, guard.probe(), guard.update_norm(),
                        scale=scaler._scale if scaler is not None else None,  # get_scale() would sync on its own
                        draws=self._draws, late=self._late.tensor())
        if self._draws:
            self._draws.clear()
        loss_value, norm_value = got.loss, got.grad_norm
        params_ok = guard.check(got.lora_norm, loop)  # False: the previous update was rolled back
        ratio = self._motion.observe(loop.step, got.lora_norm, got.update_norm, updated=updated, params_ok=params_ok)
        prev_extra = ({} if params_ok else {"rolled_back": True}) | ({} if ratio is None else {"update_ratio": ratio})
        self._completed = self._late.complete(got.late, **prev_extra)
        finite = params_ok and math.isfinite(loss_value) and math.isfinite(norm_value)
        apply_lr_schedule(cfg, opt, run.base_lrs, loop.step)
        optimizer_loss = None
        if finite:
            optimizer_loss = loss_value
            if got.losses:
                optimizer_loss = normalized_loss(loop.loss_buckets, loss_value, got.losses, got.timesteps,
                                                 cfg.timestep_min, cfg.timestep_max)
            guard.before_update()  # the copy a bad update is rolled back to
            # Not scaler.step(): it would re-check found_inf with a second sync; finiteness is known already.
            self._optimizer_step(optimizer_loss)
            if run.pulse is not None:
                run.pulse.step(0.0 if cfg.optimizer_loss == "withheld" else optimizer_loss)
            guard.after_update()
            loop.consecutive_skips = 0
        elif not params_ok:
            loop.skipped += 1  # this step's gradients were taken at the weights just rolled back: dropped
        else:
            loop.skipped += 1
            loop.consecutive_skips += 1
            log.warning("step %d skipped: non-finite %s (%d skipped so far)", loop.step + 1,
                        "loss" if not math.isfinite(loss_value) else "gradient", loop.skipped)
        loop.step += 1
        self._step_start = None  # committed: from here an interrupt saves this step as done
        if scaler is not None:
            scaler.update()  # halves the scale after an overflow
        opt.zero_grad(set_to_none=True)
        self._step_times.append(time.perf_counter() - t0)
        pending = telemetry.take_device_signals(opt) if finite else None  # read with the next step's transfer
        record = telemetry.step_record(cfg, run, loop, self._step_times, loss=loss_value, grad_norm=norm_value,
                                       scale=got.scale, finite=finite)
        record.update(lora_norm=got.lora_norm, rolled_back_total=loop.rolled_back)
        if got.losses and optimizer_loss is not None:
            record["optimizer_loss"] = optimizer_loss
        record["should_stop"] = self._should_stop_flag()
        self._late.hold(loop.step, record, pending)
        return record

    def _update_guard(self) -> UpdateGuard:
        if self._guard is None:
            self._guard = UpdateGuard(self.cfg, self.built, self.store)
        return self._guard

    def _rewind_partial_step(self) -> None:
        if self._step_start is None:
            return
        self.loop.epoch, self.loop.batch_in_epoch, rng = self._step_start
        set_rng_state(rng)
        self.built.optimizer.zero_grad(set_to_none=True)
        if self._draws:
            self._draws.clear()  # the partial step's per-sample losses: it is redone on resume
        self._step_start = None

    def micro_batch_loss(self, batch, micro: int) -> torch.Tensor:
        """The mean diffusion loss of one micro-batch (a 0-dim float32 tensor, graph attached)."""
        cfg, dev = self.cfg, self.built.device
        b, rows = len(batch.indices), batch.global_rows or len(batch.indices)
        if b == 0:  # a rank whose shard of a short global batch is empty: zero loss, zero gradients
            return sum(p.sum() for p in self.built.params) * 0.0
        latents = to_device(batch.latents, dev, torch.float32)
        # Each sample's noise and timestep from a generator of (seed, step, micro, its row in the global batch):
        # identical after a resume, on any device, and for any number of ranks sharing the batch.
        seeds = [mix_seed(cfg.seed, self.loop.step, micro, j) for j in range(batch.offset, batch.offset + b)]
        noise, t = draw_noise(latents.shape, seeds, dev, noise_offset=cfg.noise_offset, t_min=cfg.timestep_min,
                              t_max=cfg.timestep_max)  # on the device: no host tensor to copy
        if batch.prompt_embeds is None:
            embeds, pooled = self._encode_prompts(batch.captions, grad=cfg.train_text_encoder)
        else:
            embeds, pooled = to_device(batch.prompt_embeds, dev), to_device(batch.pooled, dev)
        per_sample = diffusion_loss(cfg, self.built, latents, noise, t, embeds, pooled,
                                    to_device(batch.time_ids, dev), snr_weighting=True, mask=batch.mask,
                                    weights=batch.weights, reduce=False)
        if self._draws is not None:
            self._draws.append((per_sample.detach(), t))
        loss = per_sample.mean()
        # A shard's share of the global batch mean: the ranks' shares sum (all-reduce) to that mean.
        return loss if rows == b else loss * (b / rows)

    def _encode_prompts(self, captions, *, grad: bool):
        from . import model as M

        with torch.set_grad_enabled(grad):
            return M.encode_prompts(self.built.model, captions, device=self.built.device)

    def _next_batch(self):
        loop, data = self.loop, self.built.data
        if loop.batch_in_epoch >= len(data):
            loop.epoch += 1
            loop.batch_in_epoch = 0
        batch = distributed.shard(data.batch(loop.epoch, loop.batch_in_epoch), self.dist, self.cfg.batch_size)
        loop.batch_in_epoch += 1
        return batch

    def _optimizer_step(self, loss_value: float) -> None:
        """loss_value: what the optimizer is to feel (cfg.optimizer_loss). "withheld": step() without it, exactly
        as the trainers that do not feed the loss call it."""
        run, kwargs = self.built, {}
        if run.takes_loss and self.cfg.optimizer_loss != "withheld":
            kwargs["loss"] = loss_value
        if run.takes_max_steps:
            kwargs["max_steps"] = self.cfg.steps
        run.optimizer.step(**kwargs)

    def _should_stop_flag(self) -> bool:
        run = self.built
        return bool(getattr(run.optimizer, "should_stop", False)) or bool(getattr(run.pulse, "should_stop", False))

    # ---- after each step: telemetry, stop rules, saves, samples, callbacks ----------------------------------
    def _after_step(self, record: dict) -> None:
        cfg, loop = self.cfg, self.loop
        step = loop.step
        if self._completed is not None:  # the previous step's record, now with its device-side signals
            self._log_record(*self._completed)
            self._completed = None
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            record["eval_loss"] = self.evaluate()
        every = cfg.validation_interval
        if every and (step % every == 0 or step == cfg.steps):
            record["val_loss"] = self.validate()
        self.store.log_step(step, record)
        if self._tb is not None:
            telemetry.log_tensorboard(self._tb, step, record)
        self.stop_reason, message, still = check_step(cfg, loop, self.store, record, stop_reason=self.stop_reason,
                                                      auto_stop=self._auto_stop_mode(), guard=self._update_guard(),
                                                      motion=self._motion)
        self.stop_message = message or self.stop_message
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
        if self.hooks.on_step is not None:
            try:
                self.hooks.on_step({**record, "step": step, "steps_total": cfg.steps, "run_dir": str(self.run_dir),
                                    **({"barely_moving": still} if still else {})})  # the warning, once
            except BaseException as e:
                self.stop_reason = "interrupted"
                log.warning("step callback raised %r: saving and stopping", e)
                self._finish(error=repr(e))
                raise

    def _auto_stop_mode(self) -> str:
        """stop / mark / off: the control file's (the panel may change it while the run goes), else the config's."""
        return self.control.state.get("auto_stop") or self.cfg.auto_stop

    def _poll_control(self) -> None:
        state = self.control.poll()
        save_now = int(state.get("save_now") or 0)
        if save_now > self._save_now_seen:
            self._save_now_seen = save_now
            if self.loop.step > 0:
                self.save_lora(checkpoint.step_path(self.cfg.output, self.loop.step))
                self.save_state()
        if self.hooks.stop_event.is_set() or state.get("stop"):
            self.stop_reason = "stopped"

    def request_stop(self) -> None:
        """Save and stop at the next step boundary (thread-safe)."""
        self.hooks.stop_event.set()

    # ---- evaluation and samples ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """The loss of the fixed evaluation batch at fixed timesteps and noise (no min-SNR weighting)."""
        return fixed_loss(self.cfg, self.built, [self.built.eval_batch], "eval")

    def validate(self) -> float:
        """The loss of the held-out validation images at fixed timesteps and noise: comparable across steps and
        runs. Under auto_stop_on='val-plateau' (and auto_stop='stop') val_patience validations without a new
        minimum stop the run."""
        cfg, loop = self.cfg, self.loop
        value = fixed_loss(cfg, self.built, self.built.val_batches, "validation")
        note_validation(loop, value)
        plateau = cfg.auto_stop_on == "val-plateau" and loop.val_stale >= cfg.val_patience
        if plateau and self._auto_stop_mode() == "stop":
            log.info("step %d: no new validation minimum for %d validations (best %.5f): stopping", loop.step,
                     loop.val_stale, loop.val_best)
            self.store.event(loop.step, "val_plateau", {"best": loop.val_best, "stale": loop.val_stale})
            self.stop_reason = "val_plateau"
        return value

    def sample(self) -> list:
        """Sample images for cfg.sample_prompts with the LoRA as it is now; saved under samples/."""
        from .samples import sample_during_training

        if not self.dist.is_main:
            return []
        return sample_during_training(self.cfg, self.built, self.store, self.loop.step)

    # ---- saving and finishing (the pieces are in checkpoint.py and state.py) -------------------------------------
    def _verify_last_update(self) -> None:
        """Before a save: an update no step read has checked yet is checked now (and rolled back if bad; its
        record, already logged, is completed and marked)."""
        if not self._update_guard().verify_now(self.loop):
            late = self._late.flush(rolled_back=True)
            if late is not None:
                self._log_record(*late)

    def _log_record(self, step: int, record: dict, added: list) -> None:
        self.store.log_step(step, record)  # replaces the row: the record is completed, not duplicated
        if self._tb is not None:
            telemetry.log_tensorboard(self._tb, step, {k: record[k] for k in added})

    def save_lora(self, path=None) -> str:
        """Write the LoRA (kohya keys, ss_* metadata) atomically; default: the configured output. Several ranks:
        all compare their LoRA and optimizer checksums first (a mismatch raises), rank 0 alone writes.
        Never a non-finite LoRA: an unchecked last update is checked first (and rolled back if bad); should the
        file still hold NaN/inf (e.g. fp16 overflow), it is refused, recorded, and the last written file stays."""
        self._verify_last_update()
        self.dist.check_lockstep(self.built.params, self.built.optimizer, self.loop.step)
        if not self.dist.is_main:
            path = str(Path(path or self.cfg.output).expanduser())
            self.saved.append(path)
            return path
        path = checkpoint.save_lora(self.cfg, self.built, self.loop, self.store, path, stop_reason=self.stop_reason,
                                    summary=self._summary())
        if path is None:  # refused (not finite): the last file written stays the run's LoRA
            return self.saved[-1] if self.saved else None
        self.saved.append(path)
        return path

    def save_state(self) -> Path:
        """The resumable state, atomically, to <run>/state/state.pt (several ranks: rank 0 writes it, with every
        rank's RNGs). Like save_lora, it never stores an unchecked update."""
        self._verify_last_update()
        if not self.dist.enabled:
            return save_trainer_state(self.built, self.loop, self.store)
        rank_rngs = self.dist.gather_objects(rng_state())
        if self.dist.is_main:
            return save_trainer_state(self.built, self.loop, self.store, rank_rngs)
        return self.store.state_dir / STATE_FILE

    def _finish(self, error: str | None = None) -> None:
        """Save the final LoRA and state, record the outcome."""
        self._closed = True
        loop = self.loop
        late = self._late.flush()  # the last step's device-side signals: one read, after the loop
        if late is not None:
            self._log_record(*late)
        self.lora_path = self.save_lora(self.cfg.output)
        self.save_state()
        status = "finished" if self.stop_reason == "finished" else "stopped"
        self.store.event(loop.step, "stop", {"reason": self.stop_reason, "error": error,
                                             "message": self.stop_message})
        self.store.set_meta(status=status, stop_reason=self.stop_reason, lora_path=self.lora_path,
                            finished_at=time.time(), steps_done=loop.step, skipped_steps=loop.skipped,
                            rolled_back=loop.rolled_back, message=self.stop_message, summary=self._summary())
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        log.info("%s at step %d: %s", status, loop.step, self.lora_path)

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        if self.store is not None:
            self.store.event(self.loop.step, "error", {"error": repr(exc)})
            self.store.set_meta(status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=time.time(),
                                steps_done=self.loop.step)

    def _summary(self) -> dict:
        if not self.dist.is_main:
            return {}  # the run store (what the summary reads) is rank 0's
        device = self.built.device if self.built is not None else torch.device("cpu")
        out = telemetry.summary(self.run_dir, self.loop.step, self.loop.skipped, device, optimizer=self.cfg.optimizer)
        if self.vram_estimate is not None:
            out["vram_estimate_mb"] = round(self.vram_estimate["total"] / 2**20, 1)
        return out

    def result(self) -> TrainResult:
        return TrainResult(self.lora_path, str(self.run_dir), self.loop.step, self.stop_reason, self.loop.skipped,
                           list(self.saved), self._summary() if self.stop_reason else {}, self.stop_message,
                           self.loop.rolled_back)

    def close(self) -> None:
        """End the session: a run left between steps (run(until_step=...)) gets its resumable state saved.
        The model stays in memory for inspection until release()."""
        if not self._closed and self.store is not None and self.loop.step > 0 and self.built is not None:
            self.save_state()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.store is not None:
            if not self._closed:
                self.store.set_meta(status="stopped", stop_reason="closed", steps_done=self.loop.step,
                                    skipped_steps=self.loop.skipped)
            self.store.close()
            self.store = None
        self.dist.shutdown()  # leaves the process group (only one this Trainer joined itself)

    def release(self) -> None:
        """Drop the model, LoRA, optimizer and caches and return their memory (GPU included)."""
        import gc

        self.built = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
