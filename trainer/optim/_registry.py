"""The registry: upstream class name -> our class, and the factory (imports torch; see __init__)."""

from .autotrustgo import AutoTrustGO
from .emoairy import EmoAiry
from .emocats import EmoCats
from .emoclan import EmoClan
from .emofact import EmoFact
from .emolynx import EmoLynx
from .emonavi import EmoNavi
from .emoneco import EmoNeco
from .emopulse import EmoPulseScheduler  # noqa: F401  (re-exported by the package)
from .emosens import EmoSens
from .emotion import EmoTion
from .emovoid import EmoVoid
from .emozeal import EmoZeal
from .refadamw import RefAdamWminiScheduleFree

OPTIMIZERS = {cls.__name__: cls for cls in (
    EmoNavi, EmoFact, EmoLynx, EmoClan, EmoZeal, EmoNeco, EmoSens, EmoAiry, EmoCats, EmoTion, EmoVoid,
    RefAdamWminiScheduleFree, AutoTrustGO,
)}


def create_optimizer(name: str, params, **kwargs):
    """Build an optimizer by registry name (or "AdamW" for torch's) with upstream keyword arguments."""
    if name == "AdamW":
        import torch

        return torch.optim.AdamW(params, **kwargs)
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: AdamW, {', '.join(OPTIMIZERS)}") from None
    kwargs = {**getattr(cls, "factory_kwargs", {}), **kwargs}  # our guards that the bare class leaves off
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, **kwargs)


def takes_loss(opt) -> bool:
    """True for our optimizers: their step() wants the real loss as loss=."""
    from ._base import EmoOptimizer

    return isinstance(opt, EmoOptimizer)
