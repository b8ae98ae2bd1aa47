"""What every optimizer of the family shares: loss delivery, rule execution, state, telemetry, writer.

Subclasses implement `_step(loss)` (the upstream step with the loss already a python float) and, when they
keep scalar state outside `self.state[p]`, `_extra_state()` / `_load_extra_state()`.

Execution: `_apply(rule, items, keys, grouped=...)` runs a rule per tensor (the CPU default) or as foreach
kernels (CUDA default, or foreach=True); in foreach mode the number of ops per step does not depend on the
number of tensors (rules with per-tensor reductions batch same-shape tensors, see _tensors; low-precision
params are cast per shape). `python -m trainer.optim.bench --dispatch` counts them.

Host reads: the loss is the only host value a step needs; step(loss=<python float>) in foreach mode reads
nothing back from the device (tests/test_optim_dispatch.py). Signals that live on the device (EmoTion's rho
and freshness, EmoVoid's rescale, ...) are published as 0-dim tensors and stacked into one device tensor:

    opt.pending_signals          -> (names, 1-D float32 device tensor) of the last step, or None (peek)
    opt.take_pending_signals()   -> the same, handed over: the optimizer forgets them
    opt.resolve_signals(values)  -> give back their host values (floats, in names' order) read by the caller
    opt.telemetry                -> every signal as python values; reads pending ones itself (one transfer)
                                    unless they were resolved or taken

so a trainer fetches them in the transfer it makes for the loss anyway (e.g. the next step's).
"""

import logging
import math

import torch

from ._emotion import new_history
from ._tensors import (
    TensorList,
    as_compute,
    as_compute_runs,
    default_foreach,
    shape_order,
    write_back,
    write_back_foreach,
)

log = logging.getLogger("emolora.optim")


