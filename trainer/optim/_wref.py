"""The group-0 L1 norm that EmoTion and EmoVoid watch ("W-Ref geometry").

Upstream sums torch._foreach_norm in the parameter dtype, so fp16 norms overflow to inf and poison the
optimizer with NaN; here every norm is taken in float32 and summed on the first parameter's device (one
stack and sum instead of a python sum: another summation order, the same maths).
"""

import torch


def group0_l1(opt) -> torch.Tensor:
    """A 0-dim float32 tensor on the first parameter's device; one stacked sum, so no op per tensor."""
    params = opt.param_groups[0]["params"]
    norms = torch._foreach_norm(params, 1, dtype=torch.float32)
    dev = params[0].device
    if any(n.device != dev for n in norms):
        norms = [n.to(dev) for n in norms]
    return torch.stack(norms).sum()
