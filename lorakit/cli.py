"""The `lorakit` command line: thin Typer commands over the library.

torch and transformers are imported inside the commands, so `lorakit --help` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from . import __version__
from .errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="LoRA fine-tuning exact to the paper: train, merge, export and inspect small adapter files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print a LorakitError as one `error: ...` line on stderr and exit with its code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LorakitError as e:
            if _state["debug"]:
                raise
            if os.environ.get("RANK", "0") == "0":  # in a distributed run, one line from rank 0
                typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _quiet_transformers() -> None:
    """No per-shard "Loading weights" bars or advisory warnings in our output; hub download bars stay."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    enable_progress_bars()


def _console() -> Any:
    from rich.console import Console

    return Console()


Precision = Literal["fp32", "bf16", "fp16"]


@app.command()
@_friendly
def train(
    recipe: Annotated[
        Path | None, typer.Argument(help="A recipe YAML with any train options (flags override it).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or model folder (default: packaged SmolLM2-135M).")] = None,
    data: Annotated[
        str | None, typer.Option(help="Training data: .jsonl/.json/.csv/.parquet, datasets folder, hub name.")
    ] = None,
    eval_data: Annotated[str | None, typer.Option(help="Evaluation data (same forms as --data).")] = None,
    task: Annotated[Literal["causal-lm", "classification"] | None, typer.Option(help="Model head and loss.")] = None,
    num_labels: Annotated[int | None, typer.Option(help="Classes for --task classification.")] = None,
    targets: Annotated[str | None, typer.Option(help="q,k,v,o,mlp,all-linear, module suffixes or re:REGEX.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (the update is scaled by alpha/r).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA path's input.")] = None,
    layers: Annotated[str | None, typer.Option(help="Adapt only these blocks, e.g. 0,1,2.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Clip the gradient norm (default: no clipping).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing epsilon.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate examples to this many tokens.")] = None,
    precision: Annotated[Precision | None, typer.Option(help="Compute precision.")] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same run).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default: runs/<date>-<time>).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (and at the end).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (and at the end).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
    prompt_field: Annotated[str | None, typer.Option(help="Field holding the prompt.")] = None,
    completion_field: Annotated[str | None, typer.Option(help="Field holding the completion.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding plain text.")] = None,
    messages_field: Annotated[str | None, typer.Option(help="Field holding chat messages.")] = None,
    label_field: Annotated[str | None, typer.Option(help="Field holding the class label.")] = None,
    prompt_template: Annotated[str | None, typer.Option(help='Prompt format string, e.g. "{mr}{eos}".')] = None,
    completion_template: Annotated[str | None, typer.Option(help='Completion format string, e.g. " {ref}".')] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N training rows.")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use only the first N evaluation rows.")] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    load_in_8bit: Annotated[
        bool, typer.Option("--load-in-8bit", help="Frozen base in 8 bits (bitsandbytes, lorakit[8bit]).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Parameter counts, adapter size, memory estimate; no weights loaded.")
    ] = False,
    nproc: Annotated[int | None, typer.Option(help="Processes on this machine (launched through torchrun).")] = None,
) -> None:
    """Fine-tune a LoRA adapter. With no arguments: the packaged SmolLM2 on the built-in demo task."""
    flags = {k: v for k, v in locals().items() if k != "recipe" and v not in (None, False)}  # given on the line
    from .training.config import build_config, read_recipe

    values: dict[str, Any] = {}
    source = "flags"
    if recipe is not None:
        values, source = read_recipe(recipe), str(recipe)
    elif resume and out and (Path(out) / "config.yaml").is_file():
        values, source = read_recipe(Path(out) / "config.yaml"), str(Path(out) / "config.yaml")
        values = {k: v for k, v in values.items() if k not in ("resume", "overwrite")}
    cfg = build_config(values, flags, source=source)
    demo = cfg.data is None and cfg.model is None
    from .training.distributed import launched_by_torchrun

    if cfg.nproc and cfg.nproc > 1 and not launched_by_torchrun() and not cfg.dry_run:
        from .training.distributed import launch

        raise typer.Exit(launch(cfg.nproc, sys.argv[1:]))
    _quiet_transformers()
    from rich.table import Table

    console = _console()
    if cfg.dry_run:
        from .training.memory import dry_run_report

        console.print(dry_run_report(cfg))
        return
    from .training.loop import train as run_training

    result = run_training(cfg, console=console)
    if not result.main:
        return
    table = Table(title="lorakit train", show_header=False)
    table.add_row("run folder", str(result.out))
    table.add_row("adapter", f"{result.adapter} ({result.adapter_bytes:,} bytes)")
    table.add_row(
        "trainable parameters", f"{result.trainable_params:,} of {result.trainable_params + result.frozen_params:,}"
    )
    table.add_row("steps", f"{result.steps}" + (f" (resumed at {result.resumed_from})" if result.resumed_from else ""))
    table.add_row(
        "time", f"{result.seconds:.1f} s" + (f" on {result.world_size} processes" if result.world_size > 1 else "")
    )
    table.add_row("peak memory", f"{result.peak_memory_mb:,.0f} MiB")
    if result.train_loss is not None:
        table.add_row("final train loss", f"{result.train_loss:.4f}")
    if result.eval_loss is not None and result.first_eval_loss is not None:
        table.add_row("eval loss before -> after", f"{result.first_eval_loss:.4f} -> {result.eval_loss:.4f}")
    console.print(table)
    if demo:
        from rich.markup import escape

        from .demo import before_after_examples

        console.print("generated (greedy), base model vs. with the adapter:")
        for ex in before_after_examples(result.adapter, Path(cfg.eval_data)):
            console.print(f"[bold]{escape(ex['prompt'])}[/]")
            console.print(f"  before:    {escape(ex['before'])}")
            console.print(f"  after:     {escape(ex['after'])}")
            console.print(f"  reference: {escape(ex['reference'])}")
    if not result.lora_changed:
        raise typer.Exit(1)


