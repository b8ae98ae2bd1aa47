"""The optimizer family: the Emo optimizers, RefAdamW-mini-SF, AutoTrustGO and the EmoPulse scheduler.

    OPTIMIZERS       upstream class name -> class (exactly the 13 upstream optimizers)
    OPTIMIZER_INFO   name -> OptimizerInfo (family, description, version, recommended LR, state, signals)
    create_optimizer(name, params, **kwargs)   also "AdamW" (torch) as the baseline
    takes_loss(opt)  whether opt.step accepts loss=
    constructor_defaults(name)   keyword -> default of its constructor (the nodes' and the panel's defaults)
"""

from ._info import OPTIMIZER_INFO, OptimizerInfo

__all__ = ["OPTIMIZERS", "OPTIMIZER_INFO", "OptimizerInfo", "EmoPulseScheduler", "constructor_defaults",
           "create_optimizer", "optimizer_class", "takes_loss"]


_LAZY = {"OPTIMIZERS", "EmoPulseScheduler", "constructor_defaults", "create_optimizer", "optimizer_class",
         "takes_loss"} | set(OPTIMIZER_INFO) - {"AdamW"}


def __getattr__(name):
    """Everything but the metadata loads on first use, so `import trainer.optim` stays torch-free (the
    ComfyUI nodes and the panel read OPTIMIZER_INFO at start-up). Other names (submodules being imported)
    take the normal path."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    _registry = importlib.import_module(f"{__name__}._registry")  # not `from . import`: that calls back here
    try:
        return getattr(_registry, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
