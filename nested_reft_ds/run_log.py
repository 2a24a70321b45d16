"""Per-step run output on rank 0: a tqdm bar per phase, one line per logged step, JSONL metrics, TensorBoard events.

A resumed run holds every step exactly once: told the resume point (sft_step, rl_step), rank 0 rewrites
`metrics.jsonl` atomically keeping only the records before it (steps the crashed run logged after its last
checkpoint are run again), and TensorBoard has one writer per phase (`tensorboard/sft`, `tensorboard/rl`,
`tensorboard/eval`: TensorBoard shows each directory as a run) whose `purge_step` is that phase's resume step, so
TensorBoard hides the earlier events at or after it. (One writer for all phases cannot do this: `purge_step`
applies to a whole writer, and SFT and RL count their steps separately.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .run_dir import atomic_write

# The fields of the one-line step summary, in order (all metrics still go to JSONL and TensorBoard).
SUMMARY = (("sft_loss", "sft loss {:.4f}"), ("reward_mean", "reward {:.3f}"), ("sample_accuracy", "acc {:.3f}"),
           ("heldout_accuracy", "held-out acc {:.3f}"), ("loss", "loss {:+.4f}"),
           ("ratio_tok_mean", "ratio {:.3f}"), ("ess", "ess {:.2f}"), ("kl_behavior_k3", "kl(b|t) {:.4f}"),
           ("kl_ref", "kl(ref) {:.4f}"),
           ("rollout_tokens_per_s", "roll {:.0f} tok/s"), ("time_step_s", "{:.1f}s"))
PHASES = ("sft", "rl", "eval")


def resume_step(phase: str, resume_at: tuple[int, int]) -> int:
    """The first step of `phase` that a run resumed at (sft_step, rl_step) logs again. Eval is keyed by the RL
    step and the run re-evaluates at the resume step."""
    sft_step, rl_step = resume_at
    return sft_step if phase == "sft" else rl_step


def truncate_metrics(path: Path, resume_at: tuple[int, int]) -> int:
    """Rewrite the JSONL file `path` atomically, keeping the records logged before `resume_at` (unparsable lines,
    e.g. a line cut off by a crash, are dropped; records of unknown phases are kept). Returns records dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record.get("phase") not in PHASES or record["step"] < resume_step(record["phase"], resume_at)
        except (ValueError, KeyError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += bool(line.strip())
    atomic_write(path, "".join(kept))  # a full disk leaves the old file whole and no partial copy
    return dropped


class RunLog:
    """Writes files only on rank 0 (`enabled`). `resume_at`: the (sft_step, rl_step) this run starts from; what an
    earlier run logged from there on is dropped (metrics.jsonl) or hidden (TensorBoard)."""

    def __init__(self, out_dir: Path, enabled: bool, *, tensorboard: bool, progress_bar: bool,
                 resume_at: tuple[int, int] = (0, 0), echo_prefix: str | None = None):
        self.enabled = enabled
        self.echo_prefix = echo_prefix  # non-zero ranks with logging.all_ranks: print lines, write no files
        self.progress_bar = progress_bar
        self.resume_at = resume_at
        self.bar = None  # the current phase's progress bar
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out_dir / "metrics.jsonl", resume_at)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self.tensorboard_dir = out_dir / "tensorboard" if tensorboard else None
        self.writers: dict[str, Any] = {}
        for phase in PHASES:  # a phase with earlier events gets its purge recorded now, whether it logs or not
            if self.tensorboard_dir is not None and (self.tensorboard_dir / phase).is_dir():
                self._writer(phase)

    def _writer(self, phase: str):
        if phase not in self.writers:
            from torch.utils.tensorboard import SummaryWriter
            self.writers[phase] = SummaryWriter(str(self.tensorboard_dir / phase),
                                                purge_step=resume_step(phase, self.resume_at))
        return self.writers[phase]

    def start_phase(self, name: str, total: int, done: int = 0) -> None:
        """Show a progress bar for a phase of `total` steps, `done` of them already done (resumed); it replaces the
        previous phase's bar. Nothing is shown when nothing is left to do."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if done < total:
            self.bar = tqdm(total=total, initial=done, desc=name, unit="step", dynamic_ncols=True,
                            disable=not self.progress_bar)

    def step_done(self) -> None:
        """Advance the current phase's bar by one step (call every step, logged or not)."""
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, Any], phase: str = "rl") -> None:
        """Record `metrics` of `phase` at `step` (JSONL, TensorBoard) and print its one-line summary."""
        if not self.enabled:
            if self.echo_prefix is not None:
                print(self.echo_prefix + self.line(step, metrics, phase), flush=True)
            return
        record = {"phase": phase, "step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard_dir is not None:
            writer = self._writer(phase)
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"{phase}/{key}", value, step)
        tqdm.write(self.line(step, metrics, phase))

    @staticmethod
    def line(step: int, metrics: dict[str, Any], phase: str) -> str:
        parts = [fmt.format(metrics[key]) for key, fmt in SUMMARY if key in metrics]
        if "skipped_layers" in metrics:
            parts.append(f"skip {metrics['skipped_layers']}")
        return f"[{phase} {step}] " + " | ".join(parts)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.jsonl.close()
        for writer in self.writers.values():
            writer.close()
