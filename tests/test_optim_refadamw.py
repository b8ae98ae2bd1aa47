"""RefAdamW's bounded injection (a deliberate difference from upstream) and its device-resident foreach path."""

import math

import torch
from _trainer_helpers import lora_tensors, tiny_config

from trainer.optim import OPTIMIZERS, create_optimizer
from trainer.optim.bench.dispatch import DispatchCounter
from trainer.optim.bench.syncs import SyncCounter
from trainer.optim.refadamw import momentum_bound

Ref = OPTIMIZERS["RefAdamWminiScheduleFree"]


def lora_pair(seed=0, rank=4, dim=32):
    """A LoRA as the trainer builds it: kaiming-uniform down, zero up, so early gradients are tiny."""
    gen = torch.Generator().manual_seed(seed)
    down = (torch.rand(rank, dim, generator=gen) * 2 - 1).mul_(1 / math.sqrt(dim)).requires_grad_(True)
    up = torch.zeros(dim, rank, requires_grad=True)
    return [down, up]


def lora_loss(params, t):
    down, up = params
    gen = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(8, down.shape[1], generator=gen), torch.randn(8, up.shape[0], generator=gen)
    return ((x @ down.T @ up.T - y) ** 2).mean() * 1e-3  # small gradients, as a diffusion LoRA gets


def run(opt, params, steps=30, horizon=None):
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = lora_loss(params, t)
        loss.backward()
        opt.step(loss=loss.item(), max_steps=horizon or steps)
    return max(p.detach().abs().max().item() for p in params)


def test_momentum_bound_is_the_largest_ratio_gradients_can_reach():
    b1, b2 = 0.9, 0.999
    bound = momentum_bound(b1, b2)
    assert abs(bound - 7.2703) < 1e-3
    # The extremal gradient sequence g_k ~ (b1 / b2)^(t - k) reaches the bound as t grows; no sequence exceeds it.
    t = 400
    g = torch.tensor([(b1 / b2) ** (t - k) for k in range(1, t + 1)], dtype=torch.float64)
    m = sum((1 - b1) * b1 ** (t - k) * g[k - 1] for k in range(1, t + 1))
    v = sum((1 - b2) * b2 ** (t - k) * g[k - 1] ** 2 for k in range(1, t + 1))
    assert bound * 0.999 < m / v.sqrt() <= bound
    assert momentum_bound(0.99, 0.9) == math.inf


def test_upstream_injection_diverges_on_a_lora_and_the_bounded_one_does_not():
    upstream, bounded = lora_pair(), lora_pair()
    start = upstream[0].detach().abs().max().item()
    assert run(Ref(upstream, lr=1e-4), upstream) > 100 * start  # upstream's maths (the class default)
    top = run(Ref(bounded, lr=1e-4, bounded_injection=True), bounded)
    assert all(torch.isfinite(p).all() for p in bounded)
    assert top < 1.5 * start


def test_bound_changes_nothing_without_an_injection():
    a, b = lora_pair(), lora_pair()
    oa, ob = Ref(a, lr=1e-4), Ref(b, lr=1e-4, bounded_injection=True)
    for opt, params in ((oa, a), (ob, b)):
        for t in range(1, 11):
            opt.zero_grad(set_to_none=True)
            lora_loss(params, t).backward()
            opt.step(loss=1.0, max_steps=1000)  # progress < 0.2: no injection
        assert opt.telemetry["ref_inject"] is False
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bounded_injection_agrees_in_both_execution_modes():
    # Four capped injections (steps 6-10 of 30). Later the capped pull makes near-zero weights oscillate around
    # 0, where a last-bit difference flips a sign, so the two paths part ways (as any two codes would).
    a, b = lora_pair(), lora_pair()
    run(Ref(a, lr=1e-4, bounded_injection=True, foreach=False), a, steps=10, horizon=30)
    run(Ref(b, lr=1e-4, bounded_injection=True, foreach=True), b, steps=10, horizon=30)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-8) for x, y in zip(a, b))


def test_a_non_finite_loss_skips_the_step_and_is_counted():
    params = lora_pair()
    opt = Ref(params, lr=1e-4)
    run(opt, params, steps=3)
    before = [p.detach().clone() for p in params]
    lora_loss(params, 4).backward()
    opt.step(loss=float("nan"), max_steps=10)
    assert opt.skipped_nonfinite == 1 and opt.counters["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_the_factory_turns_the_bound_on_and_an_explicit_false_wins():
    assert create_optimizer("RefAdamWminiScheduleFree", lora_pair(), lr=1e-4).bounded_injection is True
    assert create_optimizer("RefAdamWminiScheduleFree", lora_pair(), bounded_injection=False).bounded_injection is False
    assert Ref(lora_pair()).bounded_injection is False  # the bare class is upstream's maths (golden check)


def test_foreach_step_reads_nothing_back_and_its_op_count_does_not_grow(one_thread):
    def params(n):
        gen = torch.Generator().manual_seed(0)
        out = []
        for i in range(n):
            shape = ((4, 24), (24, 4), (4, 40))[i % 3]
            p = torch.randn(shape, generator=gen).requires_grad_(True)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            out.append(p)
        return out

    counts = {}
    for n in (30, 90):
        opt = Ref(params(n), lr=1e-4, foreach=True, bounded_injection=True)
        opt.step(loss=1.0, max_steps=10)  # creates the state
        for loss in (1.0, 1.3, 1.0):  # injected steps (progress 0.2..0.4), one at divergence level 1
            with SyncCounter() as syncs, DispatchCounter() as ops:
                opt.step(loss=loss, max_steps=10)
            assert syncs.count == 0
            assert opt.pending_signals is not None  # auto_lr_mean waits on the device until telemetry is read
        counts[n] = ops.count
        assert math.isfinite(opt.telemetry["auto_lr_mean"]) and opt.telemetry["ref_inject"] is True
    assert counts[90] == counts[30]


def test_the_issue_case_trains_30_steps_with_finite_weights(tmp_path, one_thread):
    """issue 8: 8 photos, 64 px, rank 4, batch 2, lr 1e-4, 30 steps: upstream's injection reached |w| = 6e4."""
    from trainer.train import train

    cfg = tiny_config(tmp_path, n_images=8, sizes=((96, 64), (64, 96), (80, 80)), steps=30,
                      optimizer="RefAdamWminiScheduleFree", lr=1e-4)
    result = train(cfg)
    assert result.stop_reason == "finished" and result.skipped_steps == 0
    tensors = lora_tensors(result.lora_path)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith("weight")) < 1.0
