"""The training loop on the real tiny SDXL checkpoint: loss delivery, skipped steps, stops, saves, telemetry."""

import math
import threading
import time

import pytest
import torch
from _trainer_helpers import lora_tensors, spy_optimizer_class, tiny_config
from safetensors import safe_open

from trainer.runstore import RunController, RunReader
from trainer.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


class SpyTrainer(Trainer):
    """Records every micro-batch loss and gives the run a spy optimizer; optionally poisons one step."""

    nan_at_step = None  # 0-based optimizer step whose first micro-batch loss becomes NaN
    stop_at = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.micro_losses = []  # (step, micro, value)

    def build_optimizer(self, params):
        opt = spy_optimizer_class()(params, lr=self.cfg.lr)
        opt.stop_at = self.stop_at
        return opt

    def micro_batch_loss(self, batch, micro):
        loss = super().micro_batch_loss(batch, micro)
        if self.step == self.nan_at_step and micro == 0:
            loss = loss * float("nan")
        self.micro_losses.append((self.step, micro, loss.item()))
        return loss


def run(trainer):
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()


def step_means(micro_losses, accum):
    """The per-step mean of the micro-batch losses, accumulated in float32 as the trainer does."""
    out = {}
    for step, _, value in micro_losses:
        out.setdefault(step, []).append(value)
    return [float(torch.tensor(v, dtype=torch.float32).sum() / accum) for _, v in sorted(out.items())]


def test_optimizer_gets_the_mean_of_the_micro_batch_losses(tmp_path):
    t = SpyTrainer(tiny_config(tmp_path, steps=3, grad_accum=3, batch_size=1))
    run(t)
    got = t.optimizer.losses
    assert len(got) == 3 and all(isinstance(v, float) for v in got)
    assert got == pytest.approx(step_means(t.micro_losses, 3), rel=1e-6, abs=0)
    # and it is what the telemetry calls "loss"
    rows = RunReader(t.run_dir).steps(since=0)
    assert [r["loss"] for r in rows] == got


def test_under_a_grad_scaler_the_optimizer_still_gets_the_unscaled_mean(tmp_path):
    t = SpyTrainer(tiny_config(tmp_path, steps=2, grad_accum=2, batch_size=1, mixed_precision="fp16"))
    run(t)
    assert t.scaler is not None and t.scaler.get_scale() >= 2.0**10  # a large scale was in play
    got = t.optimizer.losses
    assert got == pytest.approx(step_means(t.micro_losses, 2), rel=1e-6)
    assert all(0.05 < v < 10 for v in got)  # not multiplied by the scale, not divided by grad_accum


def test_nan_step_is_skipped_counted_and_not_fed(tmp_path):
    t = SpyTrainer(tiny_config(tmp_path, steps=5, grad_accum=2))
    t.nan_at_step = 2
    result = run(t)
    assert result.skipped_steps == 1 and result.steps_done == 5
    assert len(t.optimizer.losses) == 4 and all(math.isfinite(v) for v in t.optimizer.losses)
    rows = {r["step"]: r for r in RunReader(t.run_dir).steps(since=0)}
    assert rows[3]["skipped"] is True and rows[3]["loss"] is None and rows[3]["skipped_total"] == 1
    assert rows[4]["skipped"] is False
    assert all(torch.isfinite(v).all() for v in lora_tensors(result.lora_path).values())
    assert RunReader(t.run_dir).meta()["skipped_steps"] == 1


def test_external_stop_saves_the_lora_and_ends_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, steps=50)
    stop = threading.Event()

    def on_step(info):
        if info["step"] == 2:
            stop.set()  # as a node does from another thread

    result = train(cfg, stop_event=stop, on_step=on_step)
    assert result.stop_reason == "stopped" and result.steps_done == 2
    assert result.lora_path == cfg.output and lora_tensors(cfg.output)
    reader = RunReader(result.run_dir)
    assert reader.meta()["status"] == "stopped"
    assert (tmp_path / "out" / "runs").is_dir() and any(e["kind"] == "stop" for e in reader.events())


def test_panel_controls_stop_save_now_and_auto_stop_through_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path, steps=40, save_every=3)
    seen = {}

    def on_step(info):
        ctl = RunController(info["run_dir"])
        if info["step"] == 1:
            ctl.request_save()
        if info["step"] == 4:
            ctl.request_stop()
        seen[info["step"]] = info

    result = train(cfg, on_step=on_step)
    assert result.stop_reason == "stopped" and result.steps_done == 4
    out = tmp_path / "out"
    assert (out / "lora-step000001.safetensors").is_file()  # save_now
    assert (out / "lora-step000003.safetensors").is_file()  # save_every
    assert (out / "lora.safetensors").is_file()
    assert result.saved == [str(out / n) for n in
                            ("lora-step000001.safetensors", "lora-step000003.safetensors", "lora.safetensors")]


