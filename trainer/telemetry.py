"""What a run reports about itself: each step's record, memory, the progress bar, TensorBoard, the summary.

The run store is the record of truth; the progress bar and TensorBoard are optional views of the same numbers.
"""

import logging
import math
import os
import sys

import torch

from .distributed import world_size
from .parts import LoopState, RunSetup
from .runstore import RunReader
from .zones import zone_shares

log = logging.getLogger("emolora.train")

SUMMARY_SIGNALS = ("emo_scalar", "emo_pulse", "trust", "effective_lr", "lr")


def memory(device: torch.device) -> dict:
    """Allocated/peak/reserved accelerator memory, or the process's RSS on the CPU ({} where unreadable)."""
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


def step_record(cfg, run: RunSetup, loop: LoopState, step_times, *, loss: float, grad_norm: float, scale: list,
                finite: bool) -> dict:
    """The telemetry record of the step just taken (loop.step already counts it; step_times ends with its
    duration). Speed is over the recent steps. The optimizer's own signals are read only after a real step: a
    skipped one left them stale."""
    opt = run.optimizer
    sps = len(step_times) / sum(step_times)
    record = {"loss": loss, "lr": float(opt.param_groups[0]["lr"]), "grad_norm": grad_norm,
              "skipped": not finite, "skipped_total": loop.skipped, "epoch": loop.epoch,
              "step_time": step_times[-1], "steps_per_s": sps,
              "samples_per_s": sps * cfg.batch_size * cfg.grad_accum * world_size(),  # the global batch
              "eta_s": (cfg.steps - loop.step) / sps,
              **memory(run.device)}
    if scale:
        record["grad_scale"] = scale[0]
    if finite:
        for k, v in dict(getattr(opt, "telemetry", None) or {}).items():
            record.setdefault(k, v)
        if run.pulse is not None:
            for k, v in dict(getattr(run.pulse, "telemetry", None) or {}).items():
                record[f"pulse_{k}"] = v
    return record


# "Is it training at all?": the mean update/weight ratio (|LoRA update| / |LoRA| per step) over the first 5% of
# the steps (at least 20) below which a run is said to have barely moved its LoRA: about 1/100 of what AdamW
# at 1e-4 moves it. Measured on the tiny SDXL (benchmarks/update_ratio.py, docs/sweep.md), first 20 steps: AdamW
# at 1e-4 1.1e-3 a step, the Emo optimizers at their presets 7.5e-4 .. 3.4e-3, AutoTrustGO at its preset 1e-4
# 3.5e-6.
BARELY_MOVING = 1e-5


class MotionCheck:
    """The update ratios of the first window and the one warning they may raise."""

    def __init__(self):
        self.ratios: list = []
        self.mean: float | None = None
        self.done = False
        self.prev_norm: float | None = None  # the LoRA's norm at the previous read (the ratio's base)

    def observe(self, step: int, lora_norm: float, update_norm: float, *, updated: bool, params_ok: bool):
        """A step read: -> the previous update's ratio (its size over the LoRA's norm before it), or None when
        there was no update to measure or it was rolled back."""
        ratio = None
        if params_ok and updated and self.prev_norm:
            ratio = update_norm / self.prev_norm
            self.add(step, ratio)
        if params_ok and math.isfinite(lora_norm):
            self.prev_norm = lora_norm
        return ratio

    @staticmethod
    def window(steps: int) -> int:
        return max(20, math.ceil(0.05 * steps))

    def add(self, step: int, ratio: float) -> None:
        """The ratio of step `step`'s update (known at the next step's read)."""
        if not self.done and math.isfinite(ratio):
            self.ratios.append((step, ratio))

    def message(self, cfg) -> str | None:
        """Once the window's last update is measured: the warning, if the LoRA barely moved; else None. A run
        resumed past the window does not check again."""
        if self.done or not self.ratios or self.ratios[-1][0] < self.window(cfg.steps):
            return None
        self.done = True
        if self.ratios[-1][0] != self.window(cfg.steps):
            return None
        self.mean = sum(r for _, r in self.ratios) / len(self.ratios)
        if self.mean >= BARELY_MOVING:
            return None
        return (f"{cfg.optimizer} at lr {cfg.lr:g} has barely changed the LoRA in {self.ratios[-1][0]} steps "
                f"(mean update/weight ratio {self.mean:.2g} a step, under {BARELY_MOVING:g}); try a higher LR")


def take_device_signals(optimizer):
    """(names, 0-dim-stacked device tensor) of the signals the optimizer left on the device at its last step,
    taken from it unread (its `telemetry` then holds the host-side ones only), or None."""
    take = getattr(optimizer, "take_pending_signals", None)  # trainer.optim's EmoOptimizer; torch's have none
    return take() if take is not None else None


