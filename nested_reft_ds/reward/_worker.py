"""Sympy equivalence check, run in a worker process started by `VerifierPool`.

Run as a script (`python .../_worker.py MEMORY_LIMIT_MB`), not as `-m nested_reft_ds...`, so that starting a
worker never imports the package (which may pull in torch). Protocol: one JSON object per line. The worker
sends {"ready": true} (or {"fatal": message}) once its imports are done, then answers each request
{"pred", "ref", "rel_tol", "timeout"} with {"outcome": ...}, where outcome is one of "equal", "not_equal",
"parse_failure", "timeout", "error" or "memory". It exits on EOF of stdin or after "memory".

Time is bounded twice: a SIGALRM here turns most overruns into a clean "timeout" answer (the worker stays
alive); the parent SIGKILLs the worker when even that does not arrive (time spent inside C code). Memory is
bounded by RLIMIT_AS, so `9^{9^{9^9}}` ends in MemoryError instead of exhausting the machine.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys


class _SoftTimeout(BaseException):
    """Raised by SIGALRM. A BaseException so that library code catching Exception cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _parse(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # The answer is already extracted; boxing it makes math_verify take all of it as one expression.
    return parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


def _numerically_close(gold, pred, rel_tol: float) -> bool:
    """Relative-tolerance comparison of two constant expressions when either is written as a decimal
    (math_verify itself rounds to a fixed number of decimal places, which is wrong for large or tiny values)."""
    from sympy import Expr, Float

    if not (isinstance(gold, Expr) and isinstance(pred, Expr)):
        return False
    if gold.free_symbols or pred.free_symbols or not (gold.has(Float) or pred.has(Float)):
        return False
    gold_value, pred_value = complex(gold.evalf(30)), complex(pred.evalf(30))
    return abs(gold_value - pred_value) <= rel_tol * max(abs(gold_value), abs(pred_value))


def compare(pred: str, ref: str, rel_tol: float) -> str:
    """Outcome of comparing an extracted answer with a reference answer via math_verify (no time bound here)."""
    from math_verify import verify
    from sympy import Basic, MatrixBase

    gold, target = _parse(ref), _parse(pred)
    if gold and target and verify(gold, target, timeout_seconds=None):
        return "equal"
    # math_verify falls back to the raw string when LaTeX parsing fails; a side that is only a string could
    # be compared as text (done above) but not as mathematics.
    gold_expr = next((g for g in gold if isinstance(g, (Basic, MatrixBase))), None)
    target_expr = next((t for t in target if isinstance(t, (Basic, MatrixBase))), None)
    if gold_expr is None or target_expr is None:
        return "parse_failure"
    if _numerically_close(gold_expr, target_expr, rel_tol):
        return "equal"
    return "not_equal"


def _serve(requests, send) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    for line in requests:
        request = json.loads(line)
        outcome = "error"
        try:
            signal.setitimer(signal.ITIMER_REAL, request["timeout"])
            try:
                outcome = compare(request["pred"], request["ref"], request["rel_tol"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            outcome = "timeout"
        except MemoryError:
            outcome = "memory"
        except Exception:  # RecursionError and parser bugs on one input must not take the worker down
            outcome = "error"
        send({"outcome": outcome})
        if outcome == "memory":
            return  # the heap may be fragmented beyond use; the parent starts a fresh worker


def main(argv: list[str]) -> None:
    # Keep the protocol on a private copy of stdout; stray prints from libraries go to stderr instead.
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)

    def send(message: dict) -> None:
        protocol.write(json.dumps(message).encode() + b"\n")

    try:
        memory_limit = int(argv[1]) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        logging.disable(logging.CRITICAL)  # math_verify warns on every disabled timeout and failed parse
        compare("1", "\\frac{2}{2}", 1e-6)  # import and warm up sympy / the LaTeX grammar before "ready"
    except BaseException as error:  # report any start-up failure instead of dying silently
        send({"fatal": f"{type(error).__name__}: {error}"})
        return
    send({"ready": True})
    _serve(sys.stdin.buffer, send)


if __name__ == "__main__":
    main(sys.argv)
