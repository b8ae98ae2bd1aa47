"""Stop or crash at step k, resume: the final LoRA is bit-identical to an uninterrupted run (CPU)."""

import pytest
import torch
from _trainer_helpers import lora_tensors, tiny_config

from trainer.config import resume_config
from trainer.runstore import RunReader
from trainer.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


# Everything that draws random numbers or carries state across steps is switched on: LoRA dropout (global
# RNG), flips and caption shuffle/dropout (per-batch generators), noise offset, grad accumulation, several
# buckets and epochs (3 buckets, 6 images, batch 2 -> a new epoch every 3 batches).
RANDOM_EVERYWHERE = dict(steps=8, grad_accum=2, network_dropout=0.1, flip_aug=True, cache_text="off",
                         shuffle_caption=True, caption_dropout=0.2, noise_offset=0.05, min_snr_gamma=5.0)


def assert_same_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def losses(run_dir):
    return {r["step"]: r["loss"] for r in RunReader(run_dir).steps(since=0)}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,lr,base_dtype", [("EmoNavi", 1e-3, "auto"), ("EmoSens", 1.0, "auto"),
                                                     ("EmoNavi", 1e-3, "fp8")])  # fp8: the base re-quantized
def test_stop_at_k_and_resume_is_bit_identical(tmp_path, optimizer, lr, base_dtype):
    ref = train(tiny_config(tmp_path / "a", optimizer=optimizer, lr=lr, base_dtype=base_dtype, **RANDOM_EVERYWHERE))
    cfg = tiny_config(tmp_path / "b", optimizer=optimizer, lr=lr, base_dtype=base_dtype, **RANDOM_EVERYWHERE)

    def stop_at_3(info):
        if info["step"] == 3:
            raise KeyboardInterrupt  # Ctrl-C: saves the LoRA and the state, then propagates

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop_at_3)
    run_dir = RunReader.list_runs(tmp_path / "b" / "out")[0]["run_dir"]
    assert RunReader(run_dir).meta()["status"] == "stopped"
    resumed = train(resume_config(run_dir))
    assert resumed.steps_done == 8 and resumed.stop_reason == "finished"
    assert_same_lora(ref.lora_path, resumed.lora_path)
    assert losses(ref.run_dir) == losses(resumed.run_dir)  # every step's loss, before and after the stop


class CrashAt(Trainer):
    crash_step = 5

    def micro_batch_loss(self, batch, micro):
        if self.step == self.crash_step and micro == 1:
            raise RuntimeError("simulated kill in the middle of a step")
        return super().micro_batch_loss(batch, micro)


class CtrlCAt(Trainer):
    def micro_batch_loss(self, batch, micro):
        if self.step == 3 and micro == 1:  # after the first micro-batch moved the data position and RNGs
            raise KeyboardInterrupt
        return super().micro_batch_loss(batch, micro)


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_step_saves_a_state_that_resumes_exactly(tmp_path):
    ref = train(tiny_config(tmp_path / "a", **RANDOM_EVERYWHERE))
    t = CtrlCAt(tiny_config(tmp_path / "b", **RANDOM_EVERYWHERE))
    with pytest.raises(KeyboardInterrupt):
        try:
            t.setup()
            t.run()
        finally:
            t.close()
    assert RunReader(t.run_dir).meta()["status"] == "stopped" and RunReader(t.run_dir).last_step() == 3
    resumed = train(resume_config(t.run_dir))
    assert resumed.steps_done == 8
    assert_same_lora(ref.lora_path, resumed.lora_path)
    assert losses(ref.run_dir) == losses(resumed.run_dir)


@pytest.mark.slow
def test_crash_mid_step_resumes_from_the_last_saved_state(tmp_path):
    ref = train(tiny_config(tmp_path / "a", **RANDOM_EVERYWHERE))
    cfg = tiny_config(tmp_path / "b", save_state_every=2, **RANDOM_EVERYWHERE)
    t = CrashAt(cfg)
    with pytest.raises(RuntimeError, match="simulated kill"):
        try:
            t.setup()
            t.run()
        finally:
            t.close()
    reader = RunReader(t.run_dir)
    assert reader.meta()["status"] == "failed" and reader.last_step() == 5  # steps 5.. are redone
    resumed = train(resume_config(t.run_dir))
    assert resumed.steps_done == 8
    assert_same_lora(ref.lora_path, resumed.lora_path)
    assert losses(ref.run_dir) == losses(resumed.run_dir)
    assert any(e["kind"] == "resume" and e["step"] == 4 for e in reader.events())


@pytest.mark.slow
def test_resume_can_extend_a_finished_run_and_uses_the_disk_cache(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, cache_latents="disk", cache_text="disk")
    first = train(cfg)
    cached = sorted(p.name for p in (tmp_path / "out" / "cache").rglob("*.safetensors"))
    assert cached
    more = train(resume_config(first.run_dir, steps=5))
    assert more.steps_done == 5 and more.stop_reason == "finished"
    assert sorted(p.name for p in (tmp_path / "out" / "cache").rglob("*.safetensors")) == cached
    assert sorted(losses(more.run_dir)) == [1, 2, 3, 4, 5]


def test_state_files_of_the_earlier_layout_still_resume():
    """Before LoopState was saved whole, state.pt held the position at the top and the counters beside it."""
    from trainer.parts import LoopState
    from trainer.state import saved_loop

    loop = LoopState(step=7, epoch=1, batch_in_epoch=2, skipped=1, consecutive_skips=0, should_stop_prev=True)
    assert saved_loop({"loop": loop.to_dict()}) == loop
    legacy = {"step": 7, "epoch": 1, "batch_in_epoch": 2,
              "counters": {"skipped": 1, "consecutive_skips": 0, "should_stop_prev": True}}
    assert saved_loop(legacy) == loop  # counters added since (rollbacks, validation) take their defaults