class LateSignals:
    """Device-side optimizer signals of step n, read with step n+1's single host transfer: the record of step n
    is completed (and logged again) one step late. That read can also mark step n's update as rolled back.
    flush() reads what is still open (at the end of a run)."""

    def __init__(self):
        self.open = None  # (step, record, names, device tensor or None)

    def hold(self, step: int, record: dict, pending) -> None:
        names, values = pending if pending is not None else ([], None)
        self.open = (step, record, list(names), values)

    def tensor(self):
        return self.open[3] if self.open is not None else None

    def complete(self, values: list, **extra):
        """-> (step, the completed record, the keys added) when the read added anything to the open record,
        else None."""
        if self.open is None:
            return None
        step, record, names, _ = self.open
        self.open = None
        if not names and not extra:
            return None
        record.update(zip(names, values), **extra)
        return step, record, names + list(extra)

    def flush(self, **extra):
        """complete() with the open signals read now (one transfer, outside the step)."""
        t = self.tensor()
        return self.complete(t.tolist() if t is not None else [], **extra)


def progress_bar(**kw):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


def update_bar(bar, record: dict) -> None:
    bar.update(1)
    post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.3g}"}
    if "emo_scalar" in record:
        post["emo"] = f"{record['emo_scalar']:+.3f}"
    bar.set_postfix(post, refresh=False)


def open_tensorboard(run_dir):
    """A SummaryWriter under <run>/tensorboard, or None (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard=True but tensorboard is not installed; the run store still has everything")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_tensorboard(writer, step: int, record: dict) -> None:
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(k, v, step)


def summary(run_dir, steps: int, skipped: int, device: torch.device, optimizer: str | None = None) -> dict:
    """The run at a glance, from its logged steps: loss start/end/min, eval loss, signal ranges, the first
    should_stop step, speed, memory; the step loss's coefficient of variation (raw and as the optimizer got
    it), the mean update/weight ratio and the share of steps in each of the optimizer's zones."""
    reader = RunReader(run_dir)
    try:
        rows = reader.steps()
        rises = [e["step"] for e in reader.events(kind="should_stop") if (e.get("data") or {}).get("value")]
    finally:
        reader.close()
    losses = [r["loss"] for r in rows if r.get("loss") is not None and not r.get("skipped")]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    k = max(1, min(10, len(losses) // 5))
    out = {"steps": steps, "skipped_steps": skipped}
    if losses:
        out.update(loss_start=sum(losses[:k]) / k, loss_end=sum(losses[-k:]) / k, loss_min=min(losses))
    if evals:
        out.update(eval_loss_start=evals[0], eval_loss_end=evals[-1])
    vals = [(r["val_loss"], r["step"]) for r in rows if r.get("val_loss") is not None]
    if vals:
        best = min(vals)
        out.update(val_loss_start=vals[0][0], val_loss_end=vals[-1][0], val_loss_min=best[0], val_loss_min_step=best[1])
    for name in SUMMARY_SIGNALS:
        vals = [r[name] for r in rows if isinstance(r.get(name), (int, float)) and not isinstance(r[name], bool)]
        if vals:
            out[f"{name}_min"], out[f"{name}_max"] = min(vals), max(vals)
    if rises:
        out["should_stop_step"] = rises[0]  # the first step at which the optimizer raised should_stop
    times = [r["step_time"] for r in rows if r.get("step_time")]
    if times:
        out["steps_per_s"] = len(times) / sum(times)
    out.update(loss_stats(rows, optimizer))
    mem = memory(device)
    out["peak_mem_mb"] = mem.get("mem_peak_mb", mem.get("rss_peak_mb"))
    return out


def coefficient_of_variation(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / abs(mean) if mean else None


def loss_stats(rows, optimizer: str | None) -> dict:
    """loss_cv (raw step loss), optimizer_loss_cv (the loss the optimizer got: the normalized one where it was
    normalized), update_ratio (mean over the steps that have one) and zones ({zone: share of steps})."""
    steps = [r for r in rows if r.get("loss") is not None and not r.get("skipped")]
    out = {"loss_cv": coefficient_of_variation([r["loss"] for r in steps])}
    fed = [r.get("optimizer_loss", r["loss"]) for r in steps]
    out["optimizer_loss_cv"] = coefficient_of_variation(fed)
    ratios = [r["update_ratio"] for r in rows if isinstance(r.get("update_ratio"), (int, float))]
    out["update_ratio"] = sum(ratios) / len(ratios) if ratios else None
    out["zones"] = zone_shares(optimizer, steps) if optimizer else {}
    return out


def validation_line(summary: dict) -> str:
    """The validation loss in words (empty without validation images)."""
    if summary.get("val_loss_min") is None:
        return ""
    text = (f"validation loss {summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f}, lowest "
            f"{summary['val_loss_min']:.4f} at step {summary['val_loss_min_step']}")
    if summary.get("should_stop_step") is not None:
        text += f"; should_stop rose at step {summary['should_stop_step']}"
    return text
