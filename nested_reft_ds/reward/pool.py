"""A persistent pool of sympy worker processes with a hard per-comparison time limit.

Workers are plain subprocesses (not `multiprocessing`), so a pool can be created from any thread, from a
DataLoader worker and from a daemonic `multiprocessing` worker, where `multiprocessing.Process` refuses to
start children. A comparison that overruns its time limit gets its worker SIGKILLed and replaced at once, so
the replacement imports sympy while the rest of the batch continues. After `os.fork()` the child forgets the
parent's workers (it never kills them) and starts its own on first use.
"""
from __future__ import annotations

import atexit
import enum
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Sequence

_WORKER_SCRIPT = Path(__file__).with_name("_worker.py")


class Outcome(str, enum.Enum):
    """Result of one comparison."""

    EQUAL = "equal"
    NOT_EQUAL = "not_equal"
    PARSE_FAILURE = "parse_failure"  # the prediction or the reference could not be parsed
    TIMEOUT = "timeout"
    ERROR = "error"  # the comparison raised, ran out of memory, or its worker died
    REJECTED = "rejected"  # over the input size limits; never parsed


_WORKER_OUTCOMES = {"equal": Outcome.EQUAL, "not_equal": Outcome.NOT_EQUAL, "parse_failure": Outcome.PARSE_FAILURE,
                    "timeout": Outcome.TIMEOUT, "error": Outcome.ERROR, "memory": Outcome.ERROR}


class WorkerStartError(RuntimeError):
    """A worker could not start (e.g. math-verify is not installed for this interpreter)."""


class _Worker:
    def __init__(self, memory_limit_mb: int, startup_timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), str(memory_limit_mb)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            start_new_session=True)  # Ctrl-C in a terminal interrupts the trainer, not every worker
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + startup_timeout
        self._buffer = b""

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, task: int, message: dict, deadline: float) -> None:
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.task, self.deadline = task, deadline

    def read_messages(self) -> list[dict] | None:
        """Complete messages received so far; None once the worker has exited."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.forget()

    def forget(self) -> None:
        """Close this process's ends of the pipes without touching the worker."""
        self.process.stdin.close()
        self.process.stdout.close()


_ALL_POOLS: weakref.WeakSet[VerifierPool] = weakref.WeakSet()


