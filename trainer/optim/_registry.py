"""The registry: upstream class name -> our class, and the factory (imports torch; see __init__)."""

import inspect

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
    cls = optimizer_class(name)
    if name == "AdamW":
        return cls(params, **kwargs)
    kwargs = {**getattr(cls, "factory_kwargs", {}), **kwargs}  # our guards that the bare class leaves off
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, **kwargs)


def optimizer_class(name: str):
    """Our class for a registry name, or torch's AdamW for "AdamW"."""
    if name == "AdamW":
        import torch

        return torch.optim.AdamW
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: AdamW, {', '.join(OPTIMIZERS)}") from None


def constructor_defaults(name: str) -> dict:
    """keyword -> default of the optimizer's constructor, for every keyword that has one: the subclass's first,
    following *args/**kwargs up the class chain (our classes pass their upstream keywords on to a base)."""
    out: dict = {}
    for klass in optimizer_class(name).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.default is not inspect.Parameter.empty and p.name not in out:
                out[p.name] = p.default
        if not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            break
    return out


def takes_loss(opt) -> bool:
    """True for our optimizers: their step() wants the real loss as loss=."""
    from ._base import EmoOptimizer

    return isinstance(opt, EmoOptimizer)
