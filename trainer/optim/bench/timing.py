"""Paired timing: fresh parameters per row, warm-up with sync/state counting, steps bracketed by AdamW baselines."""

import contextlib
import gc
import math
import random
import statistics
import time
from collections import Counter

import torch

from .machine import minor_faults
from .shapes import lora_shapes
from .syncs import CudaSyncCounter, SyncCounter


def state_bytes(opt):
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if torch.is_tensor(x):
            key = (x.data_ptr(), x.numel(), x.dtype)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for st in opt.state.values():
        visit(st)
    return total


def make_losses(n=256, seed=1234):
    """A noisy, slowly falling diffusion-like loss series (python floats)."""
    rng = random.Random(seed)
    return [0.09 + 0.04 * math.exp(-k / 40) + 0.03 * math.sin(0.37 * k) + 0.04 * rng.random() for k in range(n)]


def _mode_of(opt):
    tel = getattr(opt, "_signals", None) or {}
    return tel.get("phase") or tel.get("mode") or None


class Bench:
    def __init__(self, device, rank, quick, seed=0):
        self.device = torch.device(device)
        self.targets, self.shapes = lora_shapes(rank, quick)
        gen = torch.Generator().manual_seed(seed)
        self.base = [torch.randn(s, generator=gen).mul_(0.02).to(self.device) for _, s in self.shapes]
        self.grads = [torch.randn(s, generator=gen).mul_(1e-3).to(self.device) for _, s in self.shapes]
        self.param_bytes = sum(t.numel() * t.element_size() for t in self.base)
        self.n_params = sum(t.numel() for t in self.base)
        self.losses = make_losses()
        self.cuda = self.device.type == "cuda"

    def fresh_params(self):
        params = []
        for b, g in zip(self.base, self.grads):
            p = torch.nn.Parameter(b.clone())
            p.grad = g.clone()
            params.append(p)
        return params

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def counter(self):
        return CudaSyncCounter() if self.cuda else SyncCounter()

    REFS = (("AdamW(foreach=False)", {"foreach": False}), ("AdamW(fused=True)", {"fused": True}))

    def setup_refs(self):
        """Long-lived baseline optimizers, stepped right before and after every timed block: the ratios pair each
        row with the baselines measured under the same load (the machine is shared; load drifts over minutes)."""
        self.refs = {}
        for label, kw in self.REFS:
            params = self.fresh_params()
            opt = torch.optim.AdamW(params, **kw)
            for _ in range(3):
                opt.step()
            self.refs[label] = (opt, params)

    def ref_sample(self, n=2):
        out = {}
        for label, (opt, _) in getattr(self, "refs", {}).items():
            out[label] = []
            for _ in range(n):
                self._sync()
                t0 = time.perf_counter()
                opt.step()
                self._sync()
                out[label].append(time.perf_counter() - t0)
        return out

    def run_row(self, row, steps, count, row_budget_s, rec):
        """Build, warm up 3 steps (counting syncs and state when `count`), time up to `steps` steps."""
        params = self.fresh_params()
        opt, step = row.build(params)
        k = 0
        warm_times = []
        for w in range(3):
            counter = self.counter() if (count and row.ours) else None
            ctx = (lambda c=counter: c) if counter is not None else contextlib.nullcontext
            self._sync()
            t0 = time.perf_counter()
            step(self.losses[k], w == 2, ctx)  # the third warm-up step passes the loss as a 0-dim tensor
            self._sync()
            warm_times.append(time.perf_counter() - t0)
            k += 1
            if counter is not None:
                rec.setdefault("syncs_by_step", []).append(counter.count)
                rec.setdefault("sync_methods", Counter()).update(counter.by_name)
            if count and w == 1:
                rec["state_bytes_2"] = state_bytes(opt)
        est = max(min(warm_times[1:]), 1e-6)
        n = max(2, min(steps, int(row_budget_s / est)))
        times, cpu, faults = [], [], []
        modes = rec.setdefault("modes", Counter())
        paired = row.section != "foreach"  # the foreach rows compare with each other only
        before = self.ref_sample() if paired else {}
        for _ in range(n):
            self._sync()
            f0, t0, c0 = minor_faults(), time.perf_counter(), time.process_time()
            step(self.losses[k], False, contextlib.nullcontext)
            self._sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults.append(minor_faults() - f0)
            k += 1
            m = _mode_of(opt)
            if m:
                modes[m] += 1
        if paired:
            after = self.ref_sample()
            rec.setdefault("pass_refs", []).append({k: statistics.median(before[k] + after[k]) for k in before})
        rec.setdefault("times", []).extend(times)
        rec.setdefault("cpu_times", []).extend(cpu)
        rec.setdefault("minor_faults", []).extend(faults)
        rec.setdefault("pass_medians", []).append(statistics.median(times))
        rec["state_bytes_end"] = max(rec.get("state_bytes_end", 0), state_bytes(opt))
        del opt, step, params
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