class EmoOptimizer(torch.optim.Optimizer):
    needs_loss = True  # False where step() without a loss is normal use (no warning): AutoTrustGO, RefAdamW
    reads_loss = True  # False where the loss never enters the update (AutoTrustGO); RefAdamW's optional loss does
    writer_tags: dict = {}  # upstream TensorBoard tag -> telemetry key

    def __init__(self, params, defaults, *, foreach=None, state_dtype=None, writer=None):
        super().__init__(params, defaults)
        self.foreach = foreach  # None: per tensor on the CPU, foreach on CUDA
        self.state_dtype = state_dtype  # None: float32 state for bf16/fp16 params; "param": parameter dtype
        self.writer = writer
        self.should_stop = False
        self.skipped_nonfinite = 0
        self._warned = set()
        self._signals: dict = {}
        self._pending = None  # (names, stacked tensor) of device-side signals, read lazily

    # ---- loss delivery -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One update. The loss comes from `closure()` (run with grad enabled) or `loss=` (float or 0-dim)."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            loss = result
        value = self._loss_value(loss)
        if value is None:
            return result
        self._step(value)
        if self.writer is not None:
            self._write()
        return result

    def _loss_value(self, loss):
        if loss is None:
            if self.needs_loss:
                self._warn_once("no-loss", "%s.step() got no loss: it feels nothing and behaves as upstream "
                                "does with loss 0. Pass step(loss=...) or a closure.", type(self).__name__)
            return 0.0
        value = float(loss)  # the one host sync of a step, when the loss is still a tensor
        if not math.isfinite(value):
            self.skipped_nonfinite += 1
            self._warn_once("nonfinite", "%s: non-finite loss %r, step skipped (counted in skipped_nonfinite)",
                            type(self).__name__, value)
            return None
        return value

    def _warn_once(self, key, msg, *args):
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _step(self, loss: float) -> None:
        raise NotImplementedError

    # ---- rule execution --------------------------------------------------------------------------------
    def _with_grad(self, group):
        """(param, grad, state) for the group's params that have a gradient, states created on first use."""
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            st = self.state[p]
            if not st:
                self._init_state(p, st, group)
            out.append((p, p.grad, st))
        return out

    def _init_state(self, p, state, group) -> None:
        pass

    def _zeros(self, p, shape=None):
        """A state tensor: float32 for low-precision params unless state_dtype='param' (Part 1, decision 6)."""
        dtype = p.dtype
        if self.state_dtype != "param" and p.dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        return torch.zeros(p.shape if shape is None else shape, dtype=dtype, device=p.device)

    def _factored_zeros(self, p, state, prefix="exp_avg"):
        """Adafactor-style row/column statistics of a >=2-D parameter: (d0, 1, ..) and (1, d1, ..)."""
        state[f"{prefix}_r"] = self._zeros(p, (p.shape[0],) + (1,) * (p.dim() - 1))
        state[f"{prefix}_c"] = self._zeros(p, (1,) + tuple(p.shape[1:]))

    def _uses_foreach(self, params) -> bool:
        """Whether this step runs foreach kernels (and keeps its scalars on the device) for these params."""
        return self.foreach if self.foreach is not None else default_foreach(params)

    def _apply(self, rule, items, keys, *, per_tensor=False, grouped=False, **scalars):
        """Run `rule(p, g, state, **scalars)` over items, per tensor or as one foreach call.

        grouped=True (foreach mode): the TensorLists come ordered by (shape, dtype, device) with their run
        lengths in `.groups`, so the rule can `batch()` them for per-tensor reductions (see _tensors).
        per_tensor=True forces the loop, for rules with per-tensor reductions that have no foreach form.
        """
        if not items:
            return
        use_foreach = not per_tensor and self._uses_foreach([p for p, _, _ in items])
        dtype = self._compute_dtype(items[0][0])
        if not use_foreach:
            params = [p for p, _, _ in items]
            work, grads = as_compute(params, [g for _, g, _ in items], dtype)
            for w, g, (_, _, st) in zip(work, grads, items):
                rule(w, g, st, **scalars)
            write_back(params, work)
            return
        cast = any(p.dtype != dtype or g.dtype != dtype for p, g, _ in items)
        groups = None
        if grouped or cast:  # casts also go by shape: one stacked cast per shape instead of one per tensor
            order, groups = self._shape_order(items)
            items = [items[i] for i in order]
        params, grads = [p for p, _, _ in items], [g for _, g, _ in items]
        work, grads = as_compute_runs(params, grads, dtype, groups) if cast else (params, grads)
        states = {k: TensorList((st[k] for _, _, st in items), groups) for k in keys}
        rule(TensorList(work, groups), TensorList(grads, groups), states, **scalars)
        if cast:
            write_back_foreach(params, work)

    def _shape_order(self, items):
        """shape_order() of the items' params, cached per parameter list (the params outlive the cache key)."""
        key = tuple(id(p) for p, _, _ in items)
        cache = self.__dict__.setdefault("_order_cache", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            cache[key] = shape_order([p for p, _, _ in items])
        return cache[key]

    def _compute_dtype(self, p):
        if self.state_dtype != "param" and p.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return p.dtype

    # ---- state -----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        """Scalar state outside self.state: the loss EMAs and stop history where an optimizer keeps them;
        subclasses add their own."""
        out = {}
        if hasattr(self, "ema"):
            out["ema"] = dict(self.ema)
        if hasattr(self, "hist"):
            out["hist"] = list(self.hist)
        return out

    def _load_extra_state(self, extra: dict) -> None:
        if hasattr(self, "ema"):
            self.ema = dict(extra.get("ema", {}))
        if hasattr(self, "hist"):
            self.hist = new_history()
            self.hist.extend(extra.get("hist", []))

    def state_dict(self):
        sd = super().state_dict()
        sd["emo"] = {"should_stop": self.should_stop, "skipped_nonfinite": self.skipped_nonfinite,
                     **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("emo", None) or {}
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        # torch casts float state to the parameter dtype on load; keep our float32 state for bf16 params.
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in saved.items():
            p = params[idx]
            for k, v in st.items():
                if torch.is_tensor(v) and v.dtype != self.state[p][k].dtype:
                    self.state[p][k] = v.to(device=p.device, copy=True)
        self.should_stop = extra.get("should_stop", False)
        self.skipped_nonfinite = extra.get("skipped_nonfinite", 0)
        self._load_extra_state(extra)

    # ---- telemetry -------------------------------------------------------------------------------------
    def _publish(self, signals: dict, device_signals: dict | None = None):
        """Host-side signals now; device-side ones (0-dim tensors, in `device_signals` or as values of `signals`)
        stacked into one tensor that is transferred once, when telemetry is read (see pending_signals)."""
        device = {k: v for k, v in signals.items() if torch.is_tensor(v)}
        device.update(device_signals or {})
        self._signals = {k: v for k, v in signals.items() if k not in device}
        self._signals["should_stop"] = bool(self.should_stop)
        if device:
            names = list(device)
            self._pending = (names, torch.stack([t.detach().float().reshape(()) for t in device.values()]))
        else:
            self._pending = None

    @property
    def pending_signals(self):
        """The last step's device-side signals not read yet, as (names, 1-D float32 tensor on the device), or None.

        A trainer that reads the loss anyway fetches this tensor in the same transfer (cat it with the loss,
        one .tolist()) and hands the values back with resolve_signals(), so telemetry costs no extra sync."""
        return self._pending

    def take_pending_signals(self):
        """pending_signals, handed over: the optimizer forgets them (its telemetry keeps the host-side signals),
        for a caller that reads them later, e.g. with the next step's loss."""
        pending, self._pending = self._pending, None
        return pending

    def resolve_signals(self, values) -> None:
        """Give the host values of pending_signals (python floats, in its names' order)."""
        if self._pending is not None:
            names, _ = self._pending
            if len(values) != len(names):
                raise ValueError(f"resolve_signals: {len(values)} values for {len(names)} signals {names}")
            self._signals.update(zip(names, (float(v) for v in values)))
            self._pending = None

    @property
    def telemetry(self) -> dict:
        """The signals of the last step as python floats/bools (optimizers.md Part 2, sections f); reads
        pending device signals itself (one transfer) unless resolve_signals() was given them."""
        if self._pending is not None:
            self.resolve_signals(self._pending[1].tolist())
        return dict(self._signals)

    def _write(self):
        tel = self.telemetry
        step = self._write_step = getattr(self, "_write_step", 0) + 1
        tags = self.writer_tags or {f"emo/{k}": k for k in tel}
        for tag, key in tags.items():
            if key in tel:
                self.writer.add_scalar(tag, float(tel[key]), step)
