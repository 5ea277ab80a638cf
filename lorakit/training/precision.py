"""Mixed precision: the frozen base computes in fp32, bf16 or fp16; what trains is always fp32.

- The base is loaded in the compute dtype (or 8 bits) and runs under autocast for bf16 / fp16.
- LoRA's A and B, and a new task head, are fp32 master weights in every precision: AdamW's small updates are not
  rounded away in bf16, and fp16's gradient scaler (which refuses fp16 gradients) unscales fp32 gradients.
- fp16 gradients are scaled (`torch.amp.GradScaler`) so that small ones do not underflow; a step whose gradients
  overflow is skipped by the scaler. A base whose activations overflow fp16 gives a non-finite loss at step 1,
  which stops the run (`TrainingDiverged`, exit 1) with one line saying so and naming bf16 or fp32 (fp32's range)
  to use instead; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError

Autocast = Callable[[], contextlib.AbstractContextManager]
# fp16 autocast over a bitsandbytes 8-bit base on the CPU: the backward fails inside torch 2.3 ("modified by an
# inplace operation", bitsandbytes 0.47 and 0.50 alike) and works with torch 2.13; versions between are untested.
FP16_8BIT_CPU_TORCH = (2, 13)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> Autocast:
    """A context-manager factory for the compute precision (fp32: no autocast)."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, load_in_8bit: bool, device: torch.device) -> None:
    """Refuse, before the model loads, a combination this torch cannot train."""
    if precision == "fp16" and load_in_8bit and device.type == "cpu":
        version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
        if version < FP16_8BIT_CPU_TORCH:
            need = ".".join(map(str, FP16_8BIT_CPU_TORCH))
            raise LorakitError(
                f"--precision fp16 with --load-in-8bit on the CPU needs torch >= {need} (this is "
                f"{torch.__version__}); use --precision bf16 or fp32"
            )


def fp32_master_weights(params: list[nn.Parameter]) -> None:
    """Keep every trained parameter in fp32 (a new head loaded with a bf16/fp16 base comes in that dtype)."""
    with torch.no_grad():
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()


def gradient_scaler(precision: str, device: torch.device) -> Any:
    """fp16: a gradient scaler; otherwise a disabled one (its calls pass gradients through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
