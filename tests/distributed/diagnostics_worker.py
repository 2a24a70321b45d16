"""Global-batch estimator diagnostics over 2 real ranks (gloo on CPU).

Run by tests/test_rl_diagnostics.py as `deepspeed --num_gpus 2 tests/distributed/diagnostics_worker.py --out DIR`.
Every rank builds the same global batch (`global_batch`), takes its half of the rows, runs `policy_loss_parts`
on micro-batches of a rank-specific size (rank 0: 8 rows, rank 1: 16), merges them, calls
`reduce_diagnostics` and writes DIR/rank<r>.json; the test compares it with the single-process finalize of the
whole batch. Module level imports only torch and nested_reft_ds.rl, so the test can import `global_batch`
and `CASES` without starting anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from nested_reft_ds.config import AlgorithmConfig

ROWS, TOKENS, GROUP = 64, 20, 4
MICRO_ROWS = {0: 8, 1: 16}
BASE = AlgorithmConfig(correction="none", loss_agg="token_mean", kl_coef=0.05, is_cap=None, mask_low=0.5,
                       mask_high=2.0)
# name -> (config, whether rank 1's half of the batch is entirely masked)
CASES = {
    "none": (dataclasses.replace(BASE, correction="none"), False),
    "seq_is": (dataclasses.replace(BASE, correction="seq_is"), False),
    "seq_is_sn_cap": (dataclasses.replace(BASE, correction="seq_is", is_cap=3.0, self_normalize=True), False),
    "token_tis": (dataclasses.replace(BASE, correction="token_tis", is_cap=1.5), False),
    "token_mis": (dataclasses.replace(BASE, correction="token_mis"), False),
    "seq_mis": (dataclasses.replace(BASE, correction="seq_mis"), False),
    "seq_mis_product": (dataclasses.replace(BASE, correction="seq_mis", seq_mis_geometric=False, mask_high=4.0), False),
    "token_tis_rank1_empty": (dataclasses.replace(BASE, correction="token_tis", is_cap=1.5), True),
}


def global_batch(seed: int = 0, rows: int = ROWS, tokens: int = TOKENS) -> dict[str, torch.Tensor]:
    """logp, prox, behavior, ref [rows, tokens], adv [rows], mask [rows, tokens]: ragged completion lengths,
    every 7th sequence fully masked, two non-finite behaviour log-probs and one non-finite pi_theta one."""
    g = torch.Generator().manual_seed(seed)
    prox = -torch.rand(rows, tokens, generator=g) * 3
    behavior = prox + 0.3 * torch.randn(rows, tokens, generator=g)
    logp = prox + 0.1 * torch.randn(rows, tokens, generator=g)
    ref = prox + 0.2 * torch.randn(rows, tokens, generator=g)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    lengths[::7] = 0
    mask = (torch.arange(tokens)[None] < lengths[:, None]).float()
    behavior[1, 0] = float("nan")
    behavior[40, 0] = float("-inf")
    logp[9, 0] = float("-inf")
    adv = torch.randn(rows, generator=g)
    return {"logp": logp, "prox": prox, "behavior": behavior, "ref": ref, "adv": adv, "mask": mask}


def case_batch(empty_rank1: bool) -> dict[str, torch.Tensor]:
    batch = global_batch()
    if empty_rank1:
        batch["mask"][ROWS // 2:] = 0.0
    return batch


def parts_for(batch: dict[str, torch.Tensor], rows: slice, cfg: AlgorithmConfig):
    from nested_reft_ds.rl import policy_loss_parts

    mask = batch["mask"]
    _, parts = policy_loss_parts(batch["logp"][rows], batch["prox"][rows], batch["behavior"][rows],
                                 batch["adv"][rows], mask[rows], cfg, num_global_tokens=mask.sum().item(),
                                 num_global_seqs=mask.shape[0], ref_logprobs=batch["ref"][rows], group_size=GROUP)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    torch.set_num_threads(1)

    from nested_reft_ds import engine as ds
    from nested_reft_ds.engine.distributed import reduce_diagnostics
    from nested_reft_ds.rl import merge

    rank, world = ds.init_distributed()
    assert world == 2, world
    share = ROWS // world
    result = {"rank": rank, "world": world, "cases": {}}
    try:
        for name, (cfg, empty_rank1) in CASES.items():
            batch = case_batch(empty_rank1)
            step = MICRO_ROWS[rank]
            micro = [parts_for(batch, slice(start, start + step), cfg)
                     for start in range(rank * share, (rank + 1) * share, step)]
            result["cases"][name] = reduce_diagnostics(merge(micro))
        (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        ds.shutdown_distributed()


if __name__ == "__main__":
    main()
