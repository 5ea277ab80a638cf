"""Training and evaluation losses, summed over label tokens so that callers can normalize by token count.

For causal LMs the vocabulary projection runs only where a label exists: prompt and padding positions need
no logits, which saves most of the LM head's work on prompt/completion data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder without LM head, LM head) when the model is a plain `backbone -> head` stack, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    # Models that post-process logits (soft-capping, scaling) go through their own forward.
    special = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
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
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = labels != IGNORE
    n_tokens = int(mask.sum())
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logits = logits[mask]  # (N, V)
    else:
        backbone, head = parts
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][mask])  # (N, V): the head only where a label exists
    loss = F.cross_entropy(logits.float(), labels[mask], reduction="sum", label_smoothing=label_smoothing)
    return loss, n_tokens


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
