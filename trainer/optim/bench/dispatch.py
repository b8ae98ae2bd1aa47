"""Count the aten ops one optimizer step dispatches (each is at least one kernel launch on a GPU).

    python -m trainer.optim.bench --dispatch [--rank 16]

prints, for every optimizer in foreach mode (and torch AdamW foreach for reference), the ops of one steady-state
step over kohya's SDXL UNet LoRA set (722 modules, 1,444 tensors) and over its first half (361 modules), and
checks the bar of issue 10: full <= 1.25 x half + 50 and full <= 1,500 (a count that does not grow with the
number of tensors). Counts do not depend on tensor sizes, only on shapes and how many there are, so a small
rank gives the same numbers as rank 16 at a fraction of the memory.

Ops are counted by a TorchDispatchMode: what reaches the dispatcher from Python, so a torch._foreach_* call is one
op (on CUDA one launch per ~chunk of tensors), and view ops (unbind, reshape) count too.
"""

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .shapes import lora_shapes

BAR_RATIO, BAR_SLACK, BAR_MAX = 1.25, 50, 1500
# A loss series whose rising trend visits every zone of the loss-driven rules after a first step of its kind:
# EmoClan navi (steps 2-5), fact (6-7, 11), lynx (8-10); EmoZeal plain (2-4), softsign (5-7), cautious (8-10);
# EmoNeco softsign (6) and cautious. Steps that create state (a phase's first visit) are not counted.
ZONE_LOSSES = [1.0, 1.0, 1.0, 1.05, 1.1, 1.15, 1.3, 1.4, 1.5, 1.0, 1.0]


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (`count`, and `by_op` per overload name)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_dispatches(fn, *args, **kwargs) -> int:
    """The number of aten ops `fn(*args, **kwargs)` dispatches."""
    with DispatchCounter() as c:
        fn(*args, **kwargs)
    return c.count


def lora_params(modules=None, rank=16, device="cpu", seed=0):
    """Parameters with fixed random gradients shaped as the first `modules` SDXL UNet LoRA targets (all: None)."""
    targets, shapes = lora_shapes(rank)
    shapes = shapes[: 2 * modules] if modules is not None else shapes
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device))
        p.grad = torch.randn(s, generator=gen).mul_(1e-3).to(device)
        params.append(p)
    return params


def _state_size(opt):
    return sum(len(st) for st in opt.state.values())


def _mode(opt):
    sig = getattr(opt, "_signals", None) or {}
    return sig.get("phase") or sig.get("mode") or ""


def step_dispatches(name, params, *, losses=None, **kwargs) -> dict:
    """Step optimizer `name` (foreach=True unless given) through `losses`; count the ops of every step.

    Returns {"max": the most ops of a steady-state step (one that created no state), "per_step": [...],
    "modes": the modes/phases the counted steps visited, "by_op": the op histogram of the largest step}."""
    from .. import OPTIMIZERS

    losses = ZONE_LOSSES if losses is None else losses
    if name == "AdamW":
        opt = torch.optim.AdamW(params, foreach=kwargs.get("foreach", True))
        step = opt.step
    else:
        opt = OPTIMIZERS[name](params, **{"foreach": True, **kwargs})
        extra = {"max_steps": 1000} if name == "RefAdamWminiScheduleFree" else {}

        def step(loss):
            opt.step(loss=loss, **extra)

    per_step, steady, modes, worst = [], [], Counter(), Counter()
    for loss in losses:
        before = _state_size(opt)
        with DispatchCounter() as c:
            step(loss) if name != "AdamW" else step()
        per_step.append(c.count)
        if _state_size(opt) == before and len(per_step) > 1:
            steady.append(c.count)
            modes[_mode(opt)] += 1
            if c.count >= max(steady):
                worst = c.by_op
    return {"max": max(steady) if steady else max(per_step), "per_step": per_step, "modes": dict(modes),
            "by_op": dict(worst)}


def passes_bar(full: int, half: int) -> bool:
    return full <= BAR_RATIO * half + BAR_SLACK and full <= BAR_MAX


def dispatch_table(names=None, rank=16, modules=None, out=print) -> list[dict]:
    """Full/half op counts for every optimizer (foreach=True) plus torch AdamW(foreach=True)."""
    from .. import OPTIMIZERS

    names = list(OPTIMIZERS) + ["AdamW"] if names is None else list(names)
    full_n = modules or len(lora_shapes(rank)[0])
    rows = []
    for name in names:
        counts = {}
        for label, n in (("full", full_n), ("half", full_n // 2)):
            counts[label] = step_dispatches(name, lora_params(n, rank))
        full, half = counts["full"]["max"], counts["half"]["max"]
        rows.append({"name": name, "full": full, "half": half, "modes": counts["full"]["modes"],
                     "passes": passes_bar(full, half) if name != "AdamW" else None})
    if out is not None:
        out(render(rows, full_n, rank))
    return rows


def render(rows, modules, rank) -> str:
    lines = [f"aten ops per steady-state optimizer step, foreach=True, SDXL UNet LoRA set (rank {rank}): "
             f"{modules} modules ({2 * modules} tensors) and {modules // 2} modules ({2 * (modules // 2)} tensors)",
             f"bar: full <= {BAR_RATIO} x half + {BAR_SLACK} and full <= {BAR_MAX:,}", "",
             f"| optimizer | {modules} modules | {modules // 2} modules | bar | modes counted |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        modes = ", ".join(f"{k}" for k in r["modes"] if k) or "-"
        bar = "reference" if r["passes"] is None else "ok" if r["passes"] else "FAIL"
        name = "torch AdamW(foreach=True)" if r["name"] == "AdamW" else r["name"]
        lines.append(f"| {name} | {r['full']:,} | {r['half']:,} | {bar} | {modes} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m trainer.optim.bench --dispatch", description=__doc__.split("\n")[0])
    ap.add_argument("--dispatch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (counts do not depend on it)")
    ap.add_argument("--only", default=None, metavar="NAMES", help="comma-separated optimizer names")
    args = ap.parse_args(argv)
    rows = dispatch_table(args.only.split(",") if args.only else None, rank=args.rank)
    return 0 if all(r["passes"] is not False for r in rows) else 1