@pytest.mark.parametrize("mode", ["stop", "mark"])
def test_should_stop_stops_or_only_marks(tmp_path, mode):
    SpyTrainer.stop_at = 3
    try:
        t = SpyTrainer(tiny_config(tmp_path, steps=6, auto_stop=mode))
        result = run(t)
    finally:
        SpyTrainer.stop_at = None
    events = [e for e in RunReader(t.run_dir).events() if e["kind"] == "should_stop"]
    assert events[0]["step"] == 3 and events[0]["data"]["value"] is True
    if mode == "stop":
        assert result.stop_reason == "should_stop" and result.steps_done == 3
    else:
        assert result.stop_reason == "finished" and result.steps_done == 6
    assert lora_tensors(result.lora_path)
    assert result.summary["should_stop_step"] == 3
    with safe_open(result.lora_path, "pt") as f:
        assert f.metadata()["emolora_should_stop_step"] == "3"


def test_run_store_is_readable_from_another_thread_while_training(tmp_path):
    cfg = tiny_config(tmp_path, steps=12, run_name="live")
    run_dir = tmp_path / "out" / "runs" / "live"
    observed, done = [], threading.Event()

    def watch():
        reader = RunReader(run_dir)
        last = 0
        while not done.is_set():
            for rec in reader.steps(since=last):
                observed.append((rec["step"], reader.meta().get("status")))
                last = rec["step"]
            time.sleep(0.005)
        reader.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = train(cfg, on_step=lambda info: time.sleep(0.02))
    finally:
        done.set()
        watcher.join(10)
    assert result.steps_done == 12
    running = [s for s, status in observed if status == "running"]
    assert len(running) >= 3 and running == sorted(running)  # read while the trainer was still writing
    rec = RunReader(run_dir).steps(since=11)[0]
    for key in ("loss", "lr", "grad_norm", "steps_per_s", "step_time", "emo_scalar", "trust", "should_stop"):
        assert key in rec, key


