"""`lorakit train --dry-run`: parameter counts, adapter size and a peak-memory estimate without loading weights.

The model is built from its config on the meta device (no memory, no download of weights), wrapped with the
same LoRA layers the run would add, and counted. Peak memory is estimated as

    weights (in their dtype) + LoRA parameters, gradients and AdamW moments (fp32: 16 bytes each)
    + activations kept for the backward pass + logits at label positions (and their gradient)

where activations per block and token are counted in elements from the block's shapes (see `_block_elements`).
`bench/memory.py` compares the estimate with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lora import is_linear_like
from .targets import layer_index
from .wrap import add_lora, lora_layers

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_BYTES_PER_PARAM = 16  # fp32 parameter + gradient + two moments
HEADER_BYTES_PER_MODULE = 550  # JSON metadata per adapted module (path, digest, sketch): 557 measured on SmolLM2


@dataclass
class MemoryEstimate:
    """Counts are exact; byte figures other than tensor bytes are estimates."""

    trainable_params: int
    frozen_params: int
    adapter_tensor_bytes: int
    adapter_file_bytes: int
    weights_bytes: int
    lora_state_bytes: int
    activation_bytes: int
    activation_bytes_checkpointed: int
    logits_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.lora_state_bytes + self.activation_bytes + self.logits_bytes

    @property
    def peak_bytes_checkpointed(self) -> int:
        return self.weights_bytes + self.lora_state_bytes + self.activation_bytes_checkpointed + self.logits_bytes

    def to_json(self) -> dict[str, int]:
        d = dict(self.__dict__)
        d.update(peak_bytes=self.peak_bytes, peak_bytes_checkpointed=self.peak_bytes_checkpointed)
        return d


def meta_model(config: Any, task: str = "causal-lm") -> nn.Module:
    """The model class for `config`, built on the meta device: shapes only, no memory."""
    import transformers

    if task == "classification":
        cls = transformers.AutoModelForSequenceClassification
    else:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls(config)


def _block_elements(config: Any, lora_inputs_per_block: int) -> int:
    """Activation elements kept per token per transformer block during a LoRA backward pass.

    hidden H, MLP width I: two norm inputs (2H), q, k, v and the attention output kept by SDPA (4H), the MLP
    activation's inputs and the product feeding the down projection (2I, 3I when gated), each LoRA path's input
    (H per distinct input) and dropout masks are ignored (p = 0 is the default).
    """
    h = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or getattr(config, "dim", 0))
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inner = int(inner or getattr(config, "hidden_dim", None) or 4 * h)
    gated = hasattr(config, "hidden_act") and any(
        k in str(getattr(config, "model_type", "")) for k in ("llama", "mistral", "qwen", "gemma", "mixtral")
    )
    return 2 * h + 4 * h + (3 if gated else 2) * inner + lora_inputs_per_block * h


def estimate_memory(
    config: Any,
    targets: str,
    rank: int,
    alpha: float = 32.0,
    layers: list[int] | None = None,
    task: str = "causal-lm",
    batch_size: int = 8,
    seq_len: int = 512,
    label_fraction: float = 1.0,
    precision: str = "fp32",
    load_in_8bit: bool = False,
) -> MemoryEstimate:
    """Estimate a LoRA training run's memory from the model config alone.

    Args:
        config: a transformers config.
        targets, rank, alpha, layers: as for `add_lora`.
        task: `causal-lm` or `classification`.
        batch_size: examples per micro-batch; seq_len: their (padded) length.
        label_fraction: share of positions with a label (logits are computed only there).
        precision: compute dtype of the frozen base (fp32, bf16, fp16).
        load_in_8bit: linear weights of the blocks stored in 8 bits.
    """
    model = meta_model(config, task)
    add_lora(model, targets, rank=rank, alpha=alpha, layers=layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = dict(lora_layers(model))
    value_bytes = BYTES[precision]
    quantized = set()  # bitsandbytes replaces the linear layers of the blocks: 1 byte per weight
    if load_in_8bit:
        for path, module in model.named_modules():
            if is_linear_like(module) and layer_index(path) is not None:
                quantized.add(id(module.weight))
    weights = sum(
        p.numel() * (1 if id(p) in quantized else value_bytes) for p in model.parameters() if not p.requires_grad
    )
    n_blocks = max(1, int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)))
    distinct_inputs = len({_input_key(path) for path in lora})
    tokens = batch_size * seq_len
    per_block = _block_elements(config, distinct_inputs // n_blocks if distinct_inputs else 0)
    activations = tokens * n_blocks * per_block * value_bytes
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or getattr(config, "dim", 0))
    checkpointed = tokens * n_blocks * hidden * value_bytes + tokens * per_block * value_bytes
    vocab = int(getattr(config, "vocab_size", 0))
    if task == "classification":
        logits = batch_size * int(getattr(config, "num_labels", 2)) * 4 * 2
    else:
        logits = int(tokens * label_fraction) * vocab * 4 * 3  # fp32 logits, softmax and their gradient
    tensor_bytes = trainable * 4
    header = 8 + 600 + HEADER_BYTES_PER_MODULE * len(lora)
    return MemoryEstimate(
        trainable_params=trainable,
        frozen_params=frozen,
        adapter_tensor_bytes=tensor_bytes,
        adapter_file_bytes=tensor_bytes + header,
        weights_bytes=weights,
        lora_state_bytes=trainable * ADAMW_BYTES_PER_PARAM,
        activation_bytes=activations,
        activation_bytes_checkpointed=checkpointed,
        logits_bytes=logits,
    )


def _input_key(path: str) -> str:
    """LoRA layers reading the same tensor (q, k, v of one block) keep one copy of it: group them."""
    parent, _, leaf = path.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q_lin", "k_lin", "v_lin"):
        return parent + ".qkv"
    if leaf in ("gate_proj", "up_proj"):
        return parent + ".gate_up"
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def dry_run_report(cfg: Any) -> Any:
    """A rich table for `lorakit train --dry-run`: counts, adapter size and memory, from the config alone."""
    from rich.table import Table
    from transformers import AutoConfig

    from .models import PACKAGED, resolve_source

    config = AutoConfig.from_pretrained(resolve_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    if cfg.task == "classification":
        config.num_labels = cfg.num_labels or 2
    est = estimate_memory(
        config,
        cfg.targets,
        cfg.rank,
        cfg.alpha,
        layers=cfg.layers,
        task=cfg.task,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_length,
        precision=cfg.precision,
        load_in_8bit=cfg.load_in_8bit,
    )
    table = Table(title=f"lorakit train --dry-run: {cfg.model or PACKAGED}", show_header=False)
    table.add_row("trainable parameters (LoRA)", f"{est.trainable_params:,}")
    table.add_row("frozen parameters", f"{est.frozen_params:,}")
    table.add_row(
        "adapter file",
        f"{est.adapter_tensor_bytes:,} bytes of tensors + ~{est.adapter_file_bytes - est.adapter_tensor_bytes:,} "
        "header",
    )
    table.add_row(
        "weights", _mib(est.weights_bytes) + (" (8-bit linear layers)" if cfg.load_in_8bit else f" ({cfg.precision})")
    )
    table.add_row("LoRA parameters, gradients, AdamW state", _mib(est.lora_state_bytes))
    table.add_row(f"activations, batch {cfg.batch_size} x {cfg.max_length} tokens", _mib(est.activation_bytes))
    table.add_row("  with gradient checkpointing", _mib(est.activation_bytes_checkpointed))
    table.add_row("logits at label positions (+ gradient)", _mib(est.logits_bytes))
    chosen = est.peak_bytes_checkpointed if cfg.gradient_checkpointing else est.peak_bytes
    table.add_row(
        "estimated peak", f"{_mib(est.peak_bytes)} ({_mib(est.peak_bytes_checkpointed)} with gradient checkpointing)"
    )
    table.add_row("this run", _mib(chosen) + (" (gradient checkpointing on)" if cfg.gradient_checkpointing else ""))
    return table
