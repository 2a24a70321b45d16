"""One recipe, one model: the LayerDrop warm-up trains the same model on 1 process at ZeRO 0 and on 2 ranks at
ZeRO 2 and ZeRO 3 with the same global batch, through `train.run` under the deepspeed launcher.

LayerDrop skips layers on odd warm-up steps. Every stage must treat a layer a step did not use alike
(engine.optimizer_step: a zero gradient and an ordinary optimizer step); before that rule, one ZeRO-0 process
left the skipped layers' gradients None (torch's AdamW then skips them) while ZeRO 2/3 stepped them on zeros, and
sft_loss parted by 8e-3 at step 2, the first step after a LayerDrop step. Tolerances: sft_loss 1e-4 per step,
final weights 1e-4 absolute (the runs differ only in float summation order across ranks).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nested_reft_ds.engine import consolidated_state_dict
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed
STEPS = 20
# Global batch: rollout.prompts_per_step x group_size = 4 x 4 = 16 sequences per warm-up step at any world size
# (train.micro_batch_size is per rank: 1 process accumulates 2 micro-batches of 8, 2 ranks one each).
SETTINGS = ["train.sft_steps=20", "train.steps=0", "train.sft_layer_drop=0.5", "train.sft_lr=3e-3",
            "train.micro_batch_size=8", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "model.num_layers=4", "model.hidden_size=32", "model.intermediate_size=64", "data.num_problems=200",
            "data.eval_problems=0", "train.save_every=0", "train.cpu_threads=1", "logging.tensorboard=false",
            "logging.progress_bar=false"]


def warm_up(out: Path, zero_stage: int, ranks: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    overrides = [arg for item in SETTINGS + [f"train.zero_stage={zero_stage}", f"train.output_dir={out}"]
                 for arg in ("--set", item)]
    entry = ["--module", "nested_reft_ds.train"] if ranks > 1 else ["-m", "nested_reft_ds.train"]
    launcher = (["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())] if ranks > 1
                else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(launcher + entry + overrides, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["phase"] == "sft"]
    return sft, consolidated_state_dict(out / "checkpoints")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {name: warm_up(tmp_path_factory.mktemp(name), stage, ranks)
            for name, stage, ranks in (("zero0_1proc", 0, 1), ("zero2_2ranks", 2, 2), ("zero3_2ranks", 3, 2))}


@pytest.mark.parametrize("sharded", ["zero2_2ranks", "zero3_2ranks"])
def test_layerdrop_warm_up_losses_agree_at_every_stage_and_world_size(runs, sharded):
    reference, _ = runs["zero0_1proc"]
    other, _ = runs[sharded]
    assert [r["step"] for r in reference] == [r["step"] for r in other] == list(range(STEPS))
    assert sum(r["sft_skipped"] > 0 for r in reference) >= STEPS // 2 - 1, "LayerDrop ran on the odd steps"
    worst = max(abs(a["sft_loss"] - b["sft_loss"]) for a, b in zip(reference, other))
    assert worst <= 1e-4, f"sft_loss parts by {worst:.2e}"


@pytest.mark.parametrize("sharded", ["zero2_2ranks", "zero3_2ranks"])
def test_layerdrop_warm_up_final_weights_agree(runs, sharded):
    _, reference = runs["zero0_1proc"]
    _, other = runs[sharded]
    assert reference.keys() == other.keys()
    worst = max((reference[k].float() - other[k].float()).abs().max().item() for k in reference)
    assert worst <= 1e-4, f"weights part by {worst:.2e}"