@pytest.mark.parametrize("change", [
    {"prediction_type": "v_prediction", "min_snr_gamma": 5.0},
    {"loss_type": "huber", "noise_offset": 0.05, "timestep_min": 200, "timestep_max": 800},
    {"loss_type": "l1", "mixed_precision": "bf16", "gradient_checkpointing": True},
    {"lr_scheduler": "cosine", "warmup_steps": 2, "optimizer": "AdamW", "lr": 1e-3},
    {"optimizer": "AutoTrustGO", "lr": 1e-3, "optimizer_args": {"trust_level": 0.5}},
    {"optimizer": "EmoSens", "lr": 1.0, "cache_latents": "off", "random_crop": True, "flip_aug": True},
    {"optimizer": "AdamW", "lr": 1e-4, "lr_scheduler": "emopulse"},
])
def test_training_variants_run_and_learn_something(tmp_path, change):
    result = train(tiny_config(tmp_path, steps=3, **change))
    assert result.stop_reason == "finished" and result.skipped_steps == 0
    rows = RunReader(result.run_dir).steps(since=0)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    ups = [v for k, v in lora_tensors(result.lora_path).items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # lora_up starts at zero: it moved
    if change.get("lr_scheduler") == "cosine":
        assert [r["lr"] for r in rows][0] < [r["lr"] for r in rows][1]  # warmup, then the schedule
    if change.get("lr_scheduler") == "emopulse":
        # The logged lr is the one the scheduler set after the step (used by the next one): emoPulse, not 1e-4.
        pulses = [r["pulse_emo_pulse"] for r in rows]
        assert [r["lr"] for r in rows] == pulses
        assert all(0 < p <= 3e-3 for p in pulses) and len(set(pulses)) == len(pulses)  # it moves every step


def test_sample_images_during_training(tmp_path):
    result = train(tiny_config(tmp_path, steps=2, sample_every=2, sample_prompts=["a red blob", "a cat"],
                               sample_steps=2))
    samples = sorted((tmp_path / "out" / "runs").rglob("samples/*.png"))
    assert [p.name for p in samples] == ["step-000002-0.png", "step-000002-1.png"]
    assert any(e["kind"] == "sample" for e in RunReader(result.run_dir).events())


def test_empty_dataset_fails_before_the_model_loads(tmp_path, monkeypatch):
    import trainer.model

    cfg = tiny_config(tmp_path)
    for f in (tmp_path / "data").iterdir():
        f.unlink()

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(trainer.model, "load_sdxl", boom)
    from trainer.data import DatasetError

    with pytest.raises(DatasetError, match="no usable image"):
        train(cfg)


def test_run_in_slices_equals_one_run_and_close_keeps_a_resumable_state(tmp_path):
    whole = train(tiny_config(tmp_path / "a", steps=4))
    t = Trainer(tiny_config(tmp_path / "b", steps=4))
    t.setup()
    assert t.run(until_step=2).stop_reason is None and t.step == 2  # a node that trains 2 steps per execution
    result = t.run(until_step=4)
    t.close()
    assert result.stop_reason == "finished"
    a, b = lora_tensors(whole.lora_path), lora_tensors(result.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    t = Trainer(tiny_config(tmp_path / "c", steps=4))
    t.setup()
    t.run(until_step=1)
    t.close()  # not finished: the state is saved so the run can be resumed
    assert (t.run_dir / "state" / "state.pt").is_file()
    assert RunReader(t.run_dir).meta()["stop_reason"] == "closed"


def test_text_encoder_lora_trains_with_its_own_lr(tmp_path):
    result = train(tiny_config(tmp_path, steps=2, train_text_encoder=True, cache_text="off", text_encoder_lr=5e-4))
    tensors = lora_tensors(result.lora_path)
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    assert te_up and any(v.abs().sum() > 0 for v in te_up)
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)


def test_evaluation_and_samples_turn_lora_dropout_off_in_the_text_encoders_too(tmp_path, monkeypatch):
    """LoRA dropout is off while evaluating and sampling (text-encoder LoRA included), then back on."""
    import trainer.samples as samples

    t = Trainer(tiny_config(tmp_path, steps=1, train_text_encoder=True, network_dropout=0.5, cache_text="off",
                            eval_every=1, sample_prompts=["a cat"]))
    t.setup()
    try:
        with torch.no_grad():  # non-zero up weights, so dropout would change the output
            for m in t.network.loras.values():
                m.lora_up.weight.normal_(std=0.5)
        te_loras = [m for n, m in t.network.loras.items() if n.startswith("lora_te")]
        assert te_loras and all(m.training for m in te_loras)
        assert t.evaluate() == t.evaluate()
        seen = []
        monkeypatch.setattr(samples, "generate_samples",
                            lambda *a, **k: seen.append([m.training for m in t.network.loras.values()]) or [])
        t.sample()
        assert seen == [[False] * len(t.network.loras)]
        assert all(m.training for m in t.network.loras.values()) and t.model.unet.training
    finally:
        t.close()


def test_on_setup_reports_the_phases_and_can_cancel_before_the_first_step(tmp_path):
    phases = []
    train(tiny_config(tmp_path / "a", steps=1, cache_latents="memory"), on_setup=lambda *a: phases.append(a))
    assert phases[:2] == [("model", 0, 1), ("model", 1, 1)] and ("latents", 6, 6) in phases

    class Cancel(Exception):
        pass

    def cancel(phase, done, total):
        if phase == "latents":
            raise Cancel
    steps = []
    with pytest.raises(Cancel):
        train(tiny_config(tmp_path / "b", steps=3, cache_latents="memory"), on_setup=cancel,
              on_step=lambda info: steps.append(info["step"]))
    assert steps == [] and not (tmp_path / "b" / "out" / "lora.safetensors").exists()


@pytest.mark.parametrize("ztsnr", [False, True])
def test_sampler_follows_the_training_schedule(ztsnr):
    """Previews of a zero-terminal-SNR v-prediction model start at t=999 on the same rescaled betas that training
    used; a standard model keeps SDXL's "leading" spacing."""
    from trainer.diffusion import NoiseSchedule
    from trainer.samples import sample_scheduler

    sched = sample_scheduler("v_prediction" if ztsnr else "epsilon", ztsnr)
    train_table = NoiseSchedule(zero_terminal_snr=ztsnr).alphas_cumprod
    torch.testing.assert_close(sched.alphas_cumprod[:-1], train_table[:-1], rtol=1e-5, atol=1e-7)
    sched.set_timesteps(4)
    assert int(sched.timesteps[0]) == (999 if ztsnr else 751)
    assert (float(train_table[-1]) == 0.0) is ztsnr
