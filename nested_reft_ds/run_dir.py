"""The run directory (`train.output_dir`): one owner at a time, and an earlier run never mixed with a new one.

Ownership: the job's rank 0 holds an exclusive `flock` on `<output_dir>/.lock` for the run's life, taken before
anything else in the directory is read or written; the other ranks (on any node) learn the outcome from rank 0 by
a collective and never open the lock themselves. The file records the holder (PID, host, the job's rendezvous or
scheduler id, start time, command) so a second job can name it. The kernel (or, on NFS, the lock server) drops an
flock when its process dies however it dies, so a lock file left by a dead job is simply taken over, and its
record rewritten. A filesystem that supports no flock (Lustre without `-o flock`) gets a one-line warning and no
lock: refusing would make such filesystems unusable.

An earlier run in the directory (`earlier_run`) is never started over silently: the recipe refuses, or, told to
overwrite, moves it aside whole into `<output_dir>/previous/<timestamp>/` (`move_aside`), so the lock and a
still-running reader of the directory's path keep working and nothing of the old run is deleted.

Pure: no torch, no deepspeed; rank logic belongs to the caller.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"
PREVIOUS_DIR = "previous"  # earlier runs moved aside by --overwrite, one <timestamp>/ each
# Temporary files our atomic writers leave only when killed mid-write: `.<name>.<pid>.tmp`.
TEMP_FILE = re.compile(r"^\..+\.\d+\.tmp$")


def job_identity() -> str:
    """What identifies this job across its ranks and nodes: the scheduler's job id if any, and the rendezvous."""
    parts = [f"{name}={os.environ[name]}" for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID") if os.environ.get(name)]
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        parts.append(f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    return ", ".join(parts) or "single process"


def describe_holder(record: dict) -> str:
    """'PID 123 on host h (job ..., since ...)' from a lock file's record."""
    text = f"PID {record.get('pid', '?')} on host {record.get('host', '?')}"
    extra = [str(record[key]) for key in ("job", "started") if record.get(key)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _read_record(handle: int) -> dict:
    os.lseek(handle, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(handle, 65536):
        raw += chunk
    try:
        record = json.loads(raw.decode() or "{}")
        return record if isinstance(record, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


class RunDirLock:
    """An exclusive flock on `<output_dir>/.lock`; `release()` (or the process's death) frees it.

    `previous`: the record of the dead job whose lock file was taken over, if there was one."""

    def __init__(self, path: Path, handle: int | None, previous: dict | None):
        self.path, self.handle, self.previous = path, handle, previous

    def release(self) -> None:
        """Clear the record (a record found by the next holder then means this process ended without releasing)
        and drop the lock."""
        if self.handle is not None:
            try:
                os.ftruncate(self.handle, 0)
            except OSError:
                pass
            os.close(self.handle)  # closing the only descriptor drops the flock
            self.handle = None


def _as_directory(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"config key 'train.output_dir' has invalid value {str(out_dir)!r}: it is a file, "
                          "expected a directory") from None
    except OSError as error:
        raise ConfigError(f"config key 'train.output_dir' has invalid value {str(out_dir)!r}: cannot create it "
                          f"({error.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'train.output_dir' has invalid value {str(out_dir)!r}: not writable")


def acquire(out_dir: str | Path, job: str | None = None, *, wait_for_record: float = 2.0) -> RunDirLock:
    """Take the run directory's lock for this process, creating the directory if needed; a ConfigError naming the
    holder when another live process holds it. Call on one process per job (rank 0).

    The holder writes its record right after locking: a record still empty is read again for up to
    `wait_for_record` seconds before the error says it is unknown."""
    out_dir = Path(out_dir)
    _as_directory(out_dir)
    path = out_dir / LOCK_FILE
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        deadline = time.monotonic() + wait_for_record
        record = _read_record(handle)
        while not record and time.monotonic() < deadline:
            time.sleep(0.1)
            record = _read_record(handle)
        os.close(handle)
        holder = describe_holder(record) if record else "a process that has not recorded itself yet"
        raise ConfigError(f"train.output_dir {str(out_dir)!r} is in use by another run: {holder}; lock file "
                          f"{str(path)!r} (wait for that run to end, stop it, or choose another train.output_dir)"
                          ) from None
    except OSError as error:
        os.close(handle)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"nested-reft: warning: the filesystem of {str(out_dir)!r} supports no file locks "
              f"({error.strerror}); nothing stops a second run from using this directory at the same time",
              file=sys.stderr, flush=True)
        return RunDirLock(path, None, None)
    previous = _read_record(handle) or None  # a dead job's record: its flock went with it
    record = {"pid": os.getpid(), "host": socket.gethostname(), "job": job or job_identity(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
    os.ftruncate(handle, 0)
    os.lseek(handle, 0, os.SEEK_SET)
    os.write(handle, (json.dumps(record) + "\n").encode())
    os.fsync(handle)
    return RunDirLock(path, handle, previous)


def earlier_run(out_dir: str | Path) -> list[str]:
    """What in `out_dir` belongs to a run already made there: a non-empty metrics.jsonl, and anything in
    checkpoints/ (a `base_model/` alone is not a run: it is rebuilt identically or refused by its fingerprint)."""
    out_dir = Path(out_dir)
    found = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        records = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        found.append(f"metrics.jsonl ({records} records)")
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
        found.append(f"checkpoints ({', '.join(tags) if tags else 'no tag directories'})")
    return found


def move_aside(out_dir: str | Path) -> Path | None:
    """Move every entry of `out_dir` but the lock and earlier moved-aside runs into a new
    `<out_dir>/previous/<YYYYmmdd-HHMMSS>[-n]/`; returns it (None when there was nothing to move). Renames only:
    nothing is copied or deleted. Call while holding the lock."""
    out_dir = Path(out_dir)
    entries = [p for p in out_dir.iterdir() if p.name not in (LOCK_FILE, PREVIOUS_DIR)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir / PREVIOUS_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = out_dir / PREVIOUS_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for entry in entries:
        os.rename(entry, target / entry.name)
    return target


def atomic_write(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically: written to `.<name>.<pid>.tmp` beside it, fsynced, renamed over it. A
    failed write (a full disk) leaves the old file whole and removes its partial copy; a process killed mid-write
    leaves a temp file `remove_temp_files` clears."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_temp_files(out_dir: str | Path) -> list[Path]:
    """Remove the `.<name>.<pid>.tmp` files our atomic writers leave in `out_dir` and `out_dir/checkpoints` when a
    process dies mid-write. Call while holding the lock: no live writer of this run directory exists then."""
    removed = []
    for folder in (Path(out_dir), Path(out_dir) / "checkpoints"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and TEMP_FILE.match(path.name):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed
