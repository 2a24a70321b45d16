"""Fail-stop for multi-rank jobs: an exception on any rank ends every rank within seconds.

Without this, a rank that raises leaves the others blocked in their next collective until the process-group
timeout (30 minutes by default, forever under some NCCL settings), and a launcher that only watches its own
node (pdsh, srun without --kill-on-bad-exit) never notices. Here:

- the first rank to fail prints its traceback once, every line tagged `[rank R]`, publishes an abort record in the
  job's c10d store (reachable from every node) and leaves with `os._exit`: tearing down a process group whose
  peers are mid-collective can block;
- every rank runs a watchdog thread that polls the store; on an abort record, or when the store itself is gone
  (its host rank died, e.g. killed with SIGKILL), it prints one line naming the failed rank and leaves;
- a rank failing after that (typically in a collective broken by the first failure) prints one line;
- the watchdog also leaves when the job's launcher is gone (`launcher_processes`): a SIGINT or SIGTERM sent only to
  the `deepspeed` command ends that process at once (it has no handler in a single-node run) and leaves
  `deepspeed.launcher.launch` and the ranks running, so each rank watches its launcher and the process that
  started it, and stops within a poll of either ending (and so releases the run directory's lock);
- `ConfigError` (bad config, data or path) is a user error: one line, exit 2, no traceback. Every rank usually
  raises it alike, so only the first rank to publish it prints.

Nothing half-written is committed: a checkpoint becomes current only when `latest` is replaced after every
rank's shard is on disk (`checkpoint.save_checkpoint`), and leaving with `os._exit` never reaches that point.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from ..config import ConfigError
from .internals import default_store

ABORT_KEY = "nested_reft/abort"
USER_ERROR_EXIT = 2
FAILURE_EXIT = 1
POLL_SECONDS = 1.0
STOP_SECONDS = 10.0  # how long stopping waits for a store call in flight (one poll on a live store: milliseconds)


def _store():
    """The default process group's c10d store (`internals.default_store`)."""
    return default_store()


def _emit(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def tagged(text: str, rank: int) -> str:
    """Every line of `text` prefixed with `[rank R] `, so interleaved output from several ranks stays readable."""
    return "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").splitlines())


def _parent_of(pid: int) -> int | None:
    """The parent PID of process `pid` (Linux /proc), or None when it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name (field 2) may hold spaces and ')'


def _is_deepspeed_runner(pid: int) -> bool:
    """Whether process `pid` runs the `deepspeed` command (deepspeed/launcher/runner.py)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "deepspeed" or arg == b"deepspeed.launcher.runner"
               for arg in argv[:3])


