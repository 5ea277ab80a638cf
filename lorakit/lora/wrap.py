"""Whole-model operations: add LoRA layers in place, list them, merge, unmerge, disable, unwrap."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import LorakitError
from .fingerprint import forget
from .layer import LoRALayer, Slice
from .targets import Target, resolve_targets, split_targets


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(base module path, layer) for every LoRA layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def wrap_targets(model: nn.Module, targets: list[Target], rank: int, alpha: float, dropout: float) -> list[str]:
    """Wrap each target in a LoRALayer; returns adapter names (`path` or `path.slice`)."""
    names = []
    for target in targets:
        base = model.get_submodule(target.path)
        if isinstance(base, LoRALayer):
            raise LorakitError(f"{target.path} already has a LoRA layer")
        layer = LoRALayer(base, rank, alpha, dropout, list(target.slices) if target.slices else None)
        _set_submodule(model, target.path, layer)
        names += [f"{target.path}.{s.name}" if s.name else target.path for s in layer.slices]
    return names


def add_lora(
    model: nn.Module,
    targets: str | list[str] = "q,v",
    rank: int = 4,
    alpha: float = 32.0,
    dropout: float = 0.0,
    layers: list[int] | None = None,
) -> list[str]:
    """Freeze `model` and wrap the targeted projections with LoRA layers, in place.

    Args:
        model: a transformers model (or any nn.Module with linear layers).
        targets: `q,v`-style aliases, module suffixes or `re:REGEX` (see `lorakit.targets`).
        rank: r of every A/B pair.
        alpha: scaling numerator; the update is multiplied by alpha / rank.
        dropout: dropout on the input of the low-rank path.
        layers: restrict to these transformer blocks.

    Returns:
        The adapted names, `path` or `path.slice` for fused q/k/v slices.
    """
    if any(True for _ in lora_layers(model)):
        raise LorakitError("model already has LoRA layers; load another adapter with load_adapter instead")
    resolved = resolve_targets(model, targets, layers)
    model.requires_grad_(False)
    names = wrap_targets(model, resolved, rank, alpha, dropout)
    model.lorakit_targets = ",".join(split_targets(targets))  # recorded in the adapter file
    return names


def target_of(path: str, layer: LoRALayer) -> Target:
    """The Target that recreates `layer` at `path`."""
    return Target(path, None if layer.is_full else tuple(Slice(s.name, s.start, s.stop) for s in layer.slices))


def merge_adapter(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (W0 + alpha/r * B A), in place; idempotent."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo merge_adapter: subtract every update again; idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the low-rank path on or off (off: the model computes the base outputs exactly)."""
    for _, layer in lora_layers(model):
        if layer.merged and not enabled:
            raise LorakitError("cannot disable a merged adapter; unmerge it first")
        layer.enabled = enabled


def unwrap(model: nn.Module) -> None:
    """Replace every LoRA layer by its base module (merge first to keep the update)."""
    for path, layer in list(lora_layers(model)):
        if layer.merged:
            forget(layer.base)  # the merged weight is the base now
        _set_submodule(model, path, layer.base)


def oversized_ranks(model: nn.Module) -> list[tuple[str, int]]:
    """(adapted name, its largest useful rank) for every A/B pair whose rank exceeds the smaller side of its
    update (in x out): the rank of B A cannot exceed it, so the extra parameters add no capacity."""
    found = []
    for path, layer in lora_layers(model):
        for s in layer.slices:
            limit = min(layer.in_features, s.size)
            if layer.rank > limit:
                found.append((f"{path}.{s.name}" if s.name else path, limit))
    return found
