"""Every comparison is time- and memory-bounded: in the main thread, in a thread, in a daemonic
multiprocessing worker and in a DataLoader worker."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from nested_reft_ds.reward import Outcome, VerifierPool, compare_answers, default_pool, math_equal

TIMEOUT = 1.0
# The bound: a pathological comparison returns within its timeout plus one second.
BOUND = TIMEOUT + 1.0

_MATRIX_DET = ("\\det\\begin{pmatrix}" + "\\\\".join("&".join(f"x_{{{i}{j}}}" for j in range(9)) for i in range(9))
               + "\\end{pmatrix}")
PATHOLOGICAL = {
    "power tower 9^9^9^9": "9^9^9^9",
    "power tower 9^{9^{9^9}}": "9^{9^{9^9}}",
    "iterated factorial 10!!!!!!": "10!!!!!!",
    "symbolic 9x9 determinant": _MATRIX_DET,
    "25 nested parentheses": "(" * 25 + "1" + ")" * 25,
    "100 kB string": "1+" * 50_000 + "1",
    "10,000 nested parentheses": "(" * 10_000 + "1" + ")" * 10_000,
    "300x300 matrix": "\\begin{pmatrix}" + "\\\\".join(["&".join(["1"] * 300)] * 300) + "\\end{pmatrix}",
}
def _timed_comparisons(inputs: list[str], timeout: float) -> list[tuple[bool, float]]:
    """(result, seconds) per input, with the process's default pool warm so only the comparison is timed."""
    results = []
    for text in inputs:
        default_pool().start()
        start = time.monotonic()
        results.append((math_equal(text, "1", timeout=timeout), time.monotonic() - start))
    return results


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(2) as verifier_pool:
        yield verifier_pool


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_input_returns_false_within_the_bound(pool, name):
    pool.start()
    start = time.monotonic()
    assert math_equal(PATHOLOGICAL[name], "1", timeout=TIMEOUT, pool=pool) is False
    assert time.monotonic() - start < BOUND


def test_batch_of_pathological_inputs_is_bounded_and_the_pool_survives(pool):
    pool.start()
    start = time.monotonic()
    outcomes = compare_answers([(text, "1") for text in PATHOLOGICAL.values()] + [("\\sqrt{4}", "2")],
                               timeout=TIMEOUT, pool=pool)
    elapsed = time.monotonic() - start
    assert outcomes[-1] is Outcome.EQUAL
    assert {Outcome.TIMEOUT, Outcome.REJECTED} <= set(outcomes)
    # 2 workers, <= 6 comparisons that can run into the limit: at most 3 rounds of (timeout + grace).
    assert elapsed < 3 * (TIMEOUT + pool.grace) + 1.0


def test_worker_that_stops_answering_is_killed_at_the_hard_deadline(pool):
    # SIGSTOP makes the worker ignore its own SIGALRM, as time spent inside C code would.
    pool.start()
    pids = {worker.process.pid for worker in pool._workers}
    victim = next(iter(pids))
    os.kill(victim, signal.SIGSTOP)
    start = time.monotonic()
    outcomes = pool.compare([("10!!!!!!", "1"), ("10!!!!!!", "2")], timeout=TIMEOUT, rel_tol=1e-4)
    elapsed = time.monotonic() - start
    assert outcomes == [Outcome.TIMEOUT, Outcome.TIMEOUT]
    assert TIMEOUT + pool.grace - 0.05 < elapsed < BOUND
    assert victim not in {worker.process.pid for worker in pool._workers}
    assert math_equal("\\sqrt{9}", "3", pool=pool)


def test_workers_run_under_an_address_space_limit():
    with VerifierPool(1, memory_limit_mb=768) as limited:
        limited.start()
        pid = limited._workers[0].process.pid
        with open(f"/proc/{pid}/limits") as limits:
            line = next(row for row in limits if row.startswith("Max address space"))
        assert line.split()[3] == str(768 * 2**20)


# Each context (a thread, a daemonic multiprocessing worker, a DataLoader worker) runs every pathological input
# once, in one batch, timing each comparison on its own; the parametrized tests below assert per input.
NAMES = list(PATHOLOGICAL)


@pytest.fixture(scope="module")
def from_a_thread() -> dict[str, tuple[bool, float]]:
    results: list[tuple[bool, float]] = []
    thread = threading.Thread(target=lambda: results.extend(_timed_comparisons(list(PATHOLOGICAL.values()), TIMEOUT)))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and len(results) == len(NAMES)
    return dict(zip(NAMES, results))


@pytest.fixture(scope="module")
def from_a_pool_worker() -> dict[str, tuple[bool, float] | set[int]]:
    math_equal("\\sqrt{4}", "2")  # the parent's pool exists before the fork; the child must not reuse it
    parent_pids = {worker.process.pid for worker in default_pool()._workers}
    with multiprocessing.get_context("fork").Pool(1) as workers:
        results = workers.apply(_timed_comparisons, (list(PATHOLOGICAL.values()), TIMEOUT))
    return {**dict(zip(NAMES, results)), "parent_pids": parent_pids}


class _PathologicalDataset:
    def __len__(self) -> int:
        return len(NAMES)

    def __getitem__(self, index: int) -> tuple[bool, float]:
        return _timed_comparisons([PATHOLOGICAL[NAMES[index]]], TIMEOUT)[0]


@pytest.fixture(scope="module")
def from_a_dataloader_worker() -> dict[str, tuple[bool, float]]:
    torch_data = pytest.importorskip("torch.utils.data")
    loader = torch_data.DataLoader(_PathologicalDataset(), batch_size=None, num_workers=1)
    return {name: (bool(result), float(seconds)) for name, (result, seconds) in zip(NAMES, loader)}


@pytest.mark.parametrize("name", NAMES)
def test_pathological_input_from_a_thread(from_a_thread, name):
    result, seconds = from_a_thread[name]
    assert result is False
    assert seconds < BOUND


@pytest.mark.parametrize("name", NAMES)
def test_pathological_input_from_a_daemonic_multiprocessing_worker(from_a_pool_worker, name):
    result, seconds = from_a_pool_worker[name]
    assert result is False
    assert seconds < BOUND


def test_the_pool_worker_leaves_the_parents_pool_alone(from_a_pool_worker):
    assert {worker.process.pid for worker in default_pool()._workers} == from_a_pool_worker["parent_pids"]
    assert math_equal("\\sqrt{4}", "2")


@pytest.mark.parametrize("name", NAMES)
def test_pathological_input_from_a_dataloader_worker(from_a_dataloader_worker, name):
    result, seconds = from_a_dataloader_worker[name]
    assert result is False
    assert seconds < BOUND


def test_concurrent_threads_share_the_default_pool():
    expected = {"\\sqrt{16}": True, "\\sqrt{15}": False, "2^{3}": False, "\\frac{8}{2}": True}
    answers: dict[int, list[bool]] = {}

    def work(thread_index: int) -> None:
        answers[thread_index] = [math_equal(p, "4") for p in expected]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {i: list(expected.values()) for i in range(4)}