def launcher_processes() -> list[tuple[int, int]]:
    """(pid, its parent pid) of each process this rank's life depends on, to watch: under a per-node launcher
    (deepspeed.launcher.launch, torchrun: they export LOCAL_SIZE / LOCAL_WORLD_SIZE) the launcher, this process's
    parent; and when that launcher was started by the `deepspeed` command, that command too. Empty for a bare
    process, and off Linux: a process started from a shell (or nohup) must not end with that shell."""
    if not (os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")) or not Path("/proc").is_dir():
        return []
    launcher = os.getppid()
    runner = _parent_of(launcher)
    if runner is None:
        return []
    watched = [(os.getpid(), launcher)]
    if runner > 1 and _is_deepspeed_runner(runner):
        watched.append((launcher, runner))
    return watched


def _gone_launcher(watched: list[tuple[int, int]]) -> int | None:
    """The first watched launcher that is gone: its child (or this process) has been re-parented."""
    for child, parent in watched:
        now = os.getppid() if child == os.getpid() else _parent_of(child)
        if now != parent:
            return parent
    return None


class _Watchdog(threading.Thread):
    """Polls the store for an abort record from another rank, and the launcher processes for their end; leaves the
    process when it finds either."""

    def __init__(self, store, rank: int, launchers: list[tuple[int, int]] = ()):
        super().__init__(name="nested-reft-failstop", daemon=True)
        self.store, self.rank, self.launchers = store, rank, list(launchers)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            gone = _gone_launcher(self.launchers)
            if gone is not None and not self.stopped.is_set():
                _emit(f"[rank {self.rank}] stopping: the job's launcher (PID {gone}) is gone")
                os._exit(FAILURE_EXIT)
            if self.store is None:
                continue
            try:
                if not self.store.check([ABORT_KEY]):
                    continue
                failed_rank, _, kind = self.store.get(ABORT_KEY).decode().partition(":")
            except Exception:  # the store's host is gone: its rank died without publishing anything
                if self.stopped.is_set():
                    return
                _emit(f"[rank {self.rank}] stopping: the job's rendezvous store is unreachable (another rank died)")
                os._exit(FAILURE_EXIT)
            if self.stopped.is_set():
                return
            if int(failed_rank) != self.rank:
                if kind != "config":
                    _emit(f"[rank {self.rank}] stopping: rank {failed_rank} failed (its traceback is above)")
                os._exit(USER_ERROR_EXIT if kind == "config" else FAILURE_EXIT)

    def stop(self) -> None:
        """Stop polling and wait until the thread has left any store call in flight.

        A daemon thread still inside a C++ store call when the interpreter finalises is ended by `pthread_exit`,
        whose unwinding through the binding's noexcept frame aborts the process ("terminate called without an
        active exception", exit -6) after a run that otherwise succeeded."""
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(STOP_SECONDS)


def _publish(store, rank: int, kind: str) -> bool:
    """Record this rank's failure; True if it is the first one recorded (that rank reports the error)."""
    if store is None:
        return True
    try:
        first = store.add("nested_reft/failures", 1) == 1
        if first:
            store.set(ABORT_KEY, f"{rank}:{kind}")
        return first
    except Exception:
        return True


def fail_stop(main: Callable[[], Any]) -> int:
    """Run `main()` so that an exception on this rank ends the whole job (see the module docstring); returns 0.

    On an exception in a distributed run it never returns: the process exits with 2 for a `ConfigError`, 1
    otherwise. In a single process it prints the same and returns that exit code.
    The watchdog starts once the process group exists: call `start_watchdog()` right after initialising it.
    """
    try:
        main()
        return 0
    except BaseException as error:  # noqa: BLE001 - everything, KeyboardInterrupt included, must stop the job
        if isinstance(error, SystemExit) and error.code in (0, None):
            return 0
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        stop_watchdog()
        kind = "config" if isinstance(error, ConfigError) else "error"
        store = None
        if distributed:
            try:
                store = _store()
            except Exception:
                store = None
        first = _publish(store, rank, kind)
        if kind == "config":
            if first:
                _emit(f"nested-reft: error: {error}")
            code = USER_ERROR_EXIT
        elif first:
            _emit(tagged("".join(traceback.format_exception(error)), rank))
            code = FAILURE_EXIT
        else:  # usually the consequence (a broken collective) of the first failure, already reported
            summary = traceback.format_exception_only(error)[-1].strip()
            _emit(f"[rank {rank}] stopping after another rank's failure: {summary}")
            code = FAILURE_EXIT
        if distributed:
            os._exit(code)
        return code
    finally:
        stop_watchdog()


_watchdog: _Watchdog | None = None


def start_watchdog() -> None:
    """Start this rank's watchdog: the abort record in a multi-rank job, the launcher under a launcher (no-op for a
    bare single process). Call after the process group exists."""
    global _watchdog
    if _watchdog is not None or not dist.is_initialized():
        return
    launchers = launcher_processes()
    if dist.get_world_size() == 1 and not launchers:
        return
    _watchdog = _Watchdog(_store() if dist.get_world_size() > 1 else None, dist.get_rank(), launchers)
    _watchdog.start()


def stop_watchdog() -> None:
    """Stop the watchdog. Call before the final barrier of a successful run: once every rank has passed it,
    rank 0 may tear down the store, which a still-running watchdog would take for a crash."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
