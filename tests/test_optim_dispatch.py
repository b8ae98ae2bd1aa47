"""Foreach steps launch a number of kernels that does not grow with the number of tensors, and read nothing back.

Counts are aten ops seen by a TorchDispatchMode over kohya's SDXL UNet LoRA shapes (722 modules, 1,444 tensors)
and over its first half; they depend on the shapes and their number, not on sizes, so rank 1 stands in for 16.
"""

import pytest
import torch

from trainer.optim import OPTIMIZERS
from trainer.optim.bench import SyncCounter
from trainer.optim.bench import dispatch as dp

NAMES = sorted(OPTIMIZERS)
SHADOW = sorted(set(NAMES) - {"RefAdamWminiScheduleFree", "AutoTrustGO"})  # the Emo family has use_shadow
ZONED = {"EmoClan", "EmoZeal", "EmoNeco"}  # the step's rule depends on the loss: count every zone
GROUPED = ["EmoFact", "EmoAiry", "EmoZeal", "EmoClan", "EmoNeco"]  # rules with per-tensor reductions
SHORT = dp.ZONE_LOSSES[:3]  # a first step creates the state; the next two are counted


def _losses(name):
    return dp.ZONE_LOSSES if name in ZONED else SHORT


def test_counter_sees_one_op_per_foreach_call_and_one_per_tensor_in_a_loop():
    ts = [torch.ones(3) for _ in range(20)]
    assert dp.count_dispatches(torch._foreach_add_, ts, 1.0) == 1
    assert dp.count_dispatches(lambda: [t.add_(1.0) for t in ts]) == 20
    with dp.DispatchCounter() as c:
        torch.stack(ts).sum()
    assert c.count == 2 and c.by_op == {"stack": 1, "sum": 1}


@pytest.mark.parametrize("name", NAMES)
def test_foreach_step_op_count_does_not_grow_with_the_tensor_count(name):
    full = dp.step_dispatches(name, dp.lora_params(722, rank=1), losses=_losses(name))
    half = dp.step_dispatches(name, dp.lora_params(361, rank=1), losses=_losses(name))
    assert dp.passes_bar(full["max"], half["max"]), (full["max"], half["max"], full["by_op"])
    if name in ZONED:  # the counted steps visited every zone of the rule
        zones = {"EmoClan": {"navi", "fact", "lynx"}, "EmoZeal": {"plain", "softsign", "cautious"},
                 "EmoNeco": {"softsign", "cautious"}}[name]
        assert zones <= set(full["modes"]), full["modes"]


@pytest.mark.parametrize("name, shadow", [(n, False) for n in NAMES] + [(n, True) for n in SHADOW],
                         ids=[*NAMES, *(f"{n}-shadow" for n in SHADOW)])
def test_foreach_step_reads_nothing_back_to_the_host(name, shadow):
    params = dp.lora_params(40, rank=1)
    kw = {"use_shadow": True} if shadow else {}
    opt = OPTIMIZERS[name](params, foreach=True, **kw)
    extra = {"max_steps": 1000} if name == "RefAdamWminiScheduleFree" else {}
    reads = []
    for loss in _losses(name):
        with SyncCounter() as c:
            opt.step(loss=loss, **extra)
        reads.append(dict(c.by_name))
    assert all(not r for r in reads), reads


def test_device_signals_are_read_in_the_callers_transfer():
    params = dp.lora_params(10, rank=1)
    opt = OPTIMIZERS["EmoTion"](params, foreach=True)
    for loss in SHORT:
        opt.step(loss=loss)
    names, values = opt.pending_signals
    assert {"rho", "freshness"} <= set(names) and values.dim() == 1 and values.device == params[0].device
    loss = torch.tensor(0.25)
    host = torch.cat([loss.reshape(1), values]).tolist()  # the trainer's one transfer
    opt.resolve_signals(host[1:])
    with SyncCounter() as c:
        tel = opt.telemetry
    assert c.count == 0 and opt.pending_signals is None
    assert tel["freshness"] == pytest.approx(host[1 + names.index("freshness")])
    assert isinstance(tel["rho"], float) and tel["rho"] > 0
    opt.step(loss=0.3)
    with pytest.raises(ValueError, match="signals"):
        opt.resolve_signals([1.0])
    taken = opt.take_pending_signals()  # a trainer that reads them with the next step's loss
    assert taken[0] == names and opt.pending_signals is None
    with SyncCounter() as c:
        tel = opt.telemetry
    assert c.count == 0 and "rho" not in tel and tel["loss"] == 0.3


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_foreach_matches_per_tensor_on_repeated_shapes(name):
    """Same-shape tensors are stacked and unbound again: every tensor must get its own update back."""
    pa, pb = dp.lora_params(24, rank=2, seed=3), dp.lora_params(24, rank=2, seed=3)
    oa, ob = OPTIMIZERS[name](pa, lr=1e-2, foreach=False), OPTIMIZERS[name](pb, lr=1e-2, foreach=True)
    for t, loss in enumerate(dp.ZONE_LOSSES):
        gen = torch.Generator().manual_seed(t)
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        oa.step(loss=loss)
        ob.step(loss=loss)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(pa, pb):
        for k, v in oa.state[a].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(ob.state[b][k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["EmoNavi", "EmoFact", "EmoTion"])
def test_bf16_parameters_are_cast_per_shape_not_per_tensor(name):
    """bf16 params are updated in float32: the casts in and out go by shape too (stack + one cast, one copy back)."""
    def bf16(modules):
        params = [torch.nn.Parameter(p.detach().bfloat16()) for p in dp.lora_params(modules, rank=1)]
        for p in params:
            p.grad = torch.full(p.shape, 1e-3, dtype=torch.bfloat16)
        return params

    full = dp.step_dispatches(name, bf16(722), losses=SHORT)
    half = dp.step_dispatches(name, bf16(361), losses=SHORT)
    assert dp.passes_bar(full["max"], half["max"]), (full["max"], half["max"], full["by_op"])
    assert full["by_op"].get("_foreach_copy_") == 1 and "copy_" not in full["by_op"]
