"""The rules checked after every step that may end a run or warn once: the optimizer's should_stop flag, a
diverging run (trainer/rollback.py), a LoRA that barely moves (telemetry.MotionCheck), too many non-finite steps
in a row. Each is logged and recorded as an event in the run folder."""

import logging

__all__ = ["check_step"]

log = logging.getLogger("emolora.train")


def check_step(cfg, loop, store, record: dict, *, stop_reason, auto_stop: str, guard, motion):
    """After step loop.step: -> (stop_reason, the stop's message or None, the barely-moving warning or None).
    stop_reason: what already stops the run (None: nothing); auto_stop: stop / mark / off, as now set."""
    step, message = loop.step, None
    flag = record["should_stop"]
    if flag != loop.should_stop_prev:
        store.event(step, "should_stop", {"value": flag, "auto_stop": auto_stop})
        if flag:
            log.info("step %d: the optimizer signals should_stop (auto_stop=%s)", step, auto_stop)
        loop.should_stop_prev = flag
    if flag and auto_stop == "stop" and cfg.auto_stop_on == "should_stop" and step < cfg.steps:
        stop_reason = "should_stop"
    diverged = guard.diverged_message(loop)
    if diverged is not None and stop_reason is None:
        log.error(diverged)
        store.event(step, "diverged", {"message": diverged, "optimizer": cfg.optimizer})
        stop_reason, message = "diverged", diverged
    still = motion.message(cfg)  # once, when the first window's update ratios are all in
    if still is not None:
        log.warning(still)
        store.event(step, "barely_moving", {"message": still, "optimizer": cfg.optimizer, "lr": cfg.lr,
                                            "update_ratio": motion.mean})
    if loop.consecutive_skips >= cfg.max_consecutive_skips:
        log.error("%d non-finite steps in a row: stopping", loop.consecutive_skips)
        stop_reason = "nonfinite"
    return stop_reason, message, still
