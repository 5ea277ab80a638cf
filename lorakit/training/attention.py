"""`--attn-implementation eager|sdpa|flash_attention_2`: the attention kernel transformers runs.

- eager: the model's own matmul-softmax-matmul (every model has it);
- sdpa: torch's `scaled_dot_product_attention` (fused kernels on GPUs; transformers' default where supported);
- flash_attention_2: the flash-attn package's kernels (CUDA, bf16 or fp16 only), with variable-length rows for
  `--packing` (no work spent on padding).

auto (the default): flash_attention_2 where it can run (the package, a CUDA device, bf16/fp16, a model class that
supports it), else transformers' default for the model. Asked for and unable to run: one line, before loading.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import LorakitError

FLASH = "flash_attention_2"


def flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_problem(device: torch.device, precision: str) -> str | None:
    """Why flash_attention_2 cannot run here (None: it can)."""
    if not flash_installed():
        return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
    if device.type != "cuda":
        return "it needs a CUDA GPU and this run is on the CPU"
    if precision == "fp32":
        return "it runs in bf16 or fp16 only; add --precision bf16 (or fp16)"
    return None


def supports_flash(config: Any, task: str) -> bool:
    """Whether the transformers class that loads `config` for `task` has a flash-attention path."""
    import transformers

    auto = transformers.AutoModelForSequenceClassification if task == "classification" else None
    auto = auto or transformers.AutoModelForCausalLM
    try:
        return bool(getattr(auto._model_mapping[type(config)], "_supports_flash_attn", False))
    except (KeyError, AttributeError, ValueError):
        return False


def resolve(asked: str | None, device: torch.device, precision: str, config: Any = None, task: str = "") -> str | None:
    """The implementation to load the model with; None: transformers' default for the model."""
    if asked == FLASH:
        problem = flash_problem(device, precision)
        if problem:
            raise LorakitError(f"--attn-implementation {FLASH}: {problem}")
        return FLASH
    if asked not in (None, "auto"):
        return asked
    if flash_problem(device, precision) is None and config is not None and supports_flash(config, task):
        return FLASH
    return None
