"""What the optimizer feels and whether the LoRA moves: optimizer_loss raw/normalized/withheld, the update/weight
ratio and its warning, the loss CV and the optimizer's zones in the run summary."""

import math

import pytest
import torch
from _trainer_helpers import lora_tensors, spy_optimizer_class, tiny_config, trained_then_resumed

from trainer import telemetry
from trainer.config import ConfigError, TrainConfig
from trainer.optimizer_loss import BUCKETS, normalized_loss
from trainer.runstore import RunReader
from trainer.train import Trainer, train
from trainer.zones import zone, zone_shares

pytestmark = pytest.mark.usefixtures("one_thread")


def steps_of(run_dir):
    return [r for r in RunReader(run_dir).steps() if "loss" in r]


# ---- pure parts ----------------------------------------------------------------------------------------------
def test_normalized_loss_divides_by_the_running_mean_at_those_timesteps():
    emas = []
    # first sight of a bucket: its EMA starts at the sample's loss, so the first step feels ~1
    assert normalized_loss(emas, 0.3, [0.1, 0.5], [50, 950], 0, 1000) == pytest.approx(1.0)
    assert len(emas) == BUCKETS and emas[0] == pytest.approx(0.1) and emas[9] == pytest.approx(0.5)
    # a high-noise draw whose loss is as usual for its timestep feels ~1, however large the raw loss
    assert normalized_loss(emas, 0.5, [0.5], [990], 0, 1000) == pytest.approx(1.0)
    # the same timestep at half the usual loss: progress, 0.5
    assert normalized_loss(emas, 0.05, [0.05], [10], 0, 1000) == pytest.approx(0.5)
    assert emas[0] == pytest.approx(0.9 * 0.1 + 0.1 * 0.05)
    config = TrainConfig(optimizer_loss="cooked")
    with pytest.raises(ConfigError, match="optimizer_loss must be one of raw, normalized, withheld"):
        config.validate(require_paths=False)


def test_zones_follow_each_line_of_the_family():
    assert [zone("EmoNavi", s) for s in (0.1, -0.3, 0.6, 0.8)] == ["neutral", "accel", "neutral", "brake"]
    assert [zone("EmoClan", s) for s in (0.2, 0.5, -0.7)] == ["navi", "fact", "lynx"]
    assert [zone("EmoZeal", s) for s in (0.05, 0.3, 0.7)] == ["plain", "softsign", "cautious"]
    assert [zone("EmoNeco", s) for s in (0.1, 0.3)] == ["cautious", "softsign"]
    assert [zone("EmoSens", s) for s in (0.0, 0.2, -0.2, 0.7)] == ["grow", "grow", "hold", "reset"]
    assert zone("AdamW", 0.3) is None
    recs = [{"emo_scalar": 0.3}, {"emo_scalar": 0.1}, {"emo_scalar": 0.1}, {"emo_scalar": 0.9, "skipped": True}, {}]
    assert zone_shares("EmoNavi", recs) == {"accel": pytest.approx(1 / 3), "neutral": pytest.approx(2 / 3)}
    assert zone_shares("AdamW", recs) == {}
    ref = [{"ref_alpha": 0.0}, {"ref_alpha": 0.5}, {"ref_alpha": 0.5}, {"ref_alpha": 1.0}]
    assert zone_shares("RefAdamWminiScheduleFree", ref) == {"inject": 0.5, "inject-jump": 0.25, "neutral": 0.25}
    assert zone_shares("AutoTrustGO", ref) == {}


def test_motion_check_warns_once_at_the_end_of_the_window():
    cfg = TrainConfig(optimizer="AutoTrustGO", lr=1e-4, steps=1000)
    check = telemetry.MotionCheck()
    assert check.window(100) == 20 and check.window(1000) == 50
    for step in range(1, 50):
        check.add(step, 1e-7)
        assert check.message(cfg) is None
    check.add(50, 1e-7)
    msg = check.message(cfg)
    assert msg.startswith("AutoTrustGO at lr 0.0001 has barely changed the LoRA in 50 steps") and "higher LR" in msg
    check.add(51, 1e-7)
    assert check.message(cfg) is None  # once
    moving = telemetry.MotionCheck()
    for step in range(1, 51):
        moving.add(step, 10 * telemetry.BARELY_MOVING)
    assert moving.message(cfg) is None and moving.done


