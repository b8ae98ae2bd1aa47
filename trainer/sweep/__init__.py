"""The optimizer sweep: which optimizer suits this data, and does feeding it the loss matter?

    parse_optimizer_list(text) -> names           "all", "emo" or a comma list
    plan_sweep(base_cfg, optimizers, ...) -> SweepPlan   validated, before any model loads (plan.py)
    run_sweep(plan, stop_event=, on_progress=, on_step=) -> SweepResult   one model load for all runs (run.py)
    load_sweep(dir) -> dict                       DIR/sweep.json, also while the sweep runs
    resume_plan(dir) -> SweepPlan                 the plan of a stopped or killed sweep, to run it on

Modules: plan.py (the runs, bad input), session.py (the shared model and caches, SweepTrainer), report.py
(rows, table, recommendation), chart.py (sweep.png), run.py (the loop, sweep.json, resume).
"""

from .plan import EMO, LOSS_READERS, RunSpec, SweepPlan, parse_optimizer_list, plan_sweep
from .run import SweepResult, load_sweep, resume_plan, run_sweep

__all__ = ["EMO", "LOSS_READERS", "RunSpec", "SweepPlan", "SweepResult", "load_sweep", "parse_optimizer_list",
           "plan_sweep", "resume_plan", "run_sweep"]
