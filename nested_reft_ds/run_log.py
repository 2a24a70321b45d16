"""Per-step run output on rank 0: a tqdm bar with one line per step, JSONL metrics, TensorBoard events."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

# The fields of the one-line step summary, in order (all metrics still go to JSONL and TensorBoard).
SUMMARY = (("sft_loss", "sft loss {:.4f}"), ("reward_mean", "reward {:.3f}"), ("accuracy", "acc {:.3f}"), ("loss", "loss {:+.4f}"),
           ("ratio_tok_mean", "ratio {:.3f}"), ("ess", "ess {:.2f}"), ("kl_behavior_k3", "kl(b|t) {:.4f}"),
           ("kl_ref", "kl(ref) {:.4f}"),
           ("rollout_tokens_per_s", "roll {:.0f} tok/s"), ("time_step_s", "{:.1f}s"))


class RunLog:
    """Writes only on rank 0 (`enabled`); appends, so a resumed run continues the same files."""

    def __init__(self, out_dir: Path, enabled: bool, *, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar: bool, echo_prefix: str | None = None):
        self.enabled = enabled
        self.echo_prefix = echo_prefix  # non-zero ranks with logging.all_ranks: print lines, write no files
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="nested-reft", dynamic_ncols=True,
                        disable=not progress_bar)

    def log(self, step: int, metrics: dict[str, Any], phase: str = "rl") -> None:
        if not self.enabled:
            if self.echo_prefix is not None:
                print(self.echo_prefix + self.line(step, metrics, phase), flush=True)
            return
        record = {"phase": phase, "step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{phase}/{key}", value, step)
        if phase == "rl":
            self.bar.update(1)
        self.bar.write(self.line(step, metrics, phase))

    @staticmethod
    def line(step: int, metrics: dict[str, Any], phase: str) -> str:
        parts = [fmt.format(metrics[key]) for key, fmt in SUMMARY if key in metrics]
        if "skipped_layers" in metrics:
            parts.append(f"skip {metrics['skipped_layers']}")
        return f"[{phase} {step}] " + " | ".join(parts)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
