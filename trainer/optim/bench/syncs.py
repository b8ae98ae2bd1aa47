"""Host-sync counting: wrapped torch.Tensor host-transfer methods on the CPU, sync-debug mode 'warn' on CUDA."""

import warnings
from collections import Counter

import torch

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
_MISSING = object()


class SyncCounter:
    """Counts calls of the host-transfer methods of torch.Tensor while active (outermost call only)."""

    def __init__(self):
        self.count = 0
        self.by_name = Counter()
        self._depth = 0
        self._saved = {}

    def _wrap(self, name, orig):
        def wrapper(t, *args, **kwargs):
            if self._depth == 0:
                self.count += 1
                self.by_name[name] += 1
            self._depth += 1
            try:
                return orig(t, *args, **kwargs)
            finally:
                self._depth -= 1

        wrapper.__name__ = name
        return wrapper

    def __enter__(self):
        for name in SYNC_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc):
        for name, saved in self._saved.items():
            if saved is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        self._saved = {}
        return False


class CudaSyncCounter:
    """Counts the synchronizing CUDA operations torch reports in sync-debug mode 'warn'."""

    def __init__(self):
        self.count = 0
        self.by_name = Counter()

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        self._prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._prev)
        self._cm.__exit__(*exc)
        for w in self._log:
            if "synchroniz" in str(w.message).lower():
                self.count += 1
                self.by_name[str(w.message).splitlines()[0][:60]] += 1
        return False
