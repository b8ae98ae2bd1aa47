"""EmoNavi v3.6.1: AdamW without bias correction, its LR scaled by emoDrive (optimizers.md §1)."""

from ._adam import adam_step
from ._v36 import EmoV36


class EmoNavi(EmoV36):
    hist_of_early = True

    def __init__(self, params, lr=1e-3, eps=1e-8, betas=(0.9, 0.995), weight_decay=0.01,
                 use_shadow: bool = False, writer=None, *, fused=False, **kw):
        super().__init__(params, lr, eps, betas, weight_decay, use_shadow, writer, **kw)
        self.fused = fused  # True: torch's fused AdamW kernel where dtypes allow (faster, not bit-exact)

    def _init_moments(self, p, state):
        state["exp_avg"] = self._zeros(p)
        state["exp_avg_sq"] = self._zeros(p)

    def _update(self, group, items, drive):
        adam_step(self, group, items, lr=group["lr"] * drive, lr_wd=group["lr"])
