"""EmoSens v3.9.1: AdamW without bias correction whose step size is emoPulse (optimizers.md §7)."""

from ._adam import adam_step
from ._v39 import EmoV39


class EmoSens(EmoV39):
    def __init__(self, *args, fused=False, **kw):
        super().__init__(*args, **kw)
        self.fused = fused

    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)
        state["exp_avg_sq"] = self._zeros(p)

    def _update(self, group, items, pulse):
        adam_step(self, group, items, lr=pulse, lr_wd=pulse)
