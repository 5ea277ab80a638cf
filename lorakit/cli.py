"""The `lorakit` command line: thin Typer commands that parse, call the library and print what it returns.

torch and transformers are imported inside the commands, so `lorakit --help` stays instant. Exit codes are those
of `lorakit.errors`: 2 bad input, 1 a failed check, 130 / 143 interrupted (after a checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import typer.core

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, LorakitError


class _OneLineErrors(typer.core.TyperGroup):
    """click's usage errors (an unknown option, a value of the wrong type) as one `error:` line and exit 2, like
    every other bad input, instead of a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as e:
            if not hasattr(e, "format_message"):
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # `lorakit` alone: the help, as before
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{see}", err=True)
            sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="lorakit",
    help="LoRA fine-tuning exact to the paper: train, merge, export and inspect small adapter files.",
    # Paragraphs (blank-line separated) so that rich keeps one exit code a line.
    epilog=(
        "Exit codes: 0 done.\n\n"
        "1 a failed check: merge probe beyond tolerance, training stopped on a NaN/inf loss, or training changed "
        "nothing.\n\n"
        "2 bad input (one error: line).\n\n"
        "130 interrupted by Ctrl-C, 143 stopped by SIGTERM (both after saving a checkpoint; --resume continues)."
    ),
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
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and third-party warnings.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _error(message: str, code: int) -> typer.Exit:
    if os.environ.get("RANK", "0") == "0":  # in a distributed run, one line from rank 0
        typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure as one `error: ...` line on stderr and its exit code; `--debug` re-raises instead."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import TrainingDiverged, TrainingInterrupted

        try:
            with _quiet_libraries():
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (LorakitError, TrainingInterrupted, TrainingDiverged) as e:
            if _state["debug"]:
                raise
            raise _error(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise _error("interrupted", 130) from None
        except OSError as e:  # a full disk, a read-only folder, a file that vanished: the file and the reason
            if _state["debug"]:
                raise
            where = f"{e.filename}: " if e.filename else ""
            reason = e.strerror or str(e) or errno.errorcode.get(e.errno or 0, type(e).__name__)
            raise _error(f"{where}{reason}", EXIT_BAD_INPUT) from None
        except Exception as e:
            if _state["debug"]:
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise _error(
                f"unexpected {type(e).__name__}: {text} (a lorakit bug, or an input it does not check yet; "
                "`lorakit --debug ...` shows the traceback)",
                EXIT_CHECK_FAILED,
            ) from None

    return wrapper


@contextlib.contextmanager
def _quiet_libraries() -> Any:
    """Third-party advice (transformers FutureWarnings, per-shard loading bars, bitsandbytes notices) stays out of
    the user's output unless `--debug`; hub download bars and lorakit's own notes stay."""
    if _state["debug"]:
        yield
        return
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        yield


def _quiet_transformers() -> None:
    """No per-shard "Loading weights" bars or advisory log lines from transformers (unless `--debug`); hub
    download bars stay."""
    if _state["debug"]:
        return
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    enable_progress_bars()


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (a 0, an empty string or a --no-flag included), by name."""

    # Compared by name: typer >= 0.20 ships its own copy of click, whose ParameterSource is another class.
    def typed(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    return {k: v for k, v in values.items() if typed(k)}


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print(lines: list[str]) -> None:
    console = _console()
    for line in lines:
        console.print(line)


Precision = Literal["fp32", "bf16", "fp16"]
Task = Literal["causal-lm", "classification"]


# train and eval are long only by their option declarations (one per setting, with its help text); their
# bodies hand the parsed values to the library.
@app.command()
@_friendly
def train(
    ctx: typer.Context,
    recipe: Annotated[
        Path | None, typer.Argument(help="A recipe YAML with any train options (flags override it).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or model folder (default: packaged SmolLM2-135M).")] = None,
    data: Annotated[
        str | None, typer.Option(help="Training data: .jsonl/.json/.csv/.parquet, datasets folder, hub name.")
    ] = None,
    eval_data: Annotated[str | None, typer.Option(help="Evaluation data (same forms as --data).")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a hub dataset or datasets folder for --data.")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Split for --eval-data.")] = None,
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    task: Annotated[Task | None, typer.Option(help="Model head and loss.")] = None,
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
    adam_beta1: Annotated[float | None, typer.Option(help="AdamW beta1.")] = None,
    adam_beta2: Annotated[float | None, typer.Option(help="AdamW beta2.")] = None,
    adam_eps: Annotated[float | None, typer.Option(help="AdamW epsilon.")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Clip the gradient norm (default and 0: no clipping).")
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing epsilon.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate examples to this many tokens.")] = None,
    precision: Annotated[Precision | None, typer.Option(help="Compute precision.")] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations.")
    ] = False,
    base_dropout: Annotated[
        bool, typer.Option("--base-dropout/--no-base-dropout", help="Keep the base model's own dropout on.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same run).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default: runs/<date>-<time>).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (and at the end).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (and at the end).")] = None,
    eval_batches: Annotated[int | None, typer.Option(help="Limit periodic evaluation to N batches.")] = None,
    eval_generate: Annotated[
        bool,
        typer.Option("--eval-generate/--no-eval-generate", help="At each evaluation also generate and score BLEU etc."),
    ] = False,
    best_metric: Annotated[
        str | None,
        typer.Option(help="Keep best/adapter.safetensors by: loss (default) or bleu, nist, meteor, rouge_l, cider."),
    ] = None,
    early_stopping_patience: Annotated[
        int | None, typer.Option(help="Stop after N evaluations without improvement of the best metric.")
    ] = None,
    early_stopping_threshold: Annotated[
        float | None, typer.Option(help="An improvement must exceed this (absolute; default 0).")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Write a metrics line every N steps.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an existing run folder lorakit made.")
    ] = False,
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
        bool, typer.Option("--trust-remote-code/--no-trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle/--no-allow-pickle", help="Load a base stored only as pytorch_model.bin.")
    ] = False,
    load_in_8bit: Annotated[
        bool,
        typer.Option("--load-in-8bit/--no-load-in-8bit", help="Frozen base in 8 bits (bitsandbytes, lorakit[8bit])."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run/--no-dry-run", help="Parameter counts, adapter size, memory estimate; no weights."),
    ] = False,
    nproc: Annotated[int | None, typer.Option(help="Processes on this machine (launched through torchrun).")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads per process (fewer than cores on a busy machine).")
    ] = None,
) -> None:
    """Fine-tune a LoRA adapter. With no arguments: the packaged SmolLM2 on the built-in demo task."""
    flags = _given(ctx, {k: v for k, v in locals().items() if k not in ("ctx", "recipe")})
    cfg = _train_config(recipe, flags)
    demo = cfg.data is None and cfg.model is None
    if cfg.data is None:
        cfg = _with_demo_data(cfg)
    from .training.distributed import launched_by_torchrun

    if cfg.nproc and cfg.nproc > 1 and not launched_by_torchrun() and not cfg.dry_run:
        from .training.distributed import launch

        raise typer.Exit(launch(cfg.nproc, sys.argv[1:], cfg.threads))
    _quiet_transformers()
    console = _console()
    if cfg.dry_run:
        _dry_run(cfg, console)
        return
    from .training.loop import train as run_training

    result = run_training(cfg, console=console)
    if result.main:
        _print_run(result, cfg, demo, console)
    if result.main and not result.lora_changed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _train_config(recipe: Path | None, flags: dict[str, Any]) -> Any:
    """The run's TrainConfig: the recipe (or, on --resume, the run's config.yaml), the flags typed on top."""
    from .training.config import build_config, read_recipe

    values: dict[str, Any] = {}
    source = "flags"
    out_given = flags.get("out")
    if recipe is not None:
        values, source = read_recipe(recipe), str(recipe)
    elif flags.get("resume") and out_given and (Path(out_given) / "config.yaml").is_file():
        values, source = read_recipe(Path(out_given) / "config.yaml"), str(Path(out_given) / "config.yaml")
        values = {k: v for k, v in values.items() if k not in ("resume", "overwrite")}
    return build_config(values, flags, source=source)


def _print_run(result: Any, cfg: Any, demo: bool, console: Any) -> None:
    """The summary of a finished run; for the demo also the generations before and after."""
    from . import report

    console.print(report.train_table(result))
    if demo:
        from .demo import before_after_examples

        for line in report.before_after_lines(before_after_examples(result.adapter, Path(cfg.eval_data))):
            console.print(line)


def _with_demo_data(cfg: Any) -> Any:
    """No --data: the generated demo set (and its eval split), written once to the cache."""
    from dataclasses import replace

    from .demo import write_demo_data
    from .models import cache_dir

    train_path, eval_path = write_demo_data(cache_dir() / "demo")
    return replace(cfg, data=str(train_path), eval_data=cfg.eval_data or str(eval_path))


def _dry_run(cfg: Any, console: Any) -> None:
    import torch

    from . import report
    from .training.memory import dry_run_estimate

    console.print(report.dry_run_table(cfg, dry_run_estimate(cfg), torch.cuda.is_available()))


@app.command("eval")
@_friendly
def eval_(
    ctx: typer.Context,
    adapters: Annotated[list[Path] | None, typer.Argument(help="Adapter files to compare with the base.")] = None,
    data: Annotated[str | None, typer.Option(help="Evaluation data (same forms as train --data).")] = None,
    model: Annotated[str | None, typer.Option(help="Base hub id or folder (default: the adapters' base).")] = None,
    task: Annotated[Task, typer.Option(help="Model head and loss.")] = "causal-lm",
    split: Annotated[str, typer.Option(help="Split of a hub dataset or datasets folder.")] = "validation",
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Generate for each unique prompt and score it.")] = False,
    num_beams: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam search length penalty.")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option(help="Forbid repeating n-grams of this size (0: off).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per prompt.")] = 64,
    metrics: Annotated[
        str,
        typer.Option(help="Text metrics, comma-separated (bleu, nist, meteor, rouge_l, cider), or e2e for all five."),
    ] = "bleu,rouge_l",
    predictions: Annotated[Path | None, typer.Option(help="Rescore a predictions JSONL file; no model.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for predictions files (with --generate).")] = Path("predictions"),
    batch_size: Annotated[int, typer.Option(help="Examples per batch.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    prompt_field: Annotated[str | None, typer.Option(help="Field holding the prompt.")] = None,
    completion_field: Annotated[str | None, typer.Option(help="Field holding the completion.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding plain text.")] = None,
    messages_field: Annotated[str | None, typer.Option(help="Field holding chat messages.")] = None,
    label_field: Annotated[str | None, typer.Option(help="Field holding the class label.")] = None,
    prompt_template: Annotated[str | None, typer.Option(help='Prompt format string, e.g. "{mr}{eos}".')] = None,
    completion_template: Annotated[str | None, typer.Option(help="Completion format string.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load a base stored only as pytorch_model.bin.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (fewer than cores on a busy machine).")] = None,
) -> None:
    """Loss and perplexity of the base and each adapter side by side; --generate adds text metrics."""
    from .evaluation.evaluate import GenerateOptions, check_eval_options, data_spec_of, evaluate_adapters
    from .evaluation.metrics import parse_metric_names, text_metrics

    options = GenerateOptions(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
    )
    check_eval_options(options, max_length, limit, threads, out if generate else None)
    names = parse_metric_names(metrics)
    if predictions is not None:
        from .evaluation.evaluate import read_predictions

        preds, refs = read_predictions(predictions)
        with _metric_notes():
            scores = text_metrics(preds, refs, names)
        _print_results({"results": [{"name": str(predictions), **scores}]}, as_json)
        return
    if data is None:
        raise LorakitError("--data is required (or --predictions FILE to rescore saved predictions)")
    if generate:
        from .evaluation.evaluate import check_predictions_out

        check_predictions_out(out, list(adapters or []))  # a read-only or blocked --out: now, not after generating
    fields = ("prompt_field", "completion_field", "text_field", "messages_field", "label_field")
    fields += ("prompt_template", "completion_template")
    given = locals()
    spec = data_spec_of(data, split, data_config, limit, _given(ctx, {k: given[k] for k in fields}))
    _quiet_transformers()
    if threads:
        import torch

        torch.set_num_threads(threads)
    with _metric_notes():
        results = evaluate_adapters(
            list(adapters or []),
            spec,
            model=model,
            task=task,
            max_length=max_length,
            batch_size=batch_size,
            generate_options=options if generate else None,
            metric_names=names,
            predictions_dir=out if generate else None,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
    _print_results({"results": [r.to_json() for r in results]}, as_json)


@contextlib.contextmanager
def _metric_notes() -> Any:
    """Metric warnings (e.g. METEOR unavailable without Java) and lorakit's notes (`lorakit.errors.Note`, e.g. a
    capped --max-length) as one `note: ...` line each on stderr, also where third-party UserWarnings are hidden."""
    from .errors import Note
    from .evaluation.metrics import MetricWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        warnings.simplefilter("always", Note)
        yield
    for w in caught:
        if issubclass(w.category, (MetricWarning, Note)):
            typer.echo(f"note: {w.message}", err=True)
        else:  # what passed the filters (third-party warnings with --debug) is shown as usual
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _print_results(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, allow_nan=False) + "\n")
        return
    from .report import eval_table

    console = _console()
    console.print(eval_table(report["results"]))
    for r in report["results"]:
        if r.get("predictions"):
            console.print(f"predictions of {r['name']}: {r['predictions']}")


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out folder lorakit made.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load a base stored only as pytorch_model.bin.")
    ] = False,
) -> None:
    """Fold the adapter into its base and write a plain Hugging Face model folder."""
    from .deploy.merge import merge_to_folder
    from .report import merge_lines

    _quiet_transformers()
    result = merge_to_folder(adapter, out, model=model, dtype=dtype, overwrite=overwrite, allow_pickle=allow_pickle)
    _print(merge_lines(result))


@app.command()
@_friendly
def export(
    adapter: Annotated[Path, typer.Argument(help="The adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", help="The PEFT adapter folder to write.")],
    format: Annotated[Literal["peft"], typer.Option("--format", help="Target format.")] = "peft",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out folder lorakit made.")
    ] = False,
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
    from .lora.inspect import inspect_adapter
    from .report import print_inspect_report

    report = inspect_adapter(adapter, svd=svd, compare=compare)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, allow_nan=False) + "\n")
    else:
        print_inspect_report(report, _console())


def main() -> None:
    """Entry point for `python -m lorakit`."""
    app(prog_name="lorakit")


__all__ = ["app", "main"]
