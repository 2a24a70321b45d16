"""How a step's data is laid out over ranks and micro-batches: pure functions of (seed, step) and lengths.

Every rank and every resumed run computes the same global batch for a step (`batch_indices`), takes its own
contiguous share (`local_share`), and splits it into micro-batches that waste little padding (`micro_batches`).
"""
from __future__ import annotations

import random

import torch


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: consecutive slices of a per-epoch seeded permutation.

    A pure function of (seed, step), so every rank and every resumed run draw the same batch."""
    indices, position = [], step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_items)
        order = list(range(num_items))
        random.Random(f"nested-reft-data:{seed}:{epoch}").shuffle(order)
        take = min(batch_size - len(indices), num_items - offset)
        indices += order[offset:offset + take]
        position += take
    return indices


def local_share(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous slice of a global batch whose size divides by `world`."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


def micro_batches(prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, micro: int, group_size: int,
                  bucket_by_length: bool) -> list[torch.Tensor]:
    """Row indices of each micro-batch of `micro` rows, given each row's prompt and completion lengths [N].

    Without bucketing: consecutive rows. With it: units of rows (whole prompt groups of `group_size`, when a
    micro-batch holds whole groups, as a group-normalised correction or the shared-prompt forward needs; else
    single rows) are ordered so that the micro-batches, each trimmed to its longest prompt plus its longest
    completion (`Rollout.select`), compute the fewest positions. A trimmed width has two parts, so no one sort key
    is best for every batch: the order as given and the units sorted (longest first, stable) by longest row, by
    longest completion then prompt, and by longest prompt then completion are costed, and the cheapest is kept
    (ties: the earlier). The loss is a sum of per-token terms with global normalisers, so the order of rows changes
    nothing but float summation order; the layout is a pure function of the lengths."""
    num_rows = prompt_lengths.numel()
    device = prompt_lengths.device
    rows = torch.arange(num_rows, device=device)
    if not bucket_by_length:
        return [rows[start:start + micro] for start in range(0, num_rows, micro)]
    unit = group_size if micro % group_size == 0 and num_rows % group_size == 0 else 1
    prompt_unit = prompt_lengths.view(-1, unit).max(dim=1).values
    completion_unit = completion_lengths.view(-1, unit).max(dim=1).values
    total_unit = (prompt_lengths + completion_lengths).view(-1, unit).max(dim=1).values

    def by(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
        order = torch.arange(primary.numel(), device=device)
        for key in ([secondary] if secondary is not None else []) + [primary]:  # least significant key first
            order = order[torch.sort(key[order], descending=True, stable=True).indices]
        return order

    def cost(order: torch.Tensor) -> int:
        candidate = (order[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        return sum(len(piece) * int(prompt_lengths[piece].max() + completion_lengths[piece].max())
                   for piece in candidate.split(micro))

    candidates = [torch.arange(prompt_unit.numel(), device=device), by(total_unit),
                  by(completion_unit, prompt_unit), by(prompt_unit, completion_unit)]
    best = min(candidates, key=cost)  # min keeps the first of equal costs
    rows = (best[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
    return list(rows.split(micro))
