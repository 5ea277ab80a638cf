"""`lorakit train --dry-run`: parameter counts, adapter size, a peak-memory estimate and the run's length without
loading weights.

The model is built from its config on the meta device (no memory, no download of weights), wrapped with the
same LoRA layers the run would add, and counted. Local training data (a file or a saved datasets folder) is read,
split (`--val-split`) and tokenized with the model's tokenizer as the run would (`DataShape`): activations are
sized for the longest micro-batch the run can meet, the longest row times the batch size (the length-grouped
sampler pads a batch to its longest row; no batch is longer), and the examples and steps are counted. A hub
dataset is not downloaded: activations are sized for `--max-length` tokens per row, as a bound. Peak memory is
estimated as

    weights (in their dtype) + LoRA parameters, gradients and AdamW moments (fp32: 16 bytes each)
    + activations kept for the backward pass + logits at label positions (and their gradient)

where activations per block and token are counted in elements from the block's shapes (see `_block_elements`).
With `--load-in-4bit` the blocks' linear weights count their packed 4-bit values and quantization constants
(`four_bit_bytes`), plus one dequantized weight in flight; with `--fsdp` and `--nproc N` every figure is per process:
1/N of the frozen weights plus what FSDP gathers at a time (`sharded_bytes`).
`bench/memory.py` compares the estimate with measured peaks.

Parameter counts are exact: the same LoRA layers, and for classification the head parameters that the checkpoint
lacks (the run trains them in full). The adapter file size is exact up to the digits of the base fingerprints:
its safetensors header is built as `save_adapter` builds it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..lora.layer import base_shape, is_linear_like
from ..lora.targets import has_gated_mlp, input_group, layer_index
from ..lora.wrap import add_lora, lora_layers

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_BYTES_PER_PARAM = 16  # fp32 parameter + gradient + two moments
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SKETCH_PLACEHOLDER = [-0.123456, 0.123456, -0.123456, 0.123456]  # the typical printed width of a real sketch


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


def _block_elements(config: Any, lora_input_width: int) -> int:
    """Activation elements kept per token per transformer block during a LoRA backward pass.

    hidden H, MLP width I: the two norm inputs (2H); q, k, v and the output kept by SDPA (4H; k and v narrower with
    grouped-query attention); the MLP's
    intermediates kept for its activation's backward (2I: the up projection and the activation's input; gated MLPs
    also keep the activation's output, 3I); and the input of every LoRA path, once per distinct input
    (`lora_input_width` elements: H for q,v; I more when down_proj is adapted). The frozen projections keep
    nothing (no weight gradient); dropout masks are ignored (p = 0 is the default). Checked against the tensors
    autograd saves (`torch.autograd.graph.saved_tensors_hooks`) on a Llama: within 10%.
    """
    h = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or getattr(config, "dim", 0))
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    inner = int(inner or getattr(config, "hidden_dim", None) or 4 * h)
    gated = has_gated_mlp(getattr(config, "model_type", None))
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv = h * (getattr(config, "num_key_value_heads", None) or heads) // heads  # k, v width
    return 2 * h + (2 * h + 2 * kv) + (3 if gated else 2) * inner + lora_input_width


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
    label_tokens: int | None = None,
    precision: str = "fp32",
    load_in_8bit: bool = False,
    checkpoint_keys: Collection[str] | None = None,
    base_model: str = "",
    adapter_metadata: dict[str, str] | None = None,
    load_in_4bit: str | None = None,
    fsdp: int | None = None,
) -> MemoryEstimate:
    """Estimate a LoRA training run's memory from the model config alone.

    Args:
        config: a transformers config.
        targets, rank, alpha, layers: as for `add_lora`.
        task: `causal-lm` or `classification`.
        batch_size: examples per micro-batch; seq_len: their (padded) length.
        label_fraction: share of positions with a label (logits are computed only there).
        label_tokens: positions with a label in the micro-batch (default: batch_size x seq_len x label_fraction).
        precision: compute dtype of the frozen base (fp32, bf16, fp16).
        load_in_8bit: linear weights of the blocks stored in 8 bits.
        checkpoint_keys: tensor names in the checkpoint (classification: head parameters it lacks are new and
            trained in full); None: the whole head is new, as for a pretrained encoder or LM.
        base_model, adapter_metadata: what the adapter file will record (`base_model`, extra metadata such as
            the training configuration), for its size.
        load_in_4bit: `nf4` or `fp4`: linear weights of the blocks stored in 4 bits (`four_bit_bytes`).
        fsdp: the frozen base sharded over this many processes (`sharded_bytes`); the estimate is per process.
    """
    model = meta_model(config, task)
    add_lora(model, targets, rank=rank, alpha=alpha, layers=layers)
    if task == "classification":
        new = new_head_params(model, checkpoint_keys)
        for name, param in model.named_parameters():
            if name in new:
                param.requires_grad_(True)  # as train() does for the parameters the checkpoint lacks
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = dict(lora_layers(model))
    value_bytes = BYTES[precision]
    quantized = {}  # bitsandbytes replaces the linear layers of the blocks: 1 byte per weight + a scale per row
    if load_in_8bit:
        for path, module in model.named_modules():
            if is_linear_like(module) and layer_index(path) is not None:
                quantized[id(module.weight)] = 4 * base_shape(module)[1]  # fp32 row scales (SCB)
    if load_in_4bit:
        for path, module in model.named_modules():
            if is_linear_like(module) and layer_index(path) is not None:
                quantized[id(module.weight)] = four_bit_bytes(module.weight.numel()) - module.weight.numel()
    weights = sum(
        p.numel() + quantized[id(p)] if id(p) in quantized else p.numel() * value_bytes
        for p in model.parameters()
        if not p.requires_grad
    )
    if load_in_4bit and quantized:  # each matmul dequantizes its weight to the compute dtype: the largest, once
        weights += max(p.numel() for p in model.parameters() if id(p) in quantized) * value_bytes
    if fsdp and fsdp > 1:
        weights = sharded_bytes(model, weights, fsdp, value_bytes)
    n_blocks = max(1, int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)))
    model_type = getattr(config, "model_type", None)
    lora_inputs = {input_group(path, model_type): layer.in_features for path, layer in lora.items()}  # one copy each
    tokens = batch_size * seq_len
    per_block = _block_elements(config, sum(lora_inputs.values()) // n_blocks)
    activations = tokens * n_blocks * per_block * value_bytes
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or getattr(config, "dim", 0))
    checkpointed = tokens * n_blocks * hidden * value_bytes + tokens * per_block * value_bytes
    vocab = int(getattr(config, "vocab_size", 0))
    if task == "classification":
        logits = batch_size * int(getattr(config, "num_labels", 2)) * 4 * 2
    else:
        labelled = int(tokens * label_fraction) if label_tokens is None else label_tokens
        logits = labelled * vocab * 4 * 3  # fp32 logits, softmax and their gradient
    tensor_bytes = trainable * 4
    dtype = "int8" if load_in_8bit else load_in_4bit or DTYPE_NAMES[precision]
    return MemoryEstimate(
        trainable_params=trainable,
        frozen_params=frozen,
        adapter_tensor_bytes=tensor_bytes,
        adapter_file_bytes=adapter_file_bytes(model, dtype, base_model, adapter_metadata),
        weights_bytes=weights,
        lora_state_bytes=trainable * ADAMW_BYTES_PER_PARAM,
        activation_bytes=activations,
        activation_bytes_checkpointed=checkpointed,
        logits_bytes=logits,
    )


FOUR_BIT_BLOCK = 64  # weights per absmax scale (bitsandbytes' default for 4-bit)
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level fp32 scale (double quantization)


def four_bit_bytes(n: int) -> int:
    """Bytes of `n` weights in 4 bits with double quantization (what `--load-in-4bit` loads): two values per byte,
    an 8-bit absmax per block of 64, an fp32 scale per 256 absmax values, the 256-entry fp32 code of that second
    level, the 16-entry fp32 code of NF4 / FP4 and the absmax offset (fp32)."""
    blocks = -(-n // FOUR_BIT_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // DOUBLE_QUANT_BLOCK) + 4 * (256 + 16 + 1)


def sharded_bytes(model: nn.Module, weights: int, world: int, value_bytes: int) -> int:
    """Frozen-weight bytes per process under --fsdp: its 1/world share of every parameter (LoRA stays whole on each
    process, counted apart), plus the unsharded copies FSDP gathers: the block being computed and the next one
    (prefetched), and the embeddings and head (gathered for the whole forward, as the root group)."""
    from .fsdp import transformer_blocks

    blocks = transformer_blocks(model)
    block_bytes = max(sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in blocks) * value_bytes
    in_blocks = {id(p) for p in blocks.parameters()}
    rest = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks) * value_bytes
    return -(-weights // world) + 2 * block_bytes + rest


def new_head_params(model: nn.Module, checkpoint_keys: Collection[str] | None) -> set[str]:
    """Names of the parameters outside the base model (the task head) that the checkpoint does not hold.

    transformers adds or strips the base model prefix (`bert.`) when a checkpoint was saved with or without it.
    """
    base = {id(p) for p in getattr(model, "base_model", model).parameters()}
    head = {name for name, p in model.named_parameters() if id(p) not in base}
    prefix = getattr(model, "base_model_prefix", "") + "."
    if checkpoint_keys is None:
        return head
    keys = set(checkpoint_keys)
    return {name for name in head if name not in keys and prefix + name not in keys}


def read_checkpoint_keys(folder: str | Path) -> set[str] | None:
    """Tensor names of a local model folder, read from safetensors headers (no weights); None if unknown."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    file = folder / "model.safetensors"
    if not file.is_file():
        return None
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k for k in header if k != "__metadata__"}