class VerifierPool:
    """Up to `max_workers` persistent sympy workers, started on demand.

    `memory_limit_mb` is each worker's address-space limit (RLIMIT_AS); `grace` is how long past a comparison's
    timeout the pool waits for the worker's own SIGALRM answer before it SIGKILLs the worker.
    Thread-safe: concurrent `compare` calls run one after the other.
    """

    def __init__(self, max_workers: int | None = None, *, memory_limit_mb: int = 2048, grace: float = 0.5,
                 startup_timeout: float = 120.0) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb must be >= 256 (sympy alone needs ~150 MB), got {memory_limit_mb}")
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.memory_limit_mb = memory_limit_mb
        self.grace = grace
        self.startup_timeout = startup_timeout
        self._reset()
        _ALL_POOLS.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._selector = selectors.DefaultSelector()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def start(self, num_workers: int | None = None) -> None:
        """Start `num_workers` (default all) workers now and wait until they are ready, so that the first
        `compare` does not pay the sympy import."""
        with self._lock:
            self._grow(num_workers or self.max_workers)
            while not all(worker.ready for worker in self._workers):
                self._wait([])

    def compare(self, pairs: Sequence[tuple[str, str]], *, timeout: float, rel_tol: float) -> list[Outcome]:
        """Outcome of each (prediction, reference) comparison, in order. Each comparison gets `timeout` seconds
        from the moment a ready worker receives it."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        results: list[Outcome | None] = [None] * len(pairs)
        with self._lock:
            queue = deque(range(len(pairs)))
            self._grow(min(self.max_workers, len(pairs)))
            try:
                while queue or any(worker.task is not None for worker in self._workers):
                    for worker in list(self._workers):
                        if worker.ready and worker.task is None and queue:
                            index = queue.popleft()
                            pred, ref = pairs[index]
                            message = {"pred": pred, "ref": ref, "rel_tol": rel_tol, "timeout": timeout}
                            try:
                                worker.send(index, message, time.monotonic() + timeout + self.grace)
                            except BrokenPipeError:  # died while idle: retry the task on a new worker
                                queue.appendleft(index)
                                self._replace(worker)
                    self._wait(results)
            finally:
                for worker in list(self._workers):
                    if worker.task is not None:  # interrupted mid-batch: its late answer must not leak
                        self._remove(worker)
        return results  # type: ignore[return-value]  # every slot is filled when the loop ends

    def _grow(self, count: int) -> None:
        while len(self._workers) < count:
            worker = _Worker(self.memory_limit_mb, self.startup_timeout)
            self._selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
            self._workers.append(worker)

    def _remove(self, worker: _Worker) -> None:
        self._selector.unregister(worker.process.stdout)
        self._workers.remove(worker)
        worker.kill()

    def _replace(self, worker: _Worker) -> None:
        self._remove(worker)
        self._grow(len(self._workers) + 1)

    def _wait(self, results: list[Outcome | None]) -> None:
        """Wait for the next message or deadline and handle it."""
        deadlines = [worker.deadline for worker in self._workers if worker.task is not None or not worker.ready]
        if not deadlines:
            return
        next_deadline = min(deadlines)
        for key, _ in self._selector.select(max(0.0, next_deadline - time.monotonic())):
            worker: _Worker = key.data
            try:
                messages = worker.read_messages()
            except ValueError:  # not JSON: the worker is broken
                messages = None
            if messages is None:
                if not worker.ready:
                    code = worker.process.poll()
                    self._remove(worker)
                    raise WorkerStartError(f"reward worker exited during start-up (exit code {code})")
                if worker.task is not None:  # killed by the kernel (RLIMIT_AS, stack overflow) mid-comparison
                    results[worker.task] = Outcome.ERROR
                self._replace(worker)
                continue
            for message in messages:
                if "fatal" in message:
                    self._remove(worker)
                    raise WorkerStartError(f"reward worker failed to start: {message['fatal']}")
                if message.get("ready"):
                    worker.ready = True
                elif "outcome" in message and worker.task is not None:
                    results[worker.task] = _WORKER_OUTCOMES[message["outcome"]]
                    worker.task = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                results[worker.task] = Outcome.TIMEOUT
                self._replace(worker)
            elif not worker.ready and now >= worker.deadline:
                self._remove(worker)
                raise WorkerStartError(f"reward worker not ready after {self.startup_timeout:.0f} s")

    def close(self) -> None:
        """Stop all workers (EOF first, SIGKILL for any still running after a second)."""
        # A daemon thread may hold the lock forever at interpreter exit; stop the workers regardless.
        acquired = self._lock.acquire(timeout=5.0)
        try:
            for worker in self._workers:
                worker.process.stdin.close()
            for worker in self._workers:
                try:
                    worker.process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
                self._selector.unregister(worker.process.stdout)
                worker.process.stdout.close()
            self._workers = []
        finally:
            if acquired:
                self._lock.release()

    def _forget_after_fork(self) -> None:
        for worker in self._workers:
            worker.forget()
        self._selector.close()
        self._reset()


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def _forget_all_pools_in_child() -> None:
    global _default_pool_lock
    _default_pool_lock = threading.Lock()  # another thread may have held it at the fork
    for pool in list(_ALL_POOLS):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_pools_in_child)


def default_pool() -> VerifierPool:
    """The process-wide pool used when no pool is passed; created on first use, closed at exit."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = VerifierPool()
        return _default_pool


def _close_default_pool() -> None:
    if _default_pool is not None:
        _default_pool.close()


atexit.register(_close_default_pool)