# ---- on the tiny SDXL -------------------------------------------------------------------------------------------
def test_update_ratio_is_the_size_of_each_update_relative_to_the_lora(tmp_path):
    snapshots = {}

    class Watch(Trainer):
        def _after_step(self, record):
            snapshots[self.step] = [p.detach().clone() for p in self.params]
            super()._after_step(record)

    cfg = tiny_config(tmp_path, steps=5, optimizer="AdamW", lr=1e-3)
    trainer = Watch(cfg)
    trainer.setup()
    snapshots[0] = [p.detach().clone() for p in trainer.params]
    result = trainer.run()
    trainer.close()
    rows = {r["step"]: r for r in steps_of(result.run_dir)}
    for n in range(1, 5):  # the last update's size is not read (no next step)
        before, after = snapshots[n - 1], snapshots[n]
        expect = (torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(after, before)]))
                  / torch.linalg.vector_norm(torch.cat([b.flatten() for b in before])))
        assert rows[n]["update_ratio"] == pytest.approx(float(expect), rel=1e-4), n
    assert result.summary["update_ratio"] == pytest.approx(sum(rows[n]["update_ratio"] for n in range(1, 5)) / 4)


@pytest.mark.slow
def test_a_lora_that_barely_moves_is_warned_about_once(tmp_path, caplog):
    caplog.set_level("WARNING", logger="emolora")
    slow = train(tiny_config(tmp_path / "a", steps=21, optimizer="AutoTrustGO", lr=1e-4))
    events = RunReader(slow.run_dir).events(kind="barely_moving")
    assert len(events) == 1 and events[0]["step"] == 21
    assert events[0]["data"]["message"].startswith("AutoTrustGO at lr 0.0001 has barely changed the LoRA in 20 steps")
    assert sum("barely changed the LoRA" in r.message for r in caplog.records) == 1
    moving = train(tiny_config(tmp_path / "b", steps=21, optimizer="AdamW", lr=1e-4))
    assert RunReader(moving.run_dir).events(kind="barely_moving") == []


def test_withheld_calls_step_without_the_loss_and_normalized_hands_it_over(tmp_path):
    spy = spy_optimizer_class()

    class Spy(Trainer):
        def build_optimizer(self, params):
            return spy(params, lr=self.cfg.lr)

    def losses(mode):
        t = Spy(tiny_config(tmp_path / mode, steps=4, optimizer_loss=mode))
        t.setup()
        result = t.run()
        t.close()
        return t.optimizer.losses, steps_of(result.run_dir), result

    withheld, _, _ = losses("withheld")
    assert withheld == [None] * 4
    raw, raw_rows, _ = losses("raw")
    assert raw == [r["loss"] for r in raw_rows] and "optimizer_loss" not in raw_rows[0]
    fed, rows, result = losses("normalized")
    assert fed == [r["optimizer_loss"] for r in rows] and fed[0] != rows[0]["loss"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in raw_rows]  # the training itself is the same
    cv = result.summary["optimizer_loss_cv"]
    mean = sum(fed) / 4
    assert cv == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in fed) / 3) / mean)


@pytest.mark.slow
def test_normalized_optimizer_loss_resumes_bit_identically(tmp_path):
    opts = dict(steps=8, optimizer="EmoSens", lr=1.0, optimizer_loss="normalized", grad_accum=2)
    ref, resumed = trained_then_resumed(tmp_path, 3, **opts)
    a, b = lora_tensors(ref.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fed = [(r["step"], r["optimizer_loss"], r["ema_long"]) for r in steps_of(ref.run_dir)]
    assert fed == [(r["step"], r["optimizer_loss"], r["ema_long"]) for r in steps_of(resumed.run_dir)]
    assert len({round(f[1], 9) for f in fed}) > 1  # it is not a constant


@pytest.mark.slow
def test_normalized_loss_varies_less_than_raw_on_the_pretrained_tiny_base(tmp_path):
    """On a base whose loss swings with the timestep as a trained model's does, the normalized loss the
    optimizer gets has a lower per-step CV than the raw loss of the same steps."""
    from conftest import require_module

    pretrained = require_module("trainer.model.pretrained", "the pretrained tiny base (branch surfaces)")
    cfg = tiny_config(tmp_path, steps=60, optimizer="EmoNavi", lr=1e-4, optimizer_loss="normalized")
    result = train(cfg.replace(model=pretrained.pretrained_tiny_model_path()))
    s = result.summary
    assert s["loss_cv"] > 0.3  # the base's loss does swing with the timestep
    assert s["optimizer_loss_cv"] < 0.75 * s["loss_cv"], s
