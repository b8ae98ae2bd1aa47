"""Path safety: everything the panel reads or serves lies inside its output folder.

The output folder ("root") holds the LoRA files and runs/ (one folder per run), as the trainer lays them out
by default (runs_dir = <output's folder>/runs). A run is named by its folder name; a file is accepted only when
its fully resolved path (symlinks followed) is inside the root, so '..', absolute paths and symlinks that point
out are all refused.
"""

import re
from pathlib import Path

from . import _trainer

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")


class PathError(ValueError):
    """A requested run or file is outside the output folder (or does not exist)."""


class PanelRoot:
    def __init__(self, folder):
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.root = folder.resolve()
        db = _trainer.runstore().DB_NAME
        direct = any((d / db).is_file() for d in self.root.iterdir() if d.is_dir())
        # A runs folder given directly (it holds run folders and no runs/) is used as it is.
        self.runs_dir = self.root if direct and not (self.root / "runs").is_dir() else self.root / "runs"

    def inside(self, path) -> Path:
        """`path` resolved, if it lies inside the root; PathError otherwise."""
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # symlink loops
            raise PathError(f"cannot resolve {path}: {e}") from None
        if not resolved.is_relative_to(self.root):
            raise PathError(f"{path} is outside the output folder {self.root}")
        return resolved

    def run_dir(self, name) -> Path:
        """The folder of run `name` (a plain folder name under runs/)."""
        if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
            raise PathError(f"not a run name: {name!r}")
        runs = self.runs_dir.resolve()
        path = self.inside(runs / name)
        if path.parent != runs or not (path / _trainer.runstore().DB_NAME).is_file():
            raise PathError(f"no run named {name!r} in {runs}")
        return path

    def file(self, path, suffixes=None) -> Path:
        """An existing regular file inside the root (optionally with one of `suffixes`)."""
        resolved = self.inside(path)
        if not resolved.is_file():
            raise PathError(f"no such file: {path}")
        if suffixes and resolved.suffix.lower() not in suffixes:
            raise PathError(f"not a {'/'.join(suffixes)} file: {path}")
        return resolved

    def files(self, paths, suffixes=None) -> list[Path]:
        """The acceptable ones among `paths`, in order, without duplicates."""
        out = []
        for p in paths:
            try:
                f = self.file(p, suffixes)
            except PathError:
                continue
            if f not in out:
                out.append(f)
        return out
