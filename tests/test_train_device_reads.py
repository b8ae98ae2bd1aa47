"""One device read per training step (issue 10.2): Trainer.train_step() transfers to the host once, optimizer and
telemetry included, for every optimizer. Counted on the CPU by wrapping the Tensor methods that read a tensor
on the host (a device sync on CUDA)."""

import dataclasses

import pytest
import torch
from _trainer_helpers import tiny_config

from trainer.optim import OPTIMIZER_INFO, OPTIMIZERS, create_optimizer
from trainer.optim.bench import syncs
from trainer.optim.bench.syncs import SyncCounter
from trainer.runstore import RunReader
from trainer.telemetry import LateSignals
from trainer.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["AdamW", *OPTIMIZERS]  # torch's AdamW and our 13
READS = ("cpu", "numpy")  # besides item/tolist/__bool__/__float__/__int__/__index__


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    import os

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t = Trainer(tiny_config(tmp_path_factory.mktemp("reads"), steps=1000, optimizer="AdamW"))
    t.setup()
    yield t
    t.close()


def use_optimizer(t: Trainer, name: str) -> None:
    """The same network and data with a fresh optimizer `name` (cheaper than a new setup per optimizer)."""
    from trainer.build import step_signature

    lr = OPTIMIZER_INFO[name].recommended_lr
    # torch's AdamW fused (as the GPU benchmark's reference): its default CPU path reads a host-side step
    # counter per tensor with .item(), which is no device read but would be counted here. Ours in foreach mode,
    # their CUDA default: the CPU default (per tensor) reads host factors once per step for EmoTion and RefAdamW,
    # which costs nothing where the tensors live on the host.
    opt = create_optimizer(name, t.params, lr=lr, **({"fused": True} if name == "AdamW" else {"foreach": True}))
    takes_loss, takes_max_steps = step_signature(opt)
    t.built = dataclasses.replace(t.built, optimizer=opt, base_lrs=[g["lr"] for g in opt.param_groups],
                                  takes_loss=takes_loss, takes_max_steps=takes_max_steps)
    t.cfg = t.cfg.replace(optimizer=name, lr=lr)
    t._guard, t._late = None, LateSignals()


@pytest.mark.parametrize("name", NAMES)
def test_train_step_reads_the_device_once(trainer, name, monkeypatch):
    use_optimizer(trainer, name)
    for _ in range(2):  # the first steps create the optimizer's state and the first late signals
        trainer._after_step(trainer.train_step())
    monkeypatch.setattr(syncs, "SYNC_METHODS", syncs.SYNC_METHODS + READS)
    counts = []
    for _ in range(2):
        with SyncCounter() as c:
            record = trainer.train_step()
        counts.append((c.count, dict(c.by_name)))
        trainer._after_step(record)
    assert all(n <= 1 for n, _ in counts), f"{name}: host reads per train_step: {counts}"
    assert not record["skipped"]


def test_device_signals_complete_the_previous_record(trainer):
    """AutoTrustGO keeps its signals on the device: they arrive with the next step's read, in that step's row."""
    use_optimizer(trainer, "AutoTrustGO")
    steps = []
    for _ in range(3):
        record = trainer.train_step()
        trainer._after_step(record)
        steps.append(trainer.step)
    assert "mask_ema" not in record  # this step's device signals are not read yet
    rows = {r["step"]: r for r in RunReader(trainer.run_dir).steps()}
    assert all(isinstance(rows[s].get("mask_ema"), float) for s in steps[:-1])


def test_rollback_copy_on_host_adds_no_read(trainer, monkeypatch):
    """rollback_on_host (the low-VRAM presets): the copy goes to host memory by non-blocking copies, still one
    read per step (on the CPU the host is the device: this checks the code path, not the overlap)."""
    use_optimizer(trainer, "EmoNavi")
    trainer.cfg = trainer.cfg.replace(rollback_on_host=True)
    trainer._guard = None
    try:
        for _ in range(2):
            trainer._after_step(trainer.train_step())
        assert trainer._guard.last_good.host
        monkeypatch.setattr(syncs, "SYNC_METHODS", syncs.SYNC_METHODS + READS)
        with SyncCounter() as c:
            record = trainer.train_step()
        trainer._after_step(record)
        assert c.count <= 1, dict(c.by_name)
    finally:  # the module's trainer goes back to the default copy for any test after this one
        trainer.cfg = trainer.cfg.replace(rollback_on_host=False)
        trainer._guard = None
