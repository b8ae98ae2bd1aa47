"""The trainer package, wherever it lives.

Inside ComfyUI the project is one package (custom_nodes/<pack>/) and the trainer is a sibling of web/, reached
relatively; from the command line `trainer` is top-level. Importing the trainer's run store and config pulls in
no torch; OPTIMIZER_INFO does (trainer.optim imports the optimizers), so it is only imported when asked for.
"""

import importlib
import os
import sys


def _module(name: str):
    if __package__ and __package__.count(".") >= 2:  # <pack>.web.panel: the trainer is <pack>.trainer
        try:
            return importlib.import_module(f"...trainer.{name}" if name else "...trainer", __package__)
        except ImportError:
            pass
    return importlib.import_module(f"trainer.{name}" if name else "trainer")


def runstore():
    return _module("runstore")


def config():
    return _module("config")


def optimizer_info() -> dict:
    """OPTIMIZER_INFO (imports torch); {} when the optimizers cannot be imported here."""
    try:
        return dict(_module("optim").OPTIMIZER_INFO)
    except Exception:  # no torch in this process: the run's own meta still names its signals
        return {}


def package_root() -> str:
    """The folder holding the trainer package: `python -m trainer` works from there."""
    mod = _module("")
    return os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))


def python() -> str:
    return sys.executable
