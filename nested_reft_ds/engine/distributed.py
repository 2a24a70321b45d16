"""Process-group start-up and the few collectives the training loop needs.

Every function here that communicates says so: every rank must call it, in the same order.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from ..nested import SkipPlan
from ..rl.diagnostics import DiagnosticParts, finalize
from .internals import reset_cached_world_group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_threads_per_rank(requested: int) -> int:
    """`requested` intra-op threads, capped so the ranks on this machine do not oversubscribe its cores (the
    deepspeed launcher exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE). Oversubscribed, threads spin waiting for
    each other: the default's 2-thread SFT step took 0.45 s alone and 1.4-2.5 s sharing 2 cores with one more job."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, min(requested, (os.cpu_count() or 1) // max(local_ranks, 1)))


def init_distributed() -> tuple[int, int]:
    """Join (or, for a plain single process, create) the process group; returns (rank, world_size).

    Works under the deepspeed launcher, torchrun and `python -m` alike: they all export RANK / WORLD_SIZE /
    LOCAL_RANK; a bare process gets a one-rank group on a free local port. NCCL on CUDA, gloo on CPU.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
        if not torch.cuda.is_available():
            _unlink_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer. Collective.

    With every rank on one machine, DeepSpeed's CPU backend maps one 66 MB /dev/shm file per rank and never
    unlinks it, so each multi-rank CPU job, finished or crashed, would leave its RAM-backed files behind until
    /dev/shm is full. Once every rank has mapped its peers' buffers (inside deepspeed.init_distributed, before the
    barrier) the names are no longer needed: the memory lives on in the mappings and is freed when the last rank
    exits, however it exits."""
    if dist.get_world_size() > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_same_plan(plan: SkipPlan) -> None:
    """Raise on every rank if any two ranks hold different skip plans. Collective (two all-reduces).

    MIN and MAX of the plan fingerprint agree iff all ranks agree, so every rank reaches the same verdict and
    raises together: a mismatch can neither hang the job nor silently sample from different models.
    """
    fingerprint = torch.tensor([plan.fingerprint()], dtype=torch.int64, device=device())
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(f"skip plans differ across ranks (rank {dist.get_rank()} holds skipped={plan.skipped}); "
                           "check that every rank uses the same skip seed, schedule and step")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks. Collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Combine per-rank metrics: keys ending in `_max` take the max, `_min` the min, the rest the mean.
    Collective; every rank must pass the same keys."""
    keys = sorted(metrics)
    world = dist.get_world_size()
    groups = {op: [k for k in keys if kind(k)] for op, kind in (
        (dist.ReduceOp.MAX, lambda k: k.endswith("_max")), (dist.ReduceOp.MIN, lambda k: k.endswith("_min")),
        (dist.ReduceOp.SUM, lambda k: not k.endswith(("_max", "_min"))))}
    reduced = {}
    for op, group in groups.items():
        if not group:
            continue
        tensor = torch.tensor([float(metrics[k]) for k in group], dtype=torch.float64, device=device())
        dist.all_reduce(tensor, op=op)
        scale = 1.0 / world if op == dist.ReduceOp.SUM else 1.0
        reduced.update({k: v * scale for k, v in zip(group, tensor.tolist())})
    return reduced


def reduce_diagnostics(parts: DiagnosticParts) -> dict[str, float]:
    """The estimator diagnostics (rl.diagnostics.finalize) of the global batch from each rank's merged parts.
    Collective: every rank must call it, with parts holding the same keys; every rank gets identical results.

    Exact, not an average of per-rank ratios: one float64 all-reduce SUM of the sums, one MIN all-reduce of the
    mins and negated maxs, and an all-gather of the quantile values (per-rank lengths first, then one padded
    float32 tensor per rank with every value key packed), so quantiles come from the global set of values.
    Cost: the per-token ratios dominate. At 2048 sequences x 1024 completion tokens (every token valid) they are
    2048 * 1024 = 2,097,152 float32 values = 8 MiB (the 2048 sequence ratios add 8 KiB), and every rank receives
    all of them whatever the world size: the gather buffer is world x the longest rank's share (8 MiB for
    balanced ranks), a ring all-gather moves (world - 1) / world of it in and out of each rank, once per step.
    Each rank then holds the concatenated copy (8 MiB) and sorts it once (values + int64 indices, 24 MiB), so
    ~40 MiB transient device memory and a 2M-element sort: negligible next to the step's forward/backward.
    The sums and extremes are two all-reduces of a few dozen float64s.
    """
    world = dist.get_world_size()
    if world == 1:
        return finalize(parts)
    dev = device()
    sum_keys, min_keys, max_keys, value_keys = (sorted(parts.sums), sorted(parts.mins), sorted(parts.maxs),
                                                sorted(parts.values))
    sums = torch.tensor([parts.sums[k] for k in sum_keys], dtype=torch.float64, device=dev)
    extremes = torch.tensor([parts.mins[k] for k in min_keys] + [-parts.maxs[k] for k in max_keys],
                            dtype=torch.float64, device=dev)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
    extremes = extremes.tolist()
    merged = DiagnosticParts(sums=dict(zip(sum_keys, sums.tolist())), mins=dict(zip(min_keys, extremes)),
                             maxs={k: -v for k, v in zip(max_keys, extremes[len(min_keys):])})

    local = [parts.values[k].detach().to(dev, torch.float32).reshape(-1) for k in value_keys]
    lengths = torch.tensor([v.numel() for v in local], dtype=torch.int64, device=dev)  # [K]
    all_lengths = [torch.empty_like(lengths) for _ in range(world)]
    dist.all_gather(all_lengths, lengths)
    per_rank = torch.stack(all_lengths).tolist()                                       # [world][K]
    longest = max(sum(row) for row in per_rank)
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in value_keys}
    if longest > 0:
        packed = torch.zeros(longest, dtype=torch.float32, device=dev)
        if local:
            flat = torch.cat(local)
            packed[:flat.numel()] = flat
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        for row, buffer in zip(per_rank, gathered):
            for key, chunk in zip(value_keys, torch.split(buffer[:sum(row)], row)):
                pieces[key].append(chunk)
    merged.values = {k: torch.cat(pieces[k]) if pieces[k] else torch.zeros(0, device=dev) for k in value_keys}
    return finalize(merged)


def barrier() -> None:
    dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` (any picklable object) on every rank. Collective."""
    if dist.get_world_size() == 1:
        return value
    holder = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value) -> list:
    """Every rank's `value`, in rank order, on every rank. Collective."""
    if dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown_distributed() -> None:
    """Destroy the process group (if any) so launchers see a clean exit on every rank."""
    if dist.is_initialized():
        dist.destroy_process_group()
        # DeepSpeed caches a clone of the world group and would hand the destroyed one to the engines of a
        # process group created later in this process.
        reset_cached_world_group()