def adapter_file_bytes(model: nn.Module, dtype: str, base_model: str = "", extra: dict[str, str] | None = None) -> int:
    """Size of the file `save_adapter` writes for this wrapped (meta) model: tensors + the safetensors header.

    The header is built as save_adapter builds it; only the fingerprint values are placeholders of their width.
    """
    from ..lora.adapter import ModuleInfo, build_metadata, trained_params

    modules, shapes = [], {}
    for path, layer in lora_layers(model):
        base_type = {"int8": "Linear8bitLt", "nf4": "Linear4bit", "fp4": "Linear4bit"}.get(dtype)
        base_type = base_type or type(layer.base).__name__
        slices = None if layer.is_full else list(layer.slices)
        info = ModuleInfo(
            path, layer.in_features, layer.out_features, layer.rank, layer.alpha, layer.dropout_p, slices,
            base_type, "0" * 64, SKETCH_PLACEHOLDER, dtype,
        )  # fmt: skip
        modules.append(info)
        for name, a, b in zip(info.names, layer.lora_A, layer.lora_B):
            shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = list(a.shape), list(b.shape)
    shapes.update({name: list(p.shape) for name, p in trained_params(model).items()})
    header: dict[str, Any] = {"__metadata__": build_metadata(model, modules, base_model or None, extra)}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)  # fp32
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + -(-len(text) // 8) * 8 + offset  # length prefix, header padded to 8 bytes, data


@dataclass
class DataShape:
    """What the dry run knows of the run's data: the micro-batch the activations are sized for, and (local data)
    the examples and steps."""

    batch_size: int
    """Rows of the micro-batch the activations are sized for."""
    seq_len: int
    """Its padded length in tokens."""
    sized_by: str
    """Why that length: the longest row of the data, or --max-length and the reason the data was not read."""
    label_tokens: int | None = None
    """Positions with a label in that micro-batch, at most (None: every position)."""
    examples: int | None = None
    """Training examples after encoding, or rows where they could not be tokenized (None: the data was not read)."""
    tokenized: bool = True
    truncated: int = 0
    dropped: int = 0
    eval_rows: int | None = None
    """Rows held out for evaluation by --val-split."""
    steps_per_epoch: int | None = None
    total_steps: int | None = None


@dataclass
class DryRun:
    estimate: MemoryEstimate
    data: DataShape


def dry_run_estimate(cfg: Any) -> MemoryEstimate:
    """The estimate for a TrainConfig: the model's config (and its checkpoint's tensor names), never its weights."""
    return dry_run(cfg).estimate


def dry_run(cfg: Any) -> DryRun:
    """The estimate and the data's shape for a TrainConfig: the model's config, its checkpoint's tensor names and
    its tokenizer (for local data), never its weights."""
    from ..models import base_name, check_task, context_length, load_config, resolve_source

    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    check_task(config, cfg.task, cfg.model or base_name(None))
    source = resolve_source(cfg.model)
    positions = context_length(config)
    max_length = min(cfg.max_length, positions or cfg.max_length)  # as train() caps it
    shape, num_labels = data_shape(cfg, max_length)
    from .loss import LOGIT_POSTPROCESSING

    if any(getattr(config, k, None) for k in LOGIT_POSTPROCESSING):  # logits at every position, not only labels
        shape = replace(shape, label_tokens=None)
    if cfg.task == "classification":
        config.num_labels = cfg.num_labels or num_labels or config.num_labels
    estimate = estimate_memory(
        config,
        cfg.targets,
        cfg.rank,
        cfg.alpha,
        layers=cfg.layers,
        task=cfg.task,
        batch_size=shape.batch_size,
        seq_len=shape.seq_len,
        label_tokens=shape.label_tokens,
        precision=cfg.precision,
        load_in_8bit=cfg.load_in_8bit,
        load_in_4bit=cfg.bnb_4bit_quant_type if cfg.load_in_4bit else None,
        fsdp=(cfg.nproc or 1) if cfg.fsdp else None,
        checkpoint_keys=read_checkpoint_keys(source) if Path(source).is_dir() else None,
        base_model=base_name(cfg.model),
        adapter_metadata={"train_config": json.dumps(asdict(replace(cfg, dry_run=False)))},  # what train() records
    )
    return DryRun(estimate, shape)


def data_shape(cfg: Any, max_length: int) -> tuple[DataShape, int | None]:
    """The shape of the run's training data and its class count (classification).

    Local data is read, split and tokenized as `train` does (its errors are the run's); a hub dataset is not
    downloaded (`--max-length`), and a model without a tokenizer sizes by `--max-length` too, counting rows
    instead of examples.
    """
    from ..models import load_tokenizer
    from .data import IGNORE, is_hub_dataset
    from .loop import encode_data, read_data, run_length

    world = cfg.nproc or 1
    if cfg.data is None or is_hub_dataset(cfg.data):  # a missing local file is an error below, as in the run
        why = "--max-length; a hub dataset is not downloaded" if cfg.data else "--max-length; no data given"
        return DataShape(cfg.batch_size, max_length, why, total_steps=cfg.max_steps), None
    # Evaluation data does not change the training peak: only --val-split's rows are read (and not downloaded).
    rows, held = read_data(replace(cfg, eval_data=None))
    eval_rows = len(held.rows) if held is not None else None
    try:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except LorakitError:  # e.g. a folder holding only config.json: the run itself would say why
        _, per_epoch, total = run_length(len(rows.rows), cfg, world)
        shape = DataShape(
            cfg.batch_size, max_length, "--max-length; the model has no usable tokenizer", examples=len(rows.rows),
            tokenized=False, eval_rows=eval_rows, steps_per_epoch=per_epoch, total_steps=total,
        )  # fmt: skip
        return shape, rows.num_labels
    encoded, _ = encode_data(cfg, rows, held, tokenizer, max_length)
    examples = encoded.examples
    batch = min(cfg.batch_size, len(examples))
    if encoded.format == "classification":
        labels = None
    else:
        labels = batch * max(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)
    _, per_epoch, total = run_length(len(examples), cfg, world)
    shape = DataShape(
        batch, max(len(e.input_ids) for e in examples), "the longest row of the data", labels, len(examples),
        True, encoded.truncated, encoded.dropped, eval_rows, per_epoch, total,
    )  # fmt: skip
    return shape, rows.num_labels