@app.command("eval")
@_friendly
def eval_(
    adapters: Annotated[list[Path] | None, typer.Argument(help="Adapter files to compare with the base.")] = None,
    data: Annotated[str | None, typer.Option(help="Evaluation data (same forms as train --data).")] = None,
    model: Annotated[str | None, typer.Option(help="Base hub id or folder (default: the adapters' base).")] = None,
    task: Annotated[Literal["causal-lm", "classification"], typer.Option(help="Model head and loss.")] = "causal-lm",
    split: Annotated[str, typer.Option(help="Split of a hub dataset or datasets folder.")] = "validation",
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Generate for each unique prompt and score it.")] = False,
    num_beams: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam search length penalty.")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Forbid repeating n-grams of this size.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per prompt.")] = 64,
    metrics: Annotated[
        str,
        typer.Option(help="Text metrics, comma-separated (bleu, nist, meteor, rouge_l, cider), or e2e for all five."),
    ] = "bleu,rouge_l",
    predictions: Annotated[Path | None, typer.Option(help="Rescore a predictions JSONL file; no model.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for predictions files (with --generate).")] = Path("predictions"),
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt.")] = "prompt",
    completion_field: Annotated[str, typer.Option(help="Field holding the completion.")] = "completion",
    text_field: Annotated[str, typer.Option(help="Field holding plain text.")] = "text",
    messages_field: Annotated[str, typer.Option(help="Field holding chat messages.")] = "messages",
    label_field: Annotated[str, typer.Option(help="Field holding the class label.")] = "label",
    prompt_template: Annotated[str | None, typer.Option(help='Prompt format string, e.g. "{mr}{eos}".')] = None,
    completion_template: Annotated[str | None, typer.Option(help="Completion format string.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
) -> None:
    """Loss and perplexity of the base and each adapter side by side; --generate adds text metrics."""
    from .evaluation.metrics import parse_metric_names, text_metrics

    names = parse_metric_names(metrics)
    if predictions is not None:
        from .evaluation.evaluate import read_predictions

        preds, refs = read_predictions(predictions)
        with _metric_notes():
            scores = text_metrics(preds, refs, names)
        report = {"results": [{"name": str(predictions), **scores}]}
        _print_results(report, as_json)
        return
    if data is None:
        raise LorakitError("--data is required (or --predictions FILE to rescore saved predictions)")
    _quiet_transformers()
    from .evaluation.evaluate import GenerateOptions, evaluate_adapters
    from .training.data import DataSpec

    spec = DataSpec(
        source=data,
        split=split,
        hub_config=data_config,
        text_field=text_field,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
        label_field=label_field,
        prompt_template=prompt_template,
        completion_template=completion_template,
        limit=limit,
    )
    options = None
    if generate:
        options = GenerateOptions(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            batch_size=batch_size,
        )
    with _metric_notes():
        results = evaluate_adapters(
            list(adapters or []),
            spec,
            model=model,
            task=task,
            max_length=max_length,
            batch_size=batch_size,
            generate_options=options,
            metric_names=names,
            predictions_dir=out if generate else None,
            trust_remote_code=trust_remote_code,
        )
    _print_results({"results": [r.to_json() for r in results]}, as_json)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


@contextlib.contextmanager
def _metric_notes() -> Any:
    """Metric warnings (e.g. METEOR unavailable without Java) as one `note: ...` line each on stderr."""
    import warnings

    from .evaluation.metrics import MetricWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        yield
    for w in caught:
        if issubclass(w.category, MetricWarning):
            typer.echo(f"note: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _print_results(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    from rich.table import Table

    rows = report["results"]
    keys = [k for k in rows[0] if k not in ("name", "predictions")]
    table = Table(title="lorakit eval")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        cells = [_cell(r.get(k)) for k in keys]
        table.add_row(r["name"], *cells)
    _console().print(table)
    for r in rows:
        if r.get("predictions"):
            _console().print(f"predictions of {r['name']}: {r['predictions']}")


@app.command()
@_friendly
def merge(
    adapter: Annotated[Path, typer.Argument(help="The adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", help="The model folder to write.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Base hub id or folder (default: the one the adapter records).")
    ] = None,
    dtype: Annotated[
        Literal["auto", "fp32", "bf16", "fp16"], typer.Option("--dtype", help="Saved dtype (auto: the base's).")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Fold the adapter into its base and write a plain Hugging Face model folder."""
    from .deploy.merge import merge_to_folder

    _quiet_transformers()
    console = _console()
    result = merge_to_folder(adapter, out, model=model, dtype=dtype, overwrite=overwrite)
    console.print(
        f"merged {result.modules} modules into {result.base_model} ({result.dtype}); "
        f"probe max |Δlogits| = {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    )
    if result.quantized_diff is not None:
        console.print(
            f"8-bit base + adapter vs. merged (full precision): max |Δlogits| = {result.quantized_diff:.3g} "
            "(what the 8-bit base costs)"
        )
    console.print(
        f"wrote {result.out}" + ("" if result.tokenizer else " (the base has no tokenizer files; none copied)")
    )


@app.command()
@_friendly
def export(
    adapter: Annotated[Path, typer.Argument(help="The adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", help="The PEFT adapter folder to write.")],
    format: Annotated[Literal["peft"], typer.Option("--format", help="Target format.")] = "peft",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Write the adapter in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    from .deploy.peft import export_peft

    path = export_peft(adapter, out, overwrite=overwrite)
    _console().print(f"wrote {path} (PEFT LoRA)")


@app.command("import")
@_friendly
def import_(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder.")],
    out: Annotated[Path, typer.Option("--out", help="The lorakit adapter .safetensors file to write.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Base hub id or folder (default: base_model_name_or_path of the PEFT config)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Convert a PEFT LoRA adapter folder into a lorakit adapter file."""
    from .deploy.peft import import_peft

    _quiet_transformers()
    path = import_peft(peft_dir, out, model=model, overwrite=overwrite)
    _console().print(f"wrote {path}")


@app.command()
@_friendly
def inspect(
    adapter: Annotated[Path, typer.Argument(help="The adapter .safetensors file.")],
    svd: Annotated[bool, typer.Option("--svd", help="Singular values and effective rank of each update.")] = False,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="Another adapter: normalized subspace similarity per module.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Show what an adapter holds: modules, ranks, sizes, update norms, metadata."""
    from .lora.inspect import inspect_adapter, print_report

    report = inspect_adapter(adapter, svd=svd, compare=compare)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report, _console())


def main() -> None:
    """Entry point for `python -m lorakit`."""
    app(prog_name="lorakit")


__all__ = ["app", "main"]
