"""How results look in a terminal: rich tables and lines for what the library returns.

The CLI parses, calls the library and prints what these functions draw; nothing here computes a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .deploy.merge import MergeResult
    from .training.config import TrainConfig
    from .training.loop import TrainResult
    from .training.memory import MemoryEstimate


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def train_table(result: TrainResult) -> Table:
    """The summary of a finished run."""
    table = Table(title="lorakit train", show_header=False)
    table.add_row("run folder", escape(str(result.out)))
    table.add_row("adapter", escape(f"{result.adapter} ({result.adapter_bytes:,} bytes)"))
    total = result.trainable_params + result.frozen_params
    table.add_row("trainable parameters", f"{result.trainable_params:,} of {total:,}")
    resumed = f" (resumed at {result.resumed_from})" if result.resumed_from else ""
    table.add_row("steps", f"{result.steps}{resumed}")
    processes = f" on {result.world_size} processes" if result.world_size > 1 else ""
    table.add_row("time", f"{result.seconds:.1f} s{processes}")
    table.add_row("peak memory", f"{result.peak_memory_mb:,.0f} MiB")
    if result.train_loss is not None:
        table.add_row("final train loss", f"{result.train_loss:.4f}")
    if result.eval_loss is not None and result.first_eval_loss is not None:
        table.add_row("eval loss before -> after", f"{result.first_eval_loss:.4f} -> {result.eval_loss:.4f}")
    return table


def before_after_lines(examples: list[dict[str, str]]) -> list[str]:
    """The demo's generations of the base and of the adapter, with the reference."""
    lines = ["generated (greedy), base model vs. with the adapter:"]
    for ex in examples:
        lines += [
            f"[bold]{escape(ex['prompt'])}[/]",
            f"  before:    {escape(ex['before'])}",
            f"  after:     {escape(ex['after'])}",
            f"  reference: {escape(ex['reference'])}",
        ]
    return lines


def dry_run_table(cfg: TrainConfig, est: MemoryEstimate, cuda: bool) -> Table:
    """`lorakit train --dry-run`: counts, adapter size and memory, from the config alone."""
    from .models import PACKAGED

    table = Table(title=escape(f"lorakit train --dry-run: {cfg.model or PACKAGED}"))
    table.show_header = False
    head = " + new head" if cfg.task == "classification" else ""
    table.add_row(f"trainable parameters (LoRA{head})", f"{est.trainable_params:,}")
    table.add_row("frozen parameters", f"{est.frozen_params:,}")
    table.add_row("adapter file", f"{est.adapter_file_bytes:,} bytes ({est.adapter_tensor_bytes:,} of tensors)")
    weights = " (8-bit linear layers)" if cfg.load_in_8bit else f" ({cfg.precision})"
    table.add_row("weights", _mib(est.weights_bytes) + weights)
    table.add_row("LoRA parameters, gradients, AdamW state", _mib(est.lora_state_bytes))
    table.add_row(f"activations, batch {cfg.batch_size} x {cfg.max_length} tokens", _mib(est.activation_bytes))
    table.add_row("  with gradient checkpointing", _mib(est.activation_bytes_checkpointed))
    table.add_row("logits at label positions (+ gradient)", _mib(est.logits_bytes))
    chosen = est.peak_bytes_checkpointed if cfg.gradient_checkpointing else est.peak_bytes
    peaks = f"{_mib(est.peak_bytes)} ({_mib(est.peak_bytes_checkpointed)} with gradient checkpointing)"
    table.add_row("estimated peak", peaks)
    table.add_row("this run", _mib(chosen) + (" (gradient checkpointing on)" if cfg.gradient_checkpointing else ""))
    if not cuda:
        table.caption = (
            "Live tensors. On CPU, glibc's malloc keeps freed buffers in the heap, so the resident set is larger "
            "than this (bench/memory.py measures by how much)."
        )
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def eval_table(rows: list[dict[str, Any]]) -> Table:
    """One row per evaluated model (the base first), one column per number."""
    keys = [k for k in rows[0] if k not in ("name", "predictions")]
    table = Table(title="lorakit eval")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(escape(r["name"]), *[_cell(r.get(k)) for k in keys])
    return table


def merge_lines(result: MergeResult) -> list[str]:
    """What `lorakit merge` did and checked."""
    lines = [
        f"merged {result.modules} modules into {escape(result.base_model)} ({result.dtype}); "
        f"probe max |Δlogits| = {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    ]
    if result.quantized_diff is not None:
        lines.append(
            f"8-bit base + adapter vs. merged (full precision): max |Δlogits| = {result.quantized_diff:.3g} "
            "(what the 8-bit base costs)"
        )
    note = "" if result.tokenizer else " (the base has no tokenizer files; none copied)"
    lines.append(f"wrote {escape(str(result.out))}{note}")
    return lines
