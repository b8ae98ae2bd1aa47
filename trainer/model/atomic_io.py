"""Atomic file replacement: readers (ComfyUI, a crash) see the old file or the complete new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give under the current umask."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it back at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp) for a temp file in the target's folder, fsync it, then rename it over path.

    mkstemp creates 0600 files; the result gets ordinary umask permissions so other processes
    (e.g. a ComfyUI service user) can read exported LoRAs.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
