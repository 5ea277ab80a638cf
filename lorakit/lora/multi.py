"""Several adapters on one base at once: each row of a batch goes through its own adapter, as PEFT's
`adapter_names` and vLLM's multi-LoRA batches do, so that N adapters generate in one pass instead of N.

`stack_adapters(model, adapters)` wraps every module any of the adapters adapts and gives each LoRA layer a bank:
per adapter, its A/B pairs, scaling and output ranges, or nothing where that adapter leaves the module alone.
The adapters may differ in rank, alpha, targets and fused q/k/v slices. `adapter_per_row(model, index)` says which
adapter each batch row of the forward passes inside it takes (-1: the base alone; one int: every row);
`unwrap(model)` gives the plain base back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import LorakitError
from .adapter import Adapter, ModuleInfo, check_base
from .base import linear_at
from .layer import LoRALayer
from .targets import Target
from .wrap import lora_layers, unwrap, wrap_targets


def stack_adapters(model: nn.Module, adapters: list[Adapter], verify_base: bool = True) -> None:
    """Put every adapter of `adapters` on the plain base `model` at once, each under its index in the list.

    Args:
        model: a base without LoRA layers, on the device it will run on.
        adapters: adapter files already read (`read_adapter`); LoRA only, no trained heads.
        verify_base: refuse an adapter trained on other base weights (as load_adapter does).
    """
    if not adapters:
        raise LorakitError("stack_adapters needs at least one adapter")
    if any(True for _ in lora_layers(model)):
        raise LorakitError("stack_adapters needs a plain base; this model already has LoRA layers")
    for adapter in adapters:
        if adapter.trained_params:
            raise LorakitError(f"{adapter.path}: holds a trained head; adapters per row cover LoRA layers only")
    first: dict[str, ModuleInfo] = {}
    for adapter in adapters:
        for info in adapter.modules:
            linear_at(model, info.path, (info.in_features, info.out_features), str(adapter.path))
            first.setdefault(info.path, info)
    model.requires_grad_(False)
    for path, info in first.items():  # the layer's own A/B (B = 0: a no-op) stay unused; the bank replaces them
        slices = None if info.slices is None else tuple(info.slices)
        wrap_targets(model, [Target(path, slices)], info.rank, info.alpha, info.dropout)
    try:
        if verify_base:
            for adapter in adapters:
                check_base(adapter, model)
    except LorakitError:
        unwrap(model)
        raise
    layers = dict(lora_layers(model))
    for layer in layers.values():
        layer.bank = [None] * len(adapters)
        layer.eval()  # the bank is for inference: no dropout
    for j, adapter in enumerate(adapters):
        for info in adapter.modules:
            layer = layers[info.path]
            device = layer.lora_A[0].device
            a_list = [adapter.tensors[f"{name}.lora_A"].float().to(device) for name in info.names]
            b_list = [adapter.tensors[f"{name}.lora_B"].float().to(device) for name in info.names]
            ranges = tuple((s.start, s.stop) for s in info.slices) if info.slices else ((0, info.out_features),)
            layer.bank[j] = (a_list, b_list, info.alpha / info.rank, ranges)  # type: ignore[index]


@contextmanager
def adapter_per_row(model: nn.Module, index: int | Sequence[int]) -> Iterator[None]:
    """Inside, batch row i of every forward pass takes adapter `index[i]` of the stack (-1: the base alone); one
    int: every row takes that adapter. With beam search each row's beams take the row's adapter."""
    layers = [layer for _, layer in lora_layers(model) if layer.bank is not None]
    if not layers:
        raise LorakitError("adapter_per_row needs a model with stacked adapters (stack_adapters)")
    count = len(layers[0].bank or [])
    values = [index] if isinstance(index, int) else list(index)
    bad = [i for i in values if not isinstance(i, int) or not -1 <= i < count]
    if bad:
        raise LorakitError(f"adapter index {bad[0]} out of range; expected -1 (the base) to {count - 1}")
    device = layers[0].lora_A[0].device
    rows: torch.Tensor | int = index if isinstance(index, int) else torch.tensor(values, device=device)
    for layer in layers:
        layer.row_adapter = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapter = None


def stacked(model: nn.Module) -> bool:
    """Whether `model` holds stacked adapters."""
    return any(isinstance(m, LoRALayer) and m.bank is not None for m in model.modules())


__all__ = ["stack_adapters", "adapter_per_row", "stacked"]
