"""Run folders: the telemetry store a panel reads while training runs, and a file-based control channel.

    <runs_dir>/<run_name>/
        config.json        the resolved TrainConfig
        telemetry.sqlite   SQLite (WAL mode; see journal_mode): steps(step, t, data), events(id, step, t, kind,
                           data), meta
        control.json       {"stop", "save_now", "auto_stop"}: written by RunController, polled by the trainer
        dataset.txt        one line per skipped/converted file and the summary
        state/             the resumable training state
        samples/           sample images

WAL lets readers in other threads or processes query while the trainer writes; each step is one INSERT and
one commit (synchronous=NORMAL: no fsync per commit). Step records are JSON objects with every field the
trainer logged (loss, lr, the optimizer's signals, timings, memory), so new signals need no schema change.
No torch import here: the panel process reads runs without it.

WAL needs shared memory beside the database (-shm), which a network drive cannot give and a sync client
(OneDrive, Dropbox, ...) breaks by copying the three files separately: there the store uses the classic rollback
journal (readers and the writer take turns; busy_timeout covers the waits) and says so (meta journal_note).
"""

import json
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from .atomic import atomic_write_json

log = logging.getLogger("emolora.runstore")
DB_NAME = "telemetry.sqlite"
CONTROL_NAME = "control.json"
STATUSES = ("running", "finished", "stopped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, t REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER, t REAL NOT NULL,
                                   kind TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def _clean(obj):
    """JSON-safe: non-finite floats become null (JSON has no NaN), numbers stay numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    try:
        return _clean(float(obj))  # numpy scalars, 0-dim tensors that slipped through
    except (TypeError, ValueError):
        return str(obj)


def _dumps(obj) -> str:
    return json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False)


SYNCED_FOLDERS = ("onedrive", "dropbox", "google drive", "googledrive", "icloud drive", "iclouddrive", "box sync",
                  "nextcloud", "owncloud", "syncthing")


def wal_unsafe_reason(folder) -> str | None:
    """Why WAL must not be used in `folder`: a network share (a UNC path, or on Windows a drive the system reports
    as remote) or a sync client's folder (by the names those clients give their folders). None: a local folder."""
    text = str(folder)
    if text.startswith(("\\\\", "//")):
        return f"{text} is a network share"
    if os.name == "nt":
        import ctypes

        drive = os.path.splitdrive(os.path.abspath(text))[0]
        if drive and ctypes.windll.kernel32.GetDriveTypeW(drive + "\\") == 4:  # DRIVE_REMOTE
            return f"{drive} is a network drive"
    parts = [p.lower() for p in Path(text).parts]
    synced = next((p for p in parts if any(p == s or p.startswith(s + " ") or p.startswith(s + "-")
                                            for s in SYNCED_FOLDERS)), None)
    return f"{text} is in a synced folder ({synced})" if synced else None


def set_journal(db, folder) -> tuple[str, str | None]:
    """WAL where it works, else the rollback journal (DELETE). -> (mode, a note saying why not WAL, or None)."""
    reason = wal_unsafe_reason(folder)
    if reason is None:
        try:
            mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as e:
            mode, reason = "error", f"SQLite could not switch to WAL there ({e})"
        if mode == "wal":
            return "wal", None
        reason = reason or f"SQLite refused WAL there (journal mode {mode})"
    db.execute("PRAGMA journal_mode=DELETE")
    return "delete", (f"telemetry without WAL: {reason}; readers and the trainer take turns on the database "
                      "(a little slower), and live charts still work")


class RunStore:
    """The trainer's writer for one run folder."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.run_dir / DB_NAME, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self.journal_mode, self.journal_note = set_journal(self._db, self.run_dir)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if self.journal_note:
            log.warning("%s", self.journal_note)
            self.set_meta(journal_mode=self.journal_mode, journal_note=self.journal_note)

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def samples_dir(self) -> Path:
        return self.run_dir / "samples"

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.run_dir / "config.json", config)

    def log_step(self, step: int, record: dict) -> None:
        """One step's record; a step logged again (after a resume) replaces the old row."""
        t = record.get("t", time.time())
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO steps (step, t, data) VALUES (?, ?, ?)",
                             (int(step), float(t), _dumps(record)))

    def event(self, step: int | None, kind: str, data=None) -> None:
        """should_stop (rise/fall), save, state, stop, sample, eval, resume, dataset, error ..."""
        with self._lock:
            self._db.execute("INSERT INTO events (step, t, kind, data) VALUES (?, ?, ?, ?)",
                             (step, time.time(), kind, None if data is None else _dumps(data)))

    def set_meta(self, **values) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [(k, _dumps(v)) for k, v in values.items()])

    def truncate_after(self, step: int) -> None:
        """On resume: drop what a killed run logged after its last saved state; it is about to be redone."""
        with self._lock:
            self._db.execute("DELETE FROM steps WHERE step > ?", (int(step),))

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                self._db.close()


