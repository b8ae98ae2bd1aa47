"""The group-0 L1 norm that EmoTion and EmoVoid watch ("W-Ref geometry").

Upstream sums torch._foreach_norm in the parameter dtype, so fp16 norms overflow to inf and poison the
optimizer with NaN; here every norm is taken in float32 and summed on the first parameter's device.
"""

import torch


def group0_l1(opt) -> torch.Tensor:
    params = opt.param_groups[0]["params"]
    norms = torch._foreach_norm(params, 1, dtype=torch.float32)
    dev = params[0].device
    total = norms[0].to(dev)
    for n in norms[1:]:
        total = total + n.to(dev)
    return total
