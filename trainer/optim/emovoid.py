"""EmoVoid v3.9.1: sign(g) at emoPulse with a group-0 L1-norm lock during the first steps (optimizers.md §11).

Unlike upstream, p.grad is not overwritten with its sign (gradient logging or accumulation after step()
would see signs). betas, eps and weight_decay are accepted and unused, as upstream.
"""

from ._tensors import scale_
from ._v39 import EmoV39
from ._wref import group0_l1

WARMUP_LAST = 55  # rescale while the counter is <= 55: steps 2..56, and once more after each stop edge


def void_rule(p, g, st, pulse):
    p.add_(g.sign(), alpha=-pulse)


class EmoVoid(EmoV39):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.prev_gl1 = None
        self.warmup_count = 0

    def _before_update(self):
        gl1 = group0_l1(self)
        k = self.warmup_count
        self.warmup_count = k + 1
        rho = 1.0
        if self.prev_gl1 is not None and k <= WARMUP_LAST:
            prev = self.prev_gl1.to(gl1.device)
            rho = prev / (gl1 + 1e-8)  # stays on the device: the multiply takes it as a scalar tensor
            scale_(self.param_groups[0]["params"], rho)
            gl1 = gl1 * rho
        self.prev_gl1 = gl1
        return {"rescale": rho, "warmup_count": float(self.warmup_count)}

    def _on_stop_edge(self):
        self.warmup_count = WARMUP_LAST  # restart: one more rescale on the next step

    def _update(self, group, items, pulse):
        self._apply(void_rule, items, (), pulse=pulse)

    def _extra_state(self):
        return {**super()._extra_state(), "prev_gl1": self.prev_gl1, "warmup_count": self.warmup_count}

    def _load_extra_state(self, extra):
        super()._load_extra_state(extra)
        self.prev_gl1 = extra.get("prev_gl1")
        self.warmup_count = extra.get("warmup_count", 0)