def barely_moving_message(events) -> str | None:
    """The trainer's one-time "barely changed the LoRA ... try a higher LR" warning among a run's events (its
    barely_moving event), or None."""
    for e in reversed(events):
        d = e.get("data")
        if e["kind"] == "barely_moving" and isinstance(d, dict) and isinstance(d.get("message"), str):
            return d["message"]
    return None


class RunReader:
    """Read a run while it trains (another thread or process) or after. Each call is one short transaction."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._db = None
        self._lock = threading.Lock()

    @staticmethod
    def list_runs(runs_dir) -> list[dict]:
        """Runs under `runs_dir` (or an output folder holding runs/), newest first: name, run_dir, meta."""
        runs_dir = Path(runs_dir)
        if (runs_dir / "runs").is_dir() and not (runs_dir / DB_NAME).exists():
            runs_dir = runs_dir / "runs"
        if not runs_dir.is_dir():
            return []
        out = []
        for d in runs_dir.iterdir():
            if (d / DB_NAME).is_file():
                reader = RunReader(d)
                try:
                    meta = reader.meta()
                finally:
                    reader.close()
                out.append({"name": d.name, "run_dir": str(d), "mtime": (d / DB_NAME).stat().st_mtime,
                            **meta})
        return sorted(out, key=lambda r: r.get("started_at") or r["mtime"], reverse=True)

    def _conn(self):
        if self._db is None:
            path = self.run_dir / DB_NAME
            if not path.is_file():
                return None
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
        return self._db

    def _query(self, sql: str, args=()) -> list:
        with self._lock:
            db = self._conn()
            if db is None:
                return []
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):  # the writer is between creating the file and the schema
                    return []
                raise

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")}

    def config(self) -> dict:
        path = self.run_dir / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def steps(self, since: int = -1, limit: int | None = None) -> list[dict]:
        """Step records with step > since, in order; each has 'step' and 't' besides the logged fields."""
        sql = "SELECT step, t, data FROM steps WHERE step > ? ORDER BY step"
        rows = self._query(sql + (" LIMIT ?" if limit else ""), (since, limit) if limit else (since,))
        return [{**json.loads(d), "step": s, "t": t} for s, t, d in rows]

    def events(self, since_id: int = 0, kind: str | None = None) -> list[dict]:
        """Events with id > since_id (pass the last id seen to poll for new ones)."""
        sql, args = "SELECT id, step, t, kind, data FROM events WHERE id > ?", [since_id]
        if kind:
            sql, args = sql + " AND kind = ?", [*args, kind]
        rows = self._query(sql + " ORDER BY id", args)
        return [{"id": i, "step": s, "t": t, "kind": k, "data": json.loads(d) if d else None}
                for i, s, t, k, d in rows]

    def last_step(self) -> int | None:
        rows = self._query("SELECT MAX(step) FROM steps")
        return rows[0][0] if rows else None

    def is_alive(self) -> bool:
        """Status 'running' and its process still exists (a killed trainer leaves 'running' behind)."""
        return meta_alive(self.meta())

    def saved_step(self) -> int | None:
        """The step of the last resumable state written (its 'state' event), None if none was."""
        rows = self._query("SELECT MAX(step) FROM events WHERE kind = 'state'")
        return rows[0][0] if rows else None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def meta_alive(meta: dict) -> bool:
    """A run's meta says 'running' and its process still exists: same pid and, where both are known, the same
    process start time (a restarted ComfyUI in a container often gets its old pid back). A run on another host
    counts as alive: its process cannot be checked from here."""
    if meta.get("status") != "running":
        return False
    pid = meta.get("pid")
    if not isinstance(pid, int) or meta.get("host") not in (None, _host()):
        return True
    return _pid_alive(pid, meta.get("pid_started"))


# What a run that can continue was stopped by, in words: the trainer's stop_reason -> the label the node and the
# panel show. "closed": a host trained it in slices and closed it between two. A run whose process vanished while
# 'running' (killed, or ComfyUI restarted) is "interrupted".
RESUMABLE = {"stopped": "stopped", "closed": "stopped", "interrupted": "cancelled"}


def run_state(meta: dict) -> str:
    """The run's status as shown: running / finished / stopped / failed, or interrupted (process gone)."""
    status = meta.get("status", "starting")
    if status == "running" and not meta_alive(meta):
        return "interrupted"
    return status


