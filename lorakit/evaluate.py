"""Evaluation: loss and perplexity with the training masking, generation, text and classification metrics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .data import Example, collate
from .loss import IGNORE, batch_loss


@dataclass
class LossResult:
    """Mean loss over label tokens (examples for classification) and the count it averages over."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def label_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """Positions that carry a loss: shifted label tokens (causal LM) or examples (classification)."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    task: str = "causal-lm",
    max_batches: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LossResult:
    """Token-weighted mean loss over `examples` (in order, batches of `batch_size`, no label smoothing)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    # Sorted by length so that batches carry little padding; the mean does not depend on the order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for n, index in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            break
        batch = to_device(collate([examples[i] for i in index], pad_id, task), device)
        with autocast():
            loss_sum, tokens = batch_loss(model, batch, task)
        total += float(loss_sum)
        count += tokens
    model.train(was_training)
    return LossResult(total / max(count, 1), count)
