"""Reading runs for the panel: an incremental, columnar copy of each run's telemetry.

Each refresh asks the run store only for the steps after the last one seen (one short SQLite read), so a
panel refreshing every second costs the same at step 10 and at step 100000. Works the same whether the run is
written by another process (a CLI run) or by a thread of this one (a ComfyUI run): both go through RunReader.
"""

import math
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ...trainer import runstore
from ...trainer.optim import OPTIMIZER_INFO

EMA_RATES = {"ema_short": 0.3, "ema_medium": 0.05, "ema_long": 0.01}  # the trainer's loss EMAs (B1)
NOT_SIGNALS = {"step", "t", "epoch", "skipped", "skipped_total", "should_stop", "shadow_active", "step_time",
               "samples_per_s", "rss_peak_mb", "mem_peak_mb", "mem_reserved_mb"}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RunData:
    """One run's telemetry as columns (steps, and name -> values aligned with steps; None where missing)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.reader = runstore.RunReader(self.run_dir)
        self.lock = threading.Lock()
        self.meta: dict = {}
        self.config: dict = {}
        self.control: dict = {}
        self.alive = False
        self.version = 0  # bumped whenever something new arrived
        self._reset()

    def _reset(self) -> None:
        self.steps: list = []
        self.cols: dict = {}
        self.events: list = []
        self._event_id = 0
        self.version += 1

    def refresh(self) -> "RunData":
        with self.lock:
            self._refresh()
        return self

    def _refresh(self) -> None:
        meta = self.reader.meta()
        if meta != self.meta:
            self.meta = meta
            self.version += 1
        if not self.config:
            try:
                self.config = self.reader.config()
            except (OSError, ValueError):
                self.config = {}
        events = self.reader.events(since_id=self._event_id)
        if any(e["kind"] == "resume" for e in events):  # the store dropped steps to be redone: read all again
            self._reset()
            events = self.reader.events()
        if events:
            self.events.extend(events)
            self._event_id = events[-1]["id"]
            self.version += 1
        last = self.reader.last_step()
        if self.steps and (last is None or last < self.steps[-1]):  # truncated behind our back
            self._reset()
            self.events = self.reader.events()
            self._event_id = self.events[-1]["id"] if self.events else 0
        # From the last step seen too: the trainer logs a step's row again one step later, completed with what
        # the next step's read carried (its update_ratio, the optimizer's device-side signals).
        new = self.reader.steps(since=self.steps[-1] - 1 if self.steps else -1)
        if new and self.steps and new[0]["step"] == self.steps[-1]:
            if self._complete_last(new.pop(0)):
                self.version += 1
        if new:
            self._append(new)
            self.version += 1
        self.control = runstore.read_control(self.run_dir / runstore.CONTROL_NAME)
        self.alive = self.reader.is_alive()

    def _append(self, records: list) -> None:
        n = len(self.steps)
        for i, rec in enumerate(records):
            self.steps.append(rec["step"])
            for k, v in rec.items():
                if k == "step":
                    continue
                col = self.cols.get(k)
                if col is None:
                    col = self.cols[k] = [None] * (n + i)
                col.append(v)
            for col in self.cols.values():
                if len(col) < n + i + 1:
                    col.append(None)
        self._fill_emas(n)

    def _complete_last(self, rec: dict) -> bool:
        """The last row read again: add the values it did not have then. -> whether any was added."""
        i, added = len(self.steps) - 1, False
        for k, v in rec.items():
            if k in ("step", "t"):
                continue
            col = self.cols.get(k)
            if col is None:
                col = self.cols[k] = [None] * len(self.steps)
            if col[i] is None and v is not None:
                col[i], added = v, True
        return added

    def _fill_emas(self, start: int) -> None:
        """Loss EMAs for optimizers that keep none (AdamW, AutoTrustGO, ...), with the trainer's rates."""
        loss = self.cols.get("loss")
        if loss is None:
            return
        for name, rate in EMA_RATES.items():
            if name in self.cols and f"panel_{name}" not in self.cols:
                continue  # the optimizer's own
            col = self.cols.setdefault(f"panel_{name}", [])
            prev = next((v for v in reversed(col) if v is not None), None)
            for v in loss[len(col):]:
                if _num(v):
                    prev = v if prev is None else rate * v + (1 - rate) * prev
                col.append(prev if _num(v) else None)

    # ---- views -----------------------------------------------------------------------------------------------
    def series(self, name: str):
        """(steps, values) of one signal; the optimizer's loss EMAs fall back to the panel's."""
        col = self.cols.get(name)
        if col is None and name in EMA_RATES:
            col = self.cols.get(f"panel_{name}")
        if col is None:
            return [], []
        return self.steps, col

    def has(self, name: str) -> bool:
        col = self.cols.get(name)
        return col is not None and any(v is not None for v in col[-200:] or col)

    def signals(self) -> list:
        """The optimizer's signal names: from the run's meta, else from OPTIMIZER_INFO."""
        sig = self.meta.get("signals")
        if isinstance(sig, list) and sig:
            return [s for s in sig if isinstance(s, str)]
        info = OPTIMIZER_INFO.get(self.meta.get("optimizer") or self.config.get("optimizer"))
        return list(info.signals) if info else []

    def numeric_keys(self) -> list:
        """Names of numeric columns seen in the recent records (candidates for the 'more signals' chart)."""
        out = []
        for k, col in self.cols.items():
            if k in NOT_SIGNALS or k.startswith("panel_"):
                continue
            if any(_num(v) for v in col[-50:]):
                out.append(k)
        return out

    def should_stop_rises(self) -> list:
        """[(step, auto_stop mode)] where the optimizer's should_stop rose."""
        return [(e["step"], (e.get("data") or {}).get("auto_stop")) for e in self.events
                if e["kind"] == "should_stop" and (e.get("data") or {}).get("value")]

    def event_paths(self, kind: str) -> list:
        out = []
        for e in self.events:
            if e["kind"] == kind and isinstance(e.get("data"), dict):
                d = e["data"]
                out.extend([d["path"]] if isinstance(d.get("path"), str) else [])
                out.extend(p for p in d.get("paths") or [] if isinstance(p, str))
        return out

    def use_shadow(self) -> bool:
        args = self.config.get("optimizer_args") or {}
        return bool(args.get("use_shadow")) or any(v for v in (self.cols.get("shadow_active") or []) if v)

    def last(self, name: str):
        col = self.cols.get(name) or []
        return next((v for v in reversed(col) if v is not None), None)

    def stop_message(self):
        """Why the run ended, in the trainer's words: the meta's error or message, else the last stop/error
        event's (a diverged run names the optimizer, the step and what to try); None when there is none."""
        for key in ("error", "message"):
            if isinstance(self.meta.get(key), str) and self.meta[key]:
                return self.meta[key]
        for e in reversed(self.events):
            d = e.get("data")
            if e["kind"] in ("stop", "error", "diverged") and isinstance(d, dict):
                msg = d.get("message") or d.get("error")
                if isinstance(msg, str) and msg:
                    return msg
        return None

    def status(self) -> dict:
        """What the status line shows."""
        m = self.meta
        step = self.steps[-1] if self.steps else 0
        total = m.get("steps_total") or self.config.get("steps")
        status = m.get("status", "starting")
        if status == "running" and not self.alive:
            status = "interrupted"  # the trainer's process is gone without recording an end (killed)
        sps = self.last("steps_per_s")
        eta = (total - step) / sps if status == "running" and sps and total and total > step else None
        mem = self.last("mem_mb")
        mem_peak = self.last("mem_peak_mb")
        if mem is None:
            mem, mem_peak = self.last("rss_mb"), self.last("rss_peak_mb")
        auto = self.control.get("auto_stop") or self.config.get("auto_stop") or "stop"
        return {"name": self.run_dir.name, "optimizer": m.get("optimizer") or self.config.get("optimizer"),
                "status": status, "stop_reason": m.get("stop_reason"), "step": step, "steps_total": total,
                "steps_per_s": sps, "eta_s": eta, "mem_mb": mem, "mem_peak_mb": mem_peak,
                "loss": self.last("loss"), "auto_stop": auto, "should_stop_rises": self.should_stop_rises(),
                "lora_path": m.get("lora_path"), "error": self.stop_message(), "device": m.get("device"),
                "barely_moving": runstore.barely_moving_message(self.events),
                "started_at": m.get("started_at")}

    def close(self) -> None:
        self.reader.close()


class RunCache:
    """RunData per run folder, shared by every browser session of this panel (a few kept, least recent out)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._runs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_dir) -> RunData:
        key = str(Path(run_dir))
        with self._lock:
            rd = self._runs.pop(key, None)
            if rd is None:
                rd = RunData(run_dir)
            self._runs[key] = rd
            while len(self._runs) > self.size:
                _, old = self._runs.popitem(last=False)
                old.close()
        return rd.refresh()


def list_runs(runs_dir) -> list:
    """The runs in `runs_dir`, newest first, each with name, status (interrupted when its process is gone),
    meta and resume (True when it can continue: runstore.unfinished_runs)."""
    can_resume = {r["name"] for r in runstore.unfinished_runs(runs_dir)}
    return [{**r, "status": runstore.run_state(r), "resume": r["name"] in can_resume}
            for r in runstore.RunReader.list_runs(runs_dir)]


def fmt_duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def age(t) -> str:
    return fmt_duration(time.time() - t) + " ago" if _num(t) else ""