def unfinished_runs(runs_dir) -> list[dict]:
    """The runs under `runs_dir` that can continue where they stopped, newest first: stopped or cancelled with
    steps left, or interrupted (process gone), each with a saved state. Each: name, run_dir, step (of the saved
    state, where a resume continues), steps_total, optimizer, how (stopped / cancelled / interrupted)."""
    out = []
    for r in RunReader.list_runs(runs_dir):
        state = run_state(r)
        how = "interrupted" if state == "interrupted" else (
            RESUMABLE.get(r.get("stop_reason")) if state == "stopped" else None)
        if how is None or not (Path(r["run_dir"]) / "state" / "state.pt").is_file():
            continue
        reader = RunReader(r["run_dir"])
        try:
            step = reader.saved_step()
        finally:
            reader.close()
        total = r.get("steps_total")
        if step is None or (isinstance(total, int) and step >= total):
            continue
        out.append({"name": r["name"], "run_dir": r["run_dir"], "step": int(step), "steps_total": total,
                    "optimizer": r.get("optimizer"), "how": how})
    return out


def _host() -> str:
    import socket

    return socket.gethostname()


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None where it cannot be told. psutil when installed
    (ComfyUI requires it); else Linux's /proc and Windows' GetProcessTimes. The readings agree to well under a
    second, which is the tolerance _pid_alive allows."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except ImportError:
        pass
    except Exception:
        return None
    if os.name == "nt":
        return _windows_started(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name in parentheses
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _windows_started(pid: int) -> float | None:
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.windll.kernel32
    handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return None
    try:
        times = [wintypes.FILETIME() for _ in range(4)]
        if not k32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
            return None
        created = (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime  # 100 ns since 1601
        return created / 1e7 - 11644473600.0
    finally:
        k32.CloseHandle(handle)


def _pid_alive(pid: int, started: float | None = None) -> bool:
    """Process `pid` exists and, when `started` is given and its start time can be read, started then (else the
    pid was reused by another process after the trainer's died)."""
    if pid == os.getpid():
        return started is None or _same_start(pid, started)
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; ask the kernel instead
        import ctypes

        k32 = ctypes.windll.kernel32
        handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:  # an exited process stays openable while anyone holds a handle to it: ask for its exit code
            code = ctypes.c_ulong()
            if k32.GetExitCodeProcess(handle, ctypes.byref(code)) and code.value != 259:  # STILL_ACTIVE
                return False
        finally:
            k32.CloseHandle(handle)
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # exists but belongs to another user
    return started is None or _same_start(pid, started)


def _same_start(pid: int, started) -> bool:
    now = process_started(pid)
    return now is None or not isinstance(started, (int, float)) or abs(now - started) < 1.0


# ---- control channel ------------------------------------------------------------------------------------------
DEFAULT_CONTROL = {"stop": False, "save_now": 0, "auto_stop": None}


class RunController:
    """What a panel or a node does to a running trainer: stop, save now, change auto_stop.

    Writes control.json atomically; the trainer notices within a step. Controllers in one process are
    serialised by a lock; two processes writing in the same instant may lose one request (last write wins).
    """

    _locks: dict = {}

    def __init__(self, run_dir):
        self.path = Path(run_dir) / CONTROL_NAME
        self._lock = RunController._locks.setdefault(str(self.path.resolve()), threading.Lock())

    def read(self) -> dict:
        return read_control(self.path)

    def _update(self, **changes) -> dict:
        with self._lock:
            state = {**self.read(), **changes}
            state["seq"] = int(state.get("seq", 0)) + 1
            atomic_write_json(self.path, state)
            return state

    def request_stop(self) -> None:
        """Save the LoRA and the state, then end the run (status 'stopped')."""
        self._update(stop=True)

    def request_save(self) -> int:
        """Save the LoRA (and the state) at the next step boundary; returns the request number."""
        with self._lock:
            state = self.read()
        return self._update(save_now=int(state.get("save_now", 0)) + 1)["save_now"]

    def set_auto_stop(self, mode: str) -> None:
        if mode not in ("stop", "mark", "off"):
            raise ValueError(f"auto_stop must be 'stop', 'mark' or 'off', got {mode!r}")
        self._update(auto_stop=mode)


def read_control(path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(DEFAULT_CONTROL)
    return {**DEFAULT_CONTROL, **data} if isinstance(data, dict) else dict(DEFAULT_CONTROL)


class ControlPoller:
    """The trainer's side: a stat() per step; the file is re-read when it changed, or once a second anyway
    (coarse mtime clocks can hide two writes within one tick)."""

    def __init__(self, run_dir, auto_stop: str):
        self.path = Path(run_dir) / CONTROL_NAME
        atomic_write_json(self.path, {**DEFAULT_CONTROL, "auto_stop": auto_stop, "seq": 0})
        self._sig = None
        self._read_at = 0.0
        self.state = read_control(self.path)

    def poll(self) -> dict:
        try:
            st = os.stat(self.path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            sig = None
        now = time.monotonic()
        if sig != self._sig or now - self._read_at > 1.0:
            self._sig, self._read_at = sig, now
            self.state = read_control(self.path)
        return self.state
