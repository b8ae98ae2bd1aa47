"""The explicit parts of a run, so a function's signature says what it touches.

- Runtime: where and in what precision the run computes.
- LoadedModel: the SDXL model with its prediction type and noise schedule.
- RunSetup: everything `build` makes once (model, network, data, optimizer...); fixed for the run. The run
  folder's store and control channel stay with the Trainer: they exist before the rest, to record a failure.
- LoopState: where the loop stands (step, data position, skip counters): exactly what state.pt holds besides
  the tensors and the RNGs.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16 or fp16

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # trainer.model.SDXLModel (unet, te1, te2, vae, tokenizers) or a benchmark stand-in
    prediction_type: str
    schedule: Any  # trainer.diffusion.NoiseSchedule


@dataclass(frozen=True)
class RunSetup:
    """What Trainer.setup() built. The objects inside change as they train; which objects they are does not."""

    runtime: Runtime
    loaded: LoadedModel
    items: list  # the scanned dataset items
    report: Any  # trainer.data.ScanReport
    network: Any  # trainer.model.LoRANetwork
    params: list  # the trainable LoRA tensors, in the network's order
    data: Any  # trainer.data.TrainingData
    eval_batch: Any  # the fixed evaluation batch, or None
    optimizer: torch.optim.Optimizer
    base_lrs: list  # each param group's LR before the schedule
    takes_loss: bool  # optimizer.step(loss=...)
    takes_max_steps: bool  # optimizer.step(max_steps=...) (RefAdamW)
    pulse: Any  # EmoPulseScheduler or None
    scaler: Any  # torch.amp.GradScaler (fp16) or None
    started_at: float  # the run's first start (kept across resumes)
    val_batches: tuple = ()  # the held-out validation images as fixed batches (empty: no validation)
    offload: Any = None  # trainer.offload.BlockOffloader streaming UNet blocks (cfg.offload), or None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def model(self):
        return self.loaded.model


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the next batch to draw: (epoch, batch_in_epoch)
    batch_in_epoch: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    rolled_back: int = 0  # updates undone because they made the LoRA non-finite (trainer/rollback.py)
    consecutive_bad: int = 0  # such updates in a row: the run stops as "diverged" at cfg.max_consecutive_bad_steps
    should_stop_prev: bool = False  # the optimizer's should_stop at the last step (events fire on changes)
    val_best: float | None = None  # the lowest validation loss so far
    val_stale: int = 0  # validations since val_best was set (val-plateau stops at val_patience)
    loss_buckets: list = field(default_factory=list)  # optimizer_loss=normalized: per-timestep-bucket loss EMAs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Hooks:
    """What the host (CLI, ComfyUI node, panel) hands a run. See Trainer."""

    stop_event: threading.Event = field(default_factory=threading.Event)
    on_step: Any = None
    on_setup: Any = None
    progress_bar: bool = False

    def setup_phase(self, phase: str, done: int, total: int) -> None:
        if self.on_setup is not None:
            self.on_setup(phase, done, total)
