"""Reading the base layers LoRA wraps: their type, shape and weight, whatever their storage.

`nn.Linear` stores its weight (out, in); transformers' `Conv1D` (GPT-2) stores it (in, out); bitsandbytes'
`Linear8bitLt` holds int8 rows with a float scale per row; `Linear4bit` (QLoRA's NF4, or FP4) holds packed 4-bit
codes with a scale per block of 64 values (`Params4bit.quant_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 8-bit (or other integer) base layer: usable, but not mergeable in place."""
    weight = getattr(module, "weight", None)
    return type(module).__module__.startswith("bitsandbytes") or (
        weight is not None and not torch.is_floating_point(weight)
    )


def four_bit_type(module: nn.Module) -> str | None:
    """`nf4` or `fp4` for a bitsandbytes 4-bit layer (its weight carries a quant_state); None otherwise."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return str(state.quant_type) if state is not None else None


def quantized_bits(module: nn.Module) -> str:
    """`4-bit` or `8-bit`: how a quantized base layer stores its weight (for messages)."""
    return "4-bit" if four_bit_type(module) else "8-bit"


def is_linear_like(module: nn.Module) -> bool:
    """What a LoRA layer can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module, read from its type."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
        return int(in_features), int(out_features)
    return int(module.in_features), int(module.out_features)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a float (out, in) tensor; 8-bit and 4-bit weights are dequantized."""
    weight = module.weight
    if is_conv1d(module):
        return weight.detach().T
    if torch.is_floating_point(weight):
        return weight.detach()
    if four_bit_type(module):
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()  # (out, in)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise LorakitError(f"cannot read the quantized weight of {type(module).__name__} (no SCB scales)")
    return weight.detach().float() * (scb.float().unsqueeze(1) / 127.0)  # row-wise absmax int8


def linear_at(model: nn.Module, path: str, shape: tuple[int, int], where: str) -> nn.Module:
    """The linear-like module at `path` that an adapter's (in, out) `shape` fits; otherwise one error naming
    `where` (the adapter file) and what differs: another architecture or another base."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        message = f"{where}: module {path} not found in this model; adapter for another architecture?"
        raise LorakitError(message) from None
    if not is_linear_like(module):
        raise LorakitError(f"{where}: {path} is a {type(module).__name__} here, not a linear layer")
    if base_shape(module) != tuple(shape):
        raise LorakitError(
            f"{where}: {path} is {base_shape(module)} (in, out) here, the adapter expects {tuple(shape)}; "
            "adapter for another base?"
        )
    return module
