"""Path safety: what the panel serves lies inside its output folder; what its start form reads lies inside the
configured model and data roots.

The output folder ("root") holds the LoRA files and runs/ (one folder per run), as the trainer lays them out
by default (runs_dir = <output's folder>/runs). A run is named by its folder name; a file is accepted only when
its fully resolved path (symlinks followed) is inside the root, so '..', absolute paths and symlinks that point
out are all refused. A run's private files (its resumable state, its telemetry database) are never served.
"""

import re
from pathlib import Path

from ...trainer.runstore import DB_NAME

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
# Never offered for download, whatever the suffix filter: the resumable state (the state/ folder, state.pt) and
# the telemetry database with its SQLite side files.
PRIVATE_DIRS = {"state"}
PRIVATE_NAMES = {"state.pt", DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"}


class PathError(ValueError):
    """A requested run or file is outside the output folder (or does not exist, or is private)."""


def resolve(path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise PathError(f"cannot resolve {path}: {e}") from None


class PanelRoot:
    def __init__(self, folder):
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.root = folder.resolve()
        direct = any((d / DB_NAME).is_file() for d in self.root.iterdir() if d.is_dir())
        # A runs folder given directly (it holds run folders and no runs/) is used as it is.
        self.runs_dir = self.root if direct and not (self.root / "runs").is_dir() else self.root / "runs"

    def inside(self, path) -> Path:
        """`path` resolved, if it lies inside the root; PathError otherwise."""
        resolved = resolve(path)
        if not resolved.is_relative_to(self.root):
            raise PathError(f"{path} is outside the output folder {self.root}")
        return resolved

    def run_dir(self, name) -> Path:
        """The folder of run `name` (a plain folder name under runs/)."""
        if not isinstance(name, str) or not SAFE_NAME.match(name) or name in (".", ".."):
            raise PathError(f"not a run name: {name!r}")
        runs = self.runs_dir.resolve()
        path = self.inside(runs / name)
        if path.parent != runs or not (path / DB_NAME).is_file():
            raise PathError(f"no run named {name!r} in {runs}")
        return path

    def file(self, path, suffixes=None) -> Path:
        """An existing regular, servable file inside the root (optionally with one of `suffixes`)."""
        resolved = self.inside(path)
        private = resolved.name.lower() in PRIVATE_NAMES or PRIVATE_DIRS & set(resolved.relative_to(self.root).parts)
        if private:
            raise PathError(f"{path} is a run's private file (state or telemetry): not served")
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


class Roots:
    """The folders the start form may read a kind of input from ("model", "dataset"): a path typed in the form
    is taken relative to the first root and must resolve (symlinks followed) inside one of them."""

    def __init__(self, kind: str, flag: str, folders):
        self.kind, self.flag = kind, flag
        self.folders = [resolve(f) for f in folders]

    def __str__(self) -> str:
        return ", ".join(map(str, self.folders)) or "(none)"

    def resolve(self, path) -> Path:
        if not isinstance(path, str) or not path.strip():
            raise PathError(f"{self.kind}: no path given")
        p = Path(path.strip()).expanduser()
        if not p.is_absolute() and self.folders:
            p = self.folders[0] / p
        resolved = resolve(p)
        if not any(resolved.is_relative_to(f) for f in self.folders):
            raise PathError(f"{self.kind} {path!r} is outside the allowed folders ({self}); start the panel with "
                            f"{self.flag} DIR to allow another folder")
        return resolved

    def scan(self, want, limit: int = 200, depth: int = 2) -> list[str]:
        """Paths under the roots (up to `depth` levels down) for which want(path) is true, sorted, at most
        `limit`; hidden folders are skipped. Used for the form's choices, so cheap and best-effort."""
        out: list[str] = []
        level = [f for f in self.folders if f.is_dir()]
        for _ in range(depth):
            nxt = []
            for folder in level:
                try:
                    children = sorted(folder.iterdir())
                except OSError:
                    continue
                for c in children:
                    if c.name.startswith("."):
                        continue
                    if want(c):
                        out.append(str(c))
                    elif c.is_dir():
                        nxt.append(c)
                    if len(out) >= limit:
                        return out
            level = nxt
        return out
