"""The trainer never keeps or writes a non-finite LoRA: a bad update is rolled back, K in a row stop the run as
"diverged" with a message, and every save path refuses NaN/inf (trainer/rollback.py)."""

import math
from pathlib import Path

import pytest
import torch
from _trainer_helpers import lora_tensors, tiny_config

from trainer.runstore import RunReader
from trainer.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


class PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose update writes inf into the first LoRA tensor at the given optimizer calls (1-based)."""

    def __init__(self, params, poison, **kw):
        super().__init__(params, **kw)
        self.poison, self.calls = poison, 0

    def step(self, closure=None):
        out = super().step(closure)
        self.calls += 1
        if self.poison(self.calls):
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return out


def poisoned_trainer(poison):
    class T(Trainer):
        def build_optimizer(self, params):
            return PoisonedAdamW(params, poison, lr=self.cfg.lr)

    return T


def run(cls, cfg):
    t = cls(cfg)
    try:
        t.setup()
        return t, t.run()
    finally:
        t.close()


def all_finite(path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in lora_tensors(path).values())


@pytest.mark.parametrize("on_host", [False, True])
def test_one_bad_update_is_rolled_back_and_the_run_finishes(tmp_path, on_host):
    # The 3rd update is bad; a LoRA save falls on step 3, before any step read could see it: the save checks.
    # on_host: the rollback's copy in host memory (the low-VRAM presets; on the CPU the same memory, other code).
    cfg = tiny_config(tmp_path, optimizer="AdamW", lr=1e-3, steps=6, save_every=3, rollback_on_host=on_host)
    t, res = run(poisoned_trainer(lambda n: n == 3), cfg)
    assert res.stop_reason == "finished" and res.steps_done == 6
    assert res.rolled_back == 1 and res.message is None
    assert t._guard.last_good.host is on_host
    assert all(all_finite(p) for p in res.saved) and len(res.saved) == 2
    reader = RunReader(res.run_dir)
    rollbacks = reader.events(kind="rollback")
    assert [e["data"]["step"] for e in rollbacks] == [3]
    assert reader.meta()["rolled_back"] == 1
    rows = reader.steps()
    assert [r["step"] for r in rows if r.get("rolled_back")] == [3]  # step 3's record is marked afterwards
    norms = [r.get("lora_norm") for r in rows]
    assert len(norms) == 6 and all(isinstance(n, float) and math.isfinite(n) for n in norms)


def test_an_update_that_stays_bad_stops_the_run_as_diverged_with_the_last_finite_weights(tmp_path):
    # From the 2nd update on every update is bad: each is caught by the next step's read and rolled back.
    cfg = tiny_config(tmp_path / "bad", optimizer="AdamW", lr=1e-3, steps=20, max_consecutive_bad_steps=3)
    t, res = run(poisoned_trainer(lambda n: n >= 2), cfg)
    assert res.stop_reason == "diverged" and res.rolled_back == 3
    # Update 2 is bad, seen by step 3's read (step 3's gradients, taken at the bad weights, are dropped); the same
    # for updates 4 and 6; the third in a row stops the run at step 7.
    rows = RunReader(res.run_dir).steps()
    assert res.steps_done == 7 and [r["step"] for r in rows if r.get("rolled_back")] == [2, 4, 6]
    assert [r["step"] for r in rows if r.get("skipped")] == [3, 5, 7]
    assert "AdamW" in res.message and "lower learning rate" in res.message and "step" in res.message
    meta = RunReader(res.run_dir).meta()
    assert meta["stop_reason"] == "diverged" and meta["message"] == res.message
    assert [e["data"]["message"] for e in RunReader(res.run_dir).events(kind="diverged")] == [res.message]
    assert all_finite(res.lora_path)
    # "The last finite weights" are exactly those after the one good update: a 1-step run of the same setup.
    ref = train(tiny_config(tmp_path / "ref", optimizer="AdamW", lr=1e-3, steps=1))
    a, b = lora_tensors(res.lora_path), lora_tensors(ref.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_lora_refuses_non_finite_weights_and_keeps_the_last_file(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="AdamW", lr=1e-3, steps=1)
    t = Trainer(cfg)
    try:
        t.setup()
        res = t.run()
        before = Path(res.lora_path).read_bytes()
        with torch.no_grad():
            t.params[0].view(-1)[0] = math.nan  # behind the guard's back: only the writer's check remains
        kept = t.save_lora(cfg.output)
        assert kept == res.lora_path and Path(res.lora_path).read_bytes() == before
        refused = RunReader(res.run_dir).events(kind="save_refused")
        assert len(refused) == 1 and "not finite" in refused[0]["data"]["error"]
        new = tmp_path / "other.safetensors"
        assert t.save_lora(new) == res.lora_path and not new.exists()
    finally:
        t.close()


def test_the_writer_itself_refuses_nan(tmp_path):
    from trainer.model import save_lora
    from trainer.model.errors import NonFiniteLoRAError

    class Net:
        def kohya_state_dict(self, dtype):
            return {"lora_unet_x.lora_down.weight": torch.tensor([[1.0, float("inf")]], dtype=dtype),
                    "lora_unet_x.alpha": torch.tensor(1.0)}

    with pytest.raises(NonFiniteLoRAError, match="1 of 2 tensors are not finite"):
        save_lora(tmp_path / "x.safetensors", Net(), {})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("name", ["AdamW", *__import__("trainer.optim", fromlist=["OPTIMIZERS"]).OPTIMIZERS])
def test_rollback_returns_the_optimizer_exactly_to_before_the_update(name, on_host):
    """take, a (bad) step, restore, a good step == that good step alone: weights, tensor state and the host-side
    scalars (loss EMAs, counters, should_stop) all come back."""
    from trainer.optim import OPTIMIZER_INFO, create_optimizer
    from trainer.rollback import LastGoodState

    def make():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in ((4, 8), (8, 4), (16,))]
        opt = create_optimizer(name, params, lr=OPTIMIZER_INFO[name].recommended_lr)
        return params, opt

    def step(params, opt, seed, loss):
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step(**({} if name == "AdamW" else {"loss": loss}))

    (pa, a), (pb, b) = make(), make()
    for k in range(3):  # some history first: state exists and the EMAs have moved
        step(pa, a, k, 0.2 - 0.01 * k)
        step(pb, b, k, 0.2 - 0.01 * k)
    guard = LastGoodState(pa, a, on_host=on_host)
    guard.take()
    step(pa, a, 99, 5.0)  # the update to undo (a loss spike moves the emotion too)
    guard.restore()
    step(pa, a, 3, 0.17)
    step(pb, b, 3, 0.17)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    assert same(sa["state"], sb["state"])
    assert same(sa.get("emo"), sb.get("emo"))


def same(x, y) -> bool:
    """Bitwise equality through dicts, lists and tensors."""
    if torch.is_tensor(x) or torch.is_tensor(y):
        return torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y
