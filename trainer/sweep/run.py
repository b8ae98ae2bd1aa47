"""Running a sweep: its runs one after another over one loaded model, sweep.json after every run, the
report at the end, and --resume of a stopped or killed sweep (finished runs kept, the interrupted one resumed
from its saved state). Importing it (load_sweep, for the panel) loads no torch."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..config import ConfigError
from . import chart, report
from .plan import SweepPlan, plan_from_dict

log = logging.getLogger("emolora.sweep")

SWEEP_FILE = "sweep.json"


@dataclass
class SweepResult:
    rows: list
    winner: dict | None
    recommendation: str
    table_md: str
    png_path: str | None
    status: str = "finished"  # finished / stopped
    output_dir: str = ""
    notes: list = field(default_factory=list)
    model_loads: int = 0


def load_sweep(folder) -> dict:
    """DIR/sweep.json: {"status": running/finished/stopped, "plan": {...}, "rows": [...], "recommendation",
    "current": {label, run_dir, run, runs} of the run in progress or null}, also while the sweep runs (rows so
    far; the current run's folder has its live telemetry). Raises ConfigError when the folder holds no sweep."""
    path = Path(folder).expanduser() / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"not a sweep folder (no {SWEEP_FILE}): {folder}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def resume_plan(folder) -> SweepPlan:
    """The plan of the sweep in `folder`, for continuing it."""
    return plan_from_dict(load_sweep(folder)["plan"])


def _write(plan: SweepPlan, status: str, rows: list, recommendation: str | None = None,
           current: dict | None = None) -> None:
    atomic_write_json(plan.output_dir / SWEEP_FILE, {"status": status, "plan": plan.to_dict(), "rows": rows,
                                                     "recommendation": recommendation, "current": current,
                                                     "updated_at": time.time()})


def _run_folder(plan: SweepPlan, spec) -> Path:
    return plan.output_dir / "runs" / spec.name


def _events(run_dir, kind: str) -> list:
    from ..runstore import RunReader

    reader = RunReader(run_dir)
    try:
        return reader.events(kind=kind)
    finally:
        reader.close()


def val_curve(run_dir) -> list:
    from ..runstore import RunReader

    reader = RunReader(run_dir)
    try:
        return [(r["step"], r["val_loss"]) for r in reader.steps() if r.get("val_loss") is not None]
    finally:
        reader.close()


class _Clock:
    """ETA for the whole sweep: training seconds per step so far (setup of the first run excluded) x steps left."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.t0, self.base = total_steps, 0, None, 0

    def step(self, steps_done_before: int, step: int) -> None:
        if self.t0 is None:
            self.t0, self.base = time.perf_counter(), steps_done_before + step
        self.done = steps_done_before + step

    def eta(self) -> float | None:
        if self.t0 is None or self.done <= self.base:
            return None
        rate = (time.perf_counter() - self.t0) / (self.done - self.base)
        return rate * (self.total - self.done)


def run_sweep(plan: SweepPlan, *, stop_event: threading.Event | None = None, on_progress=None,
              on_step=None, progress_bar: bool = False) -> SweepResult:
    """Train every run of the plan over one model load. Continues a sweep already in plan.output_dir (its
    finished rows are kept, an interrupted run resumes from its state). on_progress(done_runs, total_runs,
    eta_s, current_label) at each run's start and at the end; on_step(info) is each run's step callback (info
    also has sweep_run, sweep_runs, sweep_eta_s and sweep_label). stop_event: the current run saves and stops
    at its next step boundary, and the sweep ends as "stopped" (resume it later)."""
    from ..state import STATE_FILE
    from .session import SharedModel, SweepTrainer

    stop_event = stop_event or threading.Event()
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if (out / SWEEP_FILE).is_file():
        saved = load_sweep(out)
        if saved.get("plan") != json.loads(json.dumps(plan.to_dict(), sort_keys=True, default=str)):
            raise ConfigError(f"{out} holds another sweep (other optimizers or options): continue it with "
                              "--resume, or choose another output folder")
        labels = {r.label for r in plan.runs}
        rows = [r for r in saved.get("rows", []) if r.get("label") in labels]
    done = {r["label"] for r in rows}
    for note in plan.notes:
        log.info("sweep: %s", note)
    _write(plan, "running", rows)
    total = len(plan.runs)
    clock = _Clock(total * plan.steps)
    shared = SharedModel()
    status = "finished"
    try:
        for spec in plan.runs:
            if spec.label in done:
                continue
            if stop_event.is_set():
                status = "stopped"
                break
            index = len(done)
            if on_progress is not None:
                on_progress(index, total, clock.eta(), spec.label)
            eta = clock.eta()
            log.info("sweep: run %d/%d: %s%s", index + 1, total, spec.label,
                     f" (sweep ETA {eta / 60:.1f} min)" if eta is not None else "")
            steps_before = index * plan.steps
            cfg = spec.cfg
            folder = _run_folder(plan, spec)
            if (folder / "state" / STATE_FILE).is_file():
                cfg = cfg.replace(resume=str(folder))
                log.info("sweep: resuming %s", folder)
            elif folder.exists():
                shutil.rmtree(folder)  # killed before its first saved state: start it again
            _write(plan, "running", rows, current={"label": spec.label, "run_dir": str(folder),
                                                   "run": index + 1, "runs": total})

            def step_hook(info, _index=index, _steps_before=steps_before, _label=spec.label):
                clock.step(_steps_before, info["step"])
                if on_step is not None:
                    on_step({**info, "sweep_run": _index + 1, "sweep_runs": total, "sweep_eta_s": clock.eta(),
                             "sweep_label": _label})

            trainer = SweepTrainer(cfg, shared, stop_event=stop_event, on_step=step_hook, progress_bar=progress_bar)
            t0 = time.perf_counter()
            result, error = None, None
            try:
                trainer.setup()
                result = trainer.run()
            except (KeyboardInterrupt, SystemExit):
                status = "stopped"
                raise
            except Exception as e:  # one run's failure is a row, not the end of the sweep
                if trainer.stop_reason == "interrupted":  # the host's step callback raised (e.g. a cancel)
                    status = "stopped"
                    raise
                if isinstance(e, ConfigError) and shared.loaded is None:
                    raise  # bad input found by the first run's setup: every run would fail the same way
                error = f"{type(e).__name__}: {e}"
                log.error("sweep: %s failed: %s", spec.label, error)
            finally:
                trainer.close()
                trainer.release()
            seconds = time.perf_counter() - t0
            if result is not None and result.stop_reason in ("stopped", "interrupted"):
                status = "stopped"  # its state is saved: --resume continues it
                break
            if result is None:
                rows.append(report.failed_row(spec, error, str(trainer.run_dir) if trainer.run_dir else None, seconds))
            else:
                moving = bool(_events(result.run_dir, "barely_moving"))
                rows.append(report.row(spec, result, seconds, moving))
            done.add(spec.label)
            report.mark_identical(rows)
            _write(plan, "running", rows)
    except BaseException:
        _write(plan, "stopped", rows)
        raise
    finally:
        shared.release()
    return _finish(plan, rows, status, on_progress, shared.loads)


def _finish(plan: SweepPlan, rows: list, status: str, on_progress, loads: int) -> SweepResult:
    order = {r.label: i for i, r in enumerate(plan.runs)}
    rows.sort(key=lambda r: order.get(r["label"], len(order)))
    report.mark_identical(rows)
    winner, line = report.recommend(rows)
    table = report.table_md(rows)
    png = None
    if rows:
        curves = [{"label": r["label"], "optimizer": r["optimizer"], "optimizer_loss": r["optimizer_loss"],
                   "points": val_curve(r["run_dir"]) if r.get("run_dir") and Path(r["run_dir"]).is_dir() else []}
                  for r in rows]
        png = chart.draw(curves, plan.output_dir / "sweep.png")
    if status != "finished":
        line = f"(sweep {status} after {len(rows)} of {len(plan.runs)} runs) " + line
    md = [f"# Optimizer sweep: {len(rows)} of {len(plan.runs)} runs, {plan.steps} steps each ({status})", ""]
    md += [f"- {n}" for n in plan.notes] + ([""] if plan.notes else [])
    md += [table, f"**{line}**", "", "val loss: the held-out images' loss at fixed timesteps and noise (mean ± sample "
           "SD over seeds); end vs raw: final validation loss minus the raw-fed run's, or \"identical\" when the "
           "LoRAs are bit-identical; loss CV: per-step coefficient of variation of the loss the optimizer got "
           "(for withheld: of the raw loss it did not get); update ratio: mean |LoRA update| / |LoRA| per step; "
           "zones: share of steps in each zone of the optimizer (docs/sweep.md).", ""]
    atomic_write_text(plan.output_dir / "sweep.md", "\n".join(md))
    _write(plan, status, rows, line)
    if on_progress is not None:
        on_progress(len(rows), len(plan.runs), 0.0 if status == "finished" else None, None)
    log.info("sweep %s: %s", status, line)
    return SweepResult(rows, winner, line, table, png, status, str(plan.output_dir), list(plan.notes), loads)
