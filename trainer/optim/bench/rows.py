"""The benchmark rows: our optimizers, the torch AdamW baselines, EmoPulse, pytorch_optimizer and the foreach pairs."""

import torch

from .. import OPTIMIZER_INFO, OPTIMIZERS, EmoPulseScheduler


class Row:
    """One optimizer configuration. build(params) -> (optimizer, step(loss, as_tensor, ours_ctx))."""

    def __init__(self, label, build, *, ours, family=None, section="main", name=None, note=""):
        self.label, self.build, self.ours, self.family = label, build, ours, family
        self.section, self.name, self.note = section, name, note


def _our_row(name, label=None, section="main", note="", step_kw=None, prepare=None, **kwargs):
    cls = OPTIMIZERS[name]

    def build(params):
        opt = cls(params, **kwargs)
        if prepare is not None:
            prepare(opt)

        def step(loss, as_tensor, ours_ctx):
            value = torch.tensor(loss, device=params[0].device) if as_tensor else loss
            with ours_ctx():
                opt.step(loss=value, **(step_kw or {}))

        return opt, step

    return Row(label or name, build, ours=True, family=OPTIMIZER_INFO[name].family, section=section, name=name,
               note=note)


def _adamw_row(label, **kwargs):
    def build(params):
        opt = torch.optim.AdamW(params, **kwargs)

        def step(loss, as_tensor, ours_ctx):
            opt.step()

        return opt, step

    return Row(label, build, ours=False, family="adam", section="torch")


def _pulse_row():
    def build(params):
        opt = torch.optim.AdamW(params, foreach=False)
        sched = EmoPulseScheduler(opt, notify=False)

        def step(loss, as_tensor, ours_ctx):
            with ours_ctx():  # only the scheduler is ours; AdamW's per-parameter step.item() is torch's
                sched.step(torch.tensor(loss, device=params[0].device) if as_tensor else loss)
            opt.step()

        return opt, step

    return Row("EmoPulseScheduler+AdamW(foreach=False)", build, ours=True, family="adam", section="scheduler",
               note="syncs counted in EmoPulseScheduler.step only")


def _external_row(name):
    def build(params):
        import pytorch_optimizer

        opt = getattr(pytorch_optimizer, name)(params)

        def step(loss, as_tensor, ours_ctx):
            opt.step(closure=lambda: torch.tensor(loss, device=params[0].device))

        return opt, step

    return Row(f"pytorch_optimizer.{name}", build, ours=False, family=OPTIMIZER_INFO[name].family,
               section="external", name=name, note="foreach=None (its default: foreach on CPU too)")


def _mid_run(opt):
    opt.counters["step"] = 500  # progress 0.5 of max_steps=1000: the ref injection runs every step


# every Emo optimizer: their foreach paths dispatch a constant number of ops (see --dispatch); this measures
# whether per tensor is still the faster CPU default
FOREACH_COMPARE = ("EmoNavi", "EmoFact", "EmoLynx", "EmoClan", "EmoZeal", "EmoNeco", "EmoSens", "EmoAiry", "EmoCats",
                   "EmoTion", "EmoVoid")


def make_rows(external=True, foreach_compare=True):
    rows, notes = [], []
    for name in OPTIMIZERS:
        note = ""
        kw = {}
        if name == "RefAdamWminiScheduleFree":
            kw["step_kw"] = {"max_steps": 1000}
            note = "step(max_steps=1000): progress < 0.2, no ref injection (see the mid-run row)"
        elif name == "EmoVoid":
            note = "timed inside its 56-step norm lock (one rescale per step, its factor kept on the device)"
        rows.append(_our_row(name, note=note, **kw))
    rows.append(_our_row("EmoNavi", "EmoNavi(fused=True)", section="fused", fused=True))
    rows.append(_our_row("EmoSens", "EmoSens(fused=True)", section="fused", fused=True))
    rows.append(_our_row("RefAdamWminiScheduleFree", "RefAdamWminiScheduleFree(mid-run)", section="extra",
                         step_kw={"max_steps": 1000}, prepare=_mid_run,
                         note="step counter at 500 of 1000: ref injection (momentum <- lerp toward p) every step"))
    rows.append(_pulse_row())
    rows.append(_adamw_row("AdamW(foreach=False)", foreach=False))
    rows.append(_adamw_row("AdamW(foreach=True)", foreach=True))
    rows.append(_adamw_row("AdamW(fused=True)", fused=True))
    if external:
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            notes.append("pytorch_optimizer is not installed: its EmoNavi/EmoFact/EmoLynx rows are skipped")
        else:
            for name in ("EmoNavi", "EmoFact", "EmoLynx"):
                rows.append(_external_row(name))
    if foreach_compare:
        for name in FOREACH_COMPARE:
            for fe in (False, True):
                rows.append(_our_row(name, f"{name}(foreach={fe})", section="foreach", foreach=fe))
    return rows, notes
