"""How results look in a terminal: rich tables and lines for what the library returns.

The CLI parses, calls the library and prints what these functions draw; nothing here computes a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

if TYPE_CHECKING:
    from .deploy.merge import MergeResult
    from .training.config import TrainConfig
    from .training.loop import TrainResult
    from .training.memory import DataShape, MemoryEstimate


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def train_table(result: TrainResult) -> Table:
    """The summary of a finished run."""
    table = Table(title="lorakit train", show_header=False)
    table.add_row("run folder", escape(str(result.out)))
    table.add_row("adapter", escape(f"{result.adapter} ({result.adapter_bytes:,} bytes)"))
    if result.best_adapter is not None and result.best_value is not None:
        best = f"{result.best_adapter} (step {result.best_step}, eval {result.best_metric} {result.best_value:.4f})"
        table.add_row("best adapter", escape(best))
    if result.nothing_done:  # a --resume of a run that had stopped early: nothing was trained
        table.add_row("steps", f"{result.steps} (stopped early before; nothing done now)")
    else:
        total = result.trainable_params + result.frozen_params
        table.add_row("trainable parameters", f"{result.trainable_params:,} of {total:,}")
        resumed = f" (resumed at {result.resumed_from})" if result.resumed_from else ""
        early = f" of {result.planned_steps}, stopped early" if result.stopped_early else ""
        table.add_row("steps", f"{result.steps}{early}{resumed}")
        processes = f" on {result.world_size} processes" if result.world_size > 1 else ""
        table.add_row("time", f"{result.seconds:.1f} s{processes}")
        reserved = getattr(result, "peak_reserved_mb", None)  # CUDA: also what the caching allocator held
        held = f" allocated, {reserved:,.0f} MiB reserved" if reserved is not None else ""
        table.add_row("peak memory", f"{result.peak_memory_mb:,.0f} MiB{held}")
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


def dry_run_table(cfg: TrainConfig, est: MemoryEstimate, cuda: bool, data: DataShape | None = None) -> Table:
    """`lorakit train --dry-run`: counts, adapter size and memory from the config; examples and steps from local
    data (`data`)."""
    from .models import PACKAGED

    table = Table(title=escape(f"lorakit train --dry-run: {cfg.model or PACKAGED}"))
    table.show_header = False
    head = " + new head" if cfg.task == "classification" else ""
    table.add_row(f"trainable parameters (LoRA{head})", f"{est.trainable_params:,}")
    table.add_row("frozen parameters", f"{est.frozen_params:,}")
    table.add_row("adapter file", f"{est.adapter_file_bytes:,} bytes ({est.adapter_tensor_bytes:,} of tensors)")
    weights = " (8-bit linear layers)" if cfg.load_in_8bit else f" ({cfg.precision})"
    if cfg.load_in_4bit:
        weights = f" (4-bit {cfg.bnb_4bit_quant_type} linear layers, double quantization)"
    if cfg.fsdp:
        weights += f"; per process, sharded over {cfg.nproc or 1} (--fsdp)"
    table.add_row("weights", _mib(est.weights_bytes) + weights)
    table.add_row("LoRA parameters, gradients, AdamW state", _mib(est.lora_state_bytes))
    if data is not None:
        for name, value in _data_rows(cfg, data):
            table.add_row(name, escape(value))
    batch, length = (data.batch_size, data.seq_len) if data is not None else (cfg.batch_size, cfg.max_length)
    sized_by = f" ({escape(data.sized_by)})" if data is not None else ""
    table.add_row(f"activations, batch {batch} x {length} tokens{sized_by}", _mib(est.activation_bytes))
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


def _data_rows(cfg: TrainConfig, data: DataShape) -> list[tuple[str, str]]:
    """Training examples, steps per epoch and total steps (what is known without downloading a hub dataset)."""
    if data.examples is not None and not data.tokenized:
        examples = f"{data.examples:,} rows (not tokenized)"
    elif data.examples is not None:
        lost = [f"{data.truncated:,} truncated to --max-length"] * bool(data.truncated)
        lost += [f"{data.dropped:,} dropped"] * bool(data.dropped)
        examples = f"{data.examples:,}" + (f" ({'; '.join(lost)})" if lost else "")
    else:
        examples = "unknown (a hub dataset is not downloaded)"
    if data.eval_rows is not None:
        examples += f"; {data.eval_rows:,} rows held out for evaluation (--val-split {cfg.val_split:g})"
    per_epoch = f"{data.steps_per_epoch:,}" if data.steps_per_epoch is not None else "unknown"
    if data.total_steps is None:
        total = "unknown (--epochs over a dataset not downloaded)"
    else:
        epochs = f"{cfg.epochs:g} epoch" + ("" if cfg.epochs == 1 else "s")
        total = f"{data.total_steps:,}" + (" (--max-steps)" if cfg.max_steps else f" ({epochs})")
    return [("training examples", examples), ("steps per epoch", per_epoch), ("total steps", total)]


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def eval_table(rows: list[dict[str, Any]]) -> Table:
    """One row per evaluated model (the base first), one column per number that means something for its task
    (the JSON keeps every key)."""
    keys = [k for k in rows[0] if k not in ("name", "predictions") and any(r.get(k) is not None for r in rows)]
    if any("accuracy" in r for r in rows):  # classification: perplexity and label counts mean nothing to read
        keys = [k for k in keys if k not in ("perplexity", "tokens")]
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
            f"{result.quantized_bits} base + adapter vs. merged (full precision): max |Δlogits| = "
            f"{result.quantized_diff:.3g} (what the {result.quantized_bits} base costs)"
        )
    note = "" if result.tokenizer else " (the base has no tokenizer files; none copied)"
    lines.append(f"wrote {escape(str(result.out))}{note}")
    return lines


# lorakit inspect

TOP_SINGULAR_VALUES = 4  # how many singular values the table shows per module


def _shape(module: dict[str, Any]) -> str:
    """`in×out`, plus the slice as `q [0:1024)` for a fused projection."""
    shape = f"{module['in_features']}×{module['out_features']}"
    if module["slice"] is None:
        return shape
    start, stop = module["slice"]
    part = module["name"][len(module["path"]) + 1 :]
    return f"{shape} {part} [{start}:{stop})"


def _modules_table(report: dict[str, Any]) -> Table:
    modules = report["modules"]
    with_svd = bool(modules) and "singular_values" in modules[0]
    table = Table(title=escape(report["file"]), show_footer=True)
    # On a narrow terminal module paths fold and shapes wrap; the numbers never do.
    table.add_column("module", footer="total", overflow="fold")
    table.add_column("in×out")
    for label in ("r", "α", "α/r"):
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("params", justify="right", footer=f"{report['trainable_params']:,}", no_wrap=True)
    table.add_column("bytes", justify="right", footer=f"{report['tensor_bytes']:,}", no_wrap=True)
    table.add_column("‖ΔW‖", justify="right", no_wrap=True)
    if with_svd:
        table.add_column(f"top σ (of {report['rank']})")
        table.add_column("eff. rank", justify="right")
    for m in modules:
        row = [
            escape(m["name"]),
            escape(_shape(m)),
            str(m["rank"]),
            f"{m['alpha']:g}",
            f"{m['scaling']:.4g}",
            f"{m['params']:,}",
            f"{m['bytes']:,}",
            f"{m['update_norm']:.4g}",
        ]
        if with_svd:
            row.append(" ".join(f"{s:.3g}" for s in m["singular_values"][:TOP_SINGULAR_VALUES]))
            row.append(f"{m['effective_rank']:.2f}")
        table.add_row(*row)
    return table


def _metadata_panel(report: dict[str, Any]) -> Panel:
    scaling = report["alpha"] / report["rank"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("trainable parameters", f"{report['trainable_params']:,}"),
        ("file size", f"{report['file_bytes']:,} bytes ({decimal(report['file_bytes'])})"),
        ("header", f"{report['header_bytes']:,} bytes (metadata; tensors {report['tensor_bytes']:,} bytes)"),
        ("rank / alpha", f"{report['rank']} / {report['alpha']:g} (scaling {scaling:.4g})"),
        ("targets", report["targets"] or "-"),
        ("dropout", f"{report['dropout']:g}"),
        ("base model", report["base_model"] or "-"),
        ("base class", report["base_class"] or "-"),
        ("base fingerprint", report["base_fingerprint"] or "-"),
        ("base dtype", report["base_dtype"] or "-"),
        ("lorakit / format", f"{report['lorakit_version'] or '?'} / {report['format_version']}"),
    ]
    if report.get("format") == "gguf":  # a llama.cpp adapter: no base class or dtype, a GGUF version
        rows[-4:] = [("base fingerprint", rows[-3][1]), ("GGUF architecture", report["architecture"] or "-")]
        rows.append(("lorakit / GGUF version", f"{report['lorakit_version'] or '-'} / {report['format_version']}"))
    for key, value in rows:
        grid.add_row(key, escape(str(value)))
    return Panel(grid, title="adapter", expand=False)


def _compare_table(report: dict[str, Any]) -> Table:
    compare = report["compare"]
    table = Table(title=f"subspace similarity φ of A: {escape(report['file'])} vs {escape(compare['other'])}")
    table.add_column("module", overflow="fold", min_width=12)
    table.add_column("rank", justify="right")
    table.add_column("other rank", justify="right")
    table.add_column("φ top (1, 1)", justify="right")
    table.add_column("φ (m, m), m = min rank", justify="right")
    for m in compare["modules"]:
        phis = f"{m['phi_top']:.3f}", f"{m['phi']:.3f}"
        table.add_row(escape(m["name"]), str(m["rank"]), str(m["other_rank"]), *phis)
    return table


def print_inspect_report(report: dict[str, Any], console: Console) -> None:
    """Print an inspect_adapter report as rich tables.

    Args:
        report: what inspect_adapter returned.
        console: where to print.
    """
    console.print(_modules_table(report))
    console.print(_metadata_panel(report))
    if "compare" not in report:
        return
    compare = report["compare"]
    console.print(_compare_table(report))
    if not compare["modules"]:
        console.print("no module is adapted in both files")
    for where, names in ((report["file"], compare["only_here"]), (compare["other"], compare["only_other"])):
        if names:
            console.print(f"only in {escape(where)}: {escape(', '.join(names))}")
