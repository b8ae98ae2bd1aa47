"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never half of one.

The one writer for every file the project produces (LoRAs, state.pt, config/control JSON, sample PNGs,
feature-cache entries, the test checkpoints). The new data is fsynced before the rename and the folder
after it, so a power cut cannot leave an empty file under the final name. The temporary file is created
with mode 0666 and the kernel applies the umask, so the result has the permissions a plain open() gives:
mkstemp's 0600 would hide LoRAs and run files from e.g. a ComfyUI service user.
"""

import json
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

log = logging.getLogger("emolora.atomic")

# Windows refuses to replace a file another process holds open (ComfyUI's memory-mapped LoRA, an antivirus scan,
# a sync client): PermissionError (WinError 5/32). Short holds pass within this time; a loaded LoRA does not.
REPLACE_WAIT_S = 3.0


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open() (or mkdir()) gives under the current umask."""
    try:  # Linux exposes the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _temp_name(path: Path) -> Path:
    # Hidden, beside the target (same filesystem, so the rename is atomic), unique per call.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def fsync_dir(folder) -> None:
    """Persist a folder's entries (a rename in it). A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and all of Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def replace(src, dst, wait_s: float = REPLACE_WAIT_S) -> None:
    """os.replace, retried with growing pauses for up to wait_s while it raises PermissionError (Windows: the
    target is held open by another process); the last PermissionError propagates."""
    end, pause = time.monotonic() + wait_s, 0.05
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if time.monotonic() + pause > end:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def free_name(path: Path) -> Path:
    """<stem>-2<suffix>, -3, ...: the first name beside `path` that no file has."""
    n = 2
    while path.with_name(f"{path.stem}-{n}{path.suffix}").exists():
        n += 1
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def atomic_write(path, write, *, new_name_if_held: bool = False) -> Path:
    """Call write(tmp_path) for a new temporary file beside `path`, fsync it, rename it over `path`, fsync
    the folder. If write raises, the temporary file is removed and the old `path` is untouched. Returns the
    path written: with new_name_if_held, a `path` that another process keeps open past REPLACE_WAIT_S
    (Windows) is left as it is and the data goes to free_name(path) instead, with a warning naming both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 less the umask, as the kernel applied it
        os.close(fd)
        write(str(tmp))
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0600 one of their own
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            replace(tmp, path)
        except PermissionError as e:
            if not new_name_if_held:
                raise
            held, path = path, free_name(path)
            os.replace(tmp, path)  # a new name: nothing holds it
            log.warning("could not replace %s (%s; on Windows: another program, e.g. ComfyUI with this LoRA "
                        "loaded, holds it open): saved as %s instead", held, e.strerror or e, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes, *, new_name_if_held: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), new_name_if_held=new_name_if_held)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_directory(path, build) -> Path:
    """Call build(tmp_dir) for a new empty folder beside `path`, then move it to `path` (replacing an old one).

    The folder is made with mkdir's umask permissions (mkdtemp's 0700 would hide it). If another process
    put a complete `path` in place first, the loser's copy is discarded (the builders here are deterministic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:
            continue
    try:
        build(tmp)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        try:
            replace(tmp, path)
        except OSError:  # a concurrent builder's folder landed in between: keep theirs
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path.parent)
    return path
