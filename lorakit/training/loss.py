"""Training and evaluation losses, summed over label tokens so that callers can normalize by token count.

For causal LMs the vocabulary projection runs only where a label exists: prompt and padding positions need
no logits, which saves most of the LM head's work on prompt/completion data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, Example, collate, to_device

LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config keys of models whose logits are post-processed: they run their own forward, logits at every position."""


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder without LM head, LM head) when the model is a plain `backbone -> head` stack, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    # Models that post-process logits (soft-capping, scaling) go through their own forward.
    special = any(getattr(config, k, None) for k in LOGIT_POSTPROCESSING)
    # A base sharded by --fsdp gathers its embeddings and head in the hooks of its own forward.
    special = special or getattr(model, "lorakit_sharded", False)
    if head is None or backbone is None or backbone is model or special:
        return None
    return backbone, head


def causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions and the number of those positions.

    Args:
        model: a causal LM (possibly LoRA-wrapped).
        batch: input_ids, attention_mask, labels (B, T); labels are IGNORE where no loss is taken.
        label_smoothing: epsilon of label smoothing.
    """
    labels = batch["labels"]
    # Flat positions in (B x T) that predict a label (position t predicts token t+1), and those labels.
    index = batch[LABEL_INDEX] if LABEL_INDEX in batch else label_positions(labels)
    targets = labels.reshape(-1).index_select(0, index + 1)
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(**model_inputs(batch)).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, index)  # (N, V)
    else:
        backbone, head = parts
        hidden = backbone(**model_inputs(batch)).last_hidden_state
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index))  # the head only where labels are
    loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
    return loss, int(index.numel())


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions in (B x T) of the tokens whose next token carries a loss (never a row's last position)."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    return predicts.reshape(-1).nonzero().squeeze(1)


LABEL_INDEX = "label_index"
"""Batch key: `label_positions` of the batch, computed on the host."""


def with_label_index(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """A causal-LM batch (still on the host) with its label positions, so that the loss on the device needs no
    host-device synchronisation (a boolean mask's positions on the device must be read back to size the result)."""
    if task == "classification":
        return batch
    return {**batch, LABEL_INDEX: label_positions(batch["labels"])}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a batch: ids and attention mask, or for a packed batch (`position_ids`,
    restarting at 0 for each example) the position ids and no mask: transformers then keeps every example's
    attention to itself (a block-diagonal causal mask; flash-attention's variable-length kernel)."""
    # No KV cache: nothing reuses it, and a cache object per layer makes torch.compile recompile for every layer.
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def classification_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's examples and the number of examples."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    labels = batch["labels"]  # (B,)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    return loss, int(labels.numel())


def batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """The summed loss of one batch for `task` (`causal-lm` or `classification`) and its token count."""
    if task == "classification":
        return classification_loss(model, batch, label_smoothing)
    return causal_lm_loss(model, batch, label_smoothing)


def example_label_count(example: Example, task: str) -> int:
    """`label_count` of one example (a batch's count is the sum over its examples: padding carries no label)."""
    if task == "classification":
        return 1
    return sum(label != IGNORE for label in example.labels[1:])


def label_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """Positions that carry a loss: shifted label tokens (causal LM) or examples (classification)."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class LossStep(nn.Module):
    """The model's summed loss as a module, so that DDP's forward (and gradient sync) sees every step."""

    def __init__(self, model: nn.Module, task: str, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = batch_loss(self.model, batch, self.task, self.label_smoothing)
        return loss_sum


@dataclass
class LossResult:
    """Mean loss over label tokens (examples for classification) and the count it averages over."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    task: str = "causal-lm",
    max_batches: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[], None] | None = None,
) -> LossResult:
    """Token-weighted mean loss over `examples` (in order, batches of `batch_size`, no label smoothing); `on_batch`
    is called after each batch (a progress bar)."""
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
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    return LossResult(total / max(count, 1), count)
