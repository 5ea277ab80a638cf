"""`--packing`: several causal-LM examples per row, so that rows carry (almost) no padding.

A packed row is its examples one after the other. Each keeps its own positions (the position ids restart at 0 at
every example) and attends only to itself: the model gets `position_ids` and no attention mask, from which
transformers builds a block-diagonal causal mask (eager and SDPA) or the variable-length sequence boundaries of
flash-attention. The first token of each example carries no label (the token before it is the previous
example's last), exactly as in an unpacked row, so every example's loss is the one it has alone.

Rows are filled best-fit decreasing (each example, longest first, into the fullest row it still fits), which
leaves little room unused; the same data always packs the same way, and each epoch shuffles the packed rows.
A model whose attention does not honour the position ids this way is found before training (`check_model`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..errors import LorakitError
from .config import TrainConfig
from .data import IGNORE, Encoded, Example, batch_order


def check_config(cfg: TrainConfig) -> None:
    """Up front, before anything loads: packing concatenates token sequences, which a classifier cannot take."""
    if cfg.packing and cfg.task != "causal-lm":
        raise LorakitError(f"--packing: only for --task causal-lm (rows of concatenated examples), got {cfg.task}")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens, best-fit decreasing; the order of the rows
    and within them is by length (longest first), ties by index."""
    rows: list[list[int]] = []
    room: dict[int, list[int]] = {}  # free tokens -> rows with that much room
    free: list[int] = []  # the distinct amounts of room, sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free, n)
        if at < len(free):  # the row with the least room that still fits
            space = free[at]
            row = room[space].pop()
            if not room[space]:
                del room[space], free[at]
        else:
            row, space = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        left = space - n
        if left > 0:
            if left not in room:
                room[left] = []
                bisect.insort(free, left)
            room[left].append(row)
    return rows


def packed_example(parts: list[Example]) -> Example:
    """One row of `parts`: ids and labels concatenated, positions restarting at each part, and no label on each
    part's first token (it is never a target in an unpacked row either)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE, *part.labels[1:]]
        positions += range(len(part.input_ids))
    return Example(ids, labels, None, positions)


def pack(encoded: Encoded, capacity: int) -> Encoded:
    """The examples of `encoded` packed into rows of at most `capacity` tokens (each example is at most that)."""
    if encoded.format == "classification":
        raise LorakitError("--packing: classification examples cannot be packed")
    groups = pack_rows([len(e.input_ids) for e in encoded.examples], capacity)
    return replace(encoded, examples=[packed_example([encoded.examples[i] for i in g]) for g in groups])


def padding_fraction(lengths: list[int], batch_size: int, seed: int = 42, group_by_length: bool = False) -> float:
    """The share of padding in one epoch's micro-batches (each padded to its longest row), as training draws them."""
    batches = batch_order(lengths, batch_size, seed, 0, group_by_length)
    real = sum(lengths)
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / max(total, 1)


def data_note(
    before: Encoded, after: Encoded, capacity: int, batch_size: int, seed: int, group_by_length: bool = False
) -> str:
    """`packing: N examples in M rows of <= L tokens; padding X% -> Y%`."""
    old = padding_fraction([len(e.input_ids) for e in before.examples], batch_size, seed, group_by_length)
    new = padding_fraction([len(e.input_ids) for e in after.examples], batch_size, seed, group_by_length)
    return (
        f"packing: {len(before.examples)} examples in {len(after.examples)} rows of <= {capacity} tokens; "
        f"padding {100 * old:.1f}% -> {100 * new:.1f}% of the batches' tokens"
    )


@torch.no_grad()
def check_model(model: nn.Module, device: torch.device, autocast: Callable, vocab: int, half: bool) -> None:
    """Refuse a model whose attention ignores packed position ids: two short sequences packed in one row must give
    the logits each gives alone (within fp32 rounding, or bf16/fp16's)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, max(1, vocab), (1, n), generator=generator) for n in (7, 5))
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    try:
        with autocast():
            alone = [model(input_ids=x.to(device)).logits.float() for x in (a, b)]
            packed = model(
                input_ids=torch.cat([a, b], 1).to(device), position_ids=positions.to(device), use_cache=False
            ).logits.float()
    finally:
        model.train(was_training)
    expected = torch.cat(alone, 1)
    error = float((packed - expected).norm() / expected.norm().clamp_min(1e-12))
    if not math.isfinite(error) or error > (2e-2 if half else 1e-4):
        name = type(model).__name__
        raise LorakitError(
            f"--packing: {name}'s attention does not keep packed examples apart (relative logit error {error:.2g} "
            "against each example alone); train without --packing"
        )
