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
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

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
    from .training.failure import error_prefix

    prefix = error_prefix()  # a distributed run: one line, from the rank that failed first
    if prefix is not None:
        typer.echo(f"error: {prefix}{message}", err=True)
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
            if type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU: the input is too big, not a bug
                less = "a smaller --batch-size or --max-length, --gradient-checkpointing, or --load-in-8bit"
                raise _error(f"out of memory: {text}; try {less}", EXIT_CHECK_FAILED) from None
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


class _TrainCommand(typer.core.TyperCommand):
    """`lorakit train --help`: every option with its default (from TrainConfig, so the help never drifts from what a
    run uses), switches without a value, option names never cut at any width (a name longer than the name column
    gets a line of its own, as click does), and the recipe-only keys in the epilog."""

    NAME_WIDTH = 30

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from rich.console import Console, Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        from .training.config import FIELDS, TrainConfig

        hints = get_type_hints(TrainConfig)
        console = Console(highlight=False)
        options = [p for p in self.get_params(ctx) if p.param_type_name == "option" and not p.hidden]
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        console.print(Text(f"\n Usage: {ctx.command_path} {' '.join(self.collect_usage_pieces(ctx))}\n", no_wrap=True))
        paragraph = functools.partial(textwrap.fill, width=max(console.width - 2, 40), initial_indent=" ")
        console.print(Text(paragraph(self.help or "", subsequent_indent=" ") + "\n", no_wrap=True))

        def rows(entries: list[tuple[str, str]]) -> Group:
            narrow = max(12, (console.width - 4) * 2 // 5)  # a narrow terminal keeps room for the help
            width = min(self.NAME_WIDTH, narrow, max(len(name) for name, _ in entries))
            parts: list[Any] = []
            for name, text in entries:
                grid = Table.grid(padding=(0, 2, 0, 0))
                grid.add_column(width=width, no_wrap=True, style="bold cyan")
                grid.add_column(ratio=1)
                if len(name) > width:  # its own line, the help below it in the help column
                    parts.append(Text(name, style="bold cyan", no_wrap=True, overflow="ignore"))
                    name = ""
                grid.add_row(Text(name), Text(text))
                parts.append(grid)
            return Group(*parts)

        if arguments:
            entries = [(p.name or "", getattr(p, "help", None) or "") for p in arguments]
            console.print(Panel(rows(entries), title="Arguments", title_align="left", border_style="dim"))
        entries = [(_option_names(p, hints.get(p.name)), _option_help(p, FIELDS.get(p.name))) for p in options]
        console.print(Panel(rows(entries), title="Options", title_align="left", border_style="dim"))
        epilog = _train_epilog(set(FIELDS) - {p.name for p in options})
        console.print(Text(paragraph(epilog, subsequent_indent=" "), no_wrap=True))


def _option_names(param: Any, hint: Any) -> str:
    """`--rank INT`, `--precision fp32|bf16|fp16`, `--resume / --no-resume` (a switch takes no value); the value's
    kind from TrainConfig's type of the option (`hint`), not from the parser, whose attributes vary by version."""
    names = " / ".join([*param.opts, *param.secondary_opts])
    if getattr(param, "is_flag", False) or hint is None:
        return names
    if get_origin(hint) is Literal:
        return f"{names} {'|'.join(get_args(hint))}"
    kinds = [a for a in get_args(hint) if a is not type(None)] or [hint]
    kind = {int: "INT", float: "FLOAT"}.get(kinds[0], "LIST" if get_origin(kinds[0]) is list else "TEXT")
    return f"{names} {kind}"


def _option_help(param: Any, field: Any) -> str:
    """The option's help with `[default: ...]`: TrainConfig's default (`off` for a switch); an option whose default
    is None says in its help what that means."""
    text = param.help or ""
    if field is None or "[default:" in text or field.default is None:
        return text
    return f"{text} [default: {_shown_default(field.default)}]".strip()


def _shown_default(value: Any) -> str:
    """2e-4, 1e-6, 32, 0.999, off, q,v: as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _train_epilog(recipe_only: set[str]) -> str:
    """What a recipe holds: the options as snake_case keys, and the keys that have no flag (none at present)."""
    text = (
        "A recipe YAML holds any of these options as snake_case keys (lr_scheduler: cosine); flags given on the "
        "command line override it, and the run folder's config.yaml records every key."
    )
    if recipe_only:
        text += " Keys without a flag (recipe only): " + ", ".join(sorted(recipe_only)) + "."
    return text


Precision = Literal["fp32", "bf16", "fp16"]
Task = Literal["causal-lm", "classification"]
Scheduler = Literal["linear", "cosine", "constant"]
QuantType = Literal["nf4", "fp4"]
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2"]


# train and eval are long only by their option declarations (one per setting, with its help text); their
# bodies hand the parsed values to the library. Options of train default to None (False for switches) so that
# what was typed can be told from what was not (`_given`); `--help` shows the defaults of TrainConfig
# (`_TrainCommand`), and an option whose default is None says what None means in its help.
@app.command(cls=_TrainCommand)
@_friendly
def train(
    ctx: typer.Context,
    recipe: Annotated[
        Path | None, typer.Argument(help="A recipe YAML with any train options (flags override it).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or model folder. [default: the packaged SmolLM2-135M-Instruct]")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training data: .jsonl/.json/.csv/.parquet, datasets folder, hub name. [default: the demo set]"
        ),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Evaluation data (same forms as --data). [default: none]")
    ] = None,
    val_split: Annotated[
        float | None,
        typer.Option(
            help="Hold out this fraction (0 to 1) of the training rows for evaluation, chosen by --seed; "
            "instead of --eval-data. [default: none]"
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split of a hub dataset or datasets folder for --data.")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Split for --eval-data.")] = None,
    data_config: Annotated[str | None, typer.Option(help="Hub dataset configuration. [default: none]")] = None,
    task: Annotated[Task | None, typer.Option(help="Model head and loss.")] = None,
    num_labels: Annotated[
        int | None,
        typer.Option(help="Classes for --task classification. [default: counted from the training labels]"),
    ] = None,
    targets: Annotated[str | None, typer.Option(help="q,k,v,o,mlp,all-linear, module suffixes or re:REGEX.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (the update is scaled by alpha/r).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA path's input.")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Adapt only these blocks, e.g. 0,1,2. [default: every block]")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (overrides --epochs). [default: from --epochs]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps from 0 to the peak.")] = None,
    lr_scheduler: Annotated[
        Scheduler | None,
        typer.Option(help="After the warmup: linear decay to 0 (the paper's), cosine decay to 0, or constant."),
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    adam_beta1: Annotated[float | None, typer.Option(help="AdamW beta1.")] = None,
    adam_beta2: Annotated[float | None, typer.Option(help="AdamW beta2.")] = None,
    adam_eps: Annotated[float | None, typer.Option(help="AdamW epsilon.")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Clip the gradient norm (0: no clipping). [default: no clipping]")
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
    group_by_length: Annotated[
        bool,
        typer.Option(
            "--group-by-length/--no-group-by-length", help="Batches of similar lengths: less padding, learns less."
        ),
    ] = False,
    packing: Annotated[
        bool, typer.Option("--packing/--no-packing", help="Several examples per row, no padding (causal-lm).")
    ] = False,
    attn_implementation: Annotated[
        AttnImplementation | None,
        typer.Option(help="Attention kernel; auto: the best available. [default: auto]"),
    ] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model's forward.")] = False,
    tf32: Annotated[
        bool, typer.Option("--tf32/--no-tf32", help="TF32 matmuls for fp32 on Ampere+ GPUs. [default: on]")
    ] = True,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same run).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder. [default: runs/<date>-<time>]")] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps (and at the end). [default: only at the end]")
    ] = None,
    save_total_limit: Annotated[
        int | None, typer.Option(help="Checkpoints kept: the newest N by step (older ones are removed).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate every N steps (and at the end). [default: only at the end]")
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option(help="Limit periodic evaluation to N batches. [default: all]")
    ] = None,
    eval_generate: Annotated[
        bool,
        typer.Option("--eval-generate/--no-eval-generate", help="At each evaluation also generate and score BLEU etc."),
    ] = False,
    best_metric: Annotated[
        str | None,
        typer.Option(help="Keep best/adapter.safetensors by: loss or bleu, nist, meteor, rouge_l, cider."),
    ] = None,
    early_stopping_patience: Annotated[
        int | None, typer.Option(help="Stop after N evaluations without improving the best metric. [default: never]")
    ] = None,
    early_stopping_threshold: Annotated[
        float | None, typer.Option(help="An improvement must exceed this (absolute, in the metric's units).")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Write a metrics line every N steps.")] = None,
    report_to: Annotated[
        str | None, typer.Option(help="Also log to tensorboard, wandb (comma-separated) or none.")
    ] = None,
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
    prompt_template: Annotated[
        str | None, typer.Option(help='Prompt format string, e.g. "{mr}{eos}". [default: the prompt field]')
    ] = None,
    completion_template: Annotated[
        str | None, typer.Option(help='Completion format string, e.g. " {ref}". [default: the completion field]')
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N training rows. [default: all rows]")] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="Use only the first N evaluation rows. [default: all rows]")
    ] = None,
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
    load_in_4bit: Annotated[
        bool,
        typer.Option("--load-in-4bit/--no-load-in-4bit", help="Frozen base in 4 bits (QLoRA; bitsandbytes)."),
    ] = False,
    bnb_4bit_quant_type: Annotated[
        QuantType | None, typer.Option(help="4-bit data type of --load-in-4bit. [default: nf4]")
    ] = None,
    fsdp: Annotated[
        bool,
        typer.Option("--fsdp/--no-fsdp", help="Shard the frozen base over the processes (FSDP2; --nproc/torchrun)."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run/--no-dry-run", help="Parameter counts, adapter size, memory estimate, steps; no weights."
        ),
    ] = False,
    nproc: Annotated[
        int | None, typer.Option(help="Processes on this machine (launched through torchrun). [default: 1]")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads per process (fewer than cores on a busy machine). [default: torch's]"),
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
    from .training.config import build_config, read_recipe, read_run_config

    values: dict[str, Any] = {}
    source = "flags"
    out_given = flags.get("out")
    if recipe is not None:
        values, source = read_recipe(recipe), str(recipe)
    elif flags.get("resume") and out_given and (Path(out_given) / "config.yaml").is_file():
        values, source = read_run_config(Path(out_given) / "config.yaml"), str(Path(out_given) / "config.yaml")
        values = {k: v for k, v in values.items() if k not in ("resume", "overwrite")}
    return build_config(values, flags, source=source)


def _print_run(result: Any, cfg: Any, demo: bool, console: Any) -> None:
    """The summary of a finished run; for the demo also the generations before and after."""
    from . import report

    console.print(report.train_table(result))
    if demo:
        from .demo import before_after_examples
        from .models import cache_dir

        eval_path = Path(cfg.eval_data) if cfg.eval_data else cache_dir() / "demo" / "demo-eval.jsonl"  # --val-split
        for line in report.before_after_lines(before_after_examples(result.adapter, eval_path)):
            console.print(line)


def _with_demo_data(cfg: Any) -> Any:
    """No --data: the generated demo set (and its eval split, unless --val-split takes one from the training rows),
    written once to the cache."""
    from dataclasses import replace

    from .demo import write_demo_data
    from .models import cache_dir

    train_path, eval_path = write_demo_data(cache_dir() / "demo")
    eval_data = cfg.eval_data or (None if cfg.val_split is not None else str(eval_path))
    return replace(cfg, data=str(train_path), eval_data=eval_data)


def _dry_run(cfg: Any, console: Any) -> None:
    import torch

    from . import report
    from .training.memory import dry_run

    plan = dry_run(cfg)
    console.print(report.dry_run_table(cfg, plan.estimate, torch.cuda.is_available(), plan.data))


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
    if "task" not in _given(ctx, {"task": task}):
        from .evaluation.evaluate import recorded_task

        task = recorded_task(list(adapters or [])) or task  # a classification adapter says so itself
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
    out: Annotated[Path, typer.Option("--out", help="The PEFT adapter folder (gguf: the .gguf file) to write.")],
    format: Annotated[
        Literal["peft", "gguf"], typer.Option("--format", help="Target format: peft, or gguf (llama.cpp / Ollama).")
    ] = "peft",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out lorakit made (gguf: a GGUF adapter file).")
    ] = False,
    outtype: Annotated[
        Literal["f32", "f16", "bf16"], typer.Option("--outtype", help="gguf: dtype of the LoRA tensors.")
    ] = "f32",
    model: Annotated[
        str | None, typer.Option("--model", help="gguf: base hub id or folder (default: the one the adapter records).")
    ] = None,
    ollama: Annotated[
        bool, typer.Option("--ollama", help="gguf: also write an Ollama Modelfile beside the adapter.")
    ] = False,
) -> None:
    """Write the adapter in Hugging Face PEFT's format, or as a llama.cpp LoRA adapter (GGUF)."""
    if format == "gguf":
        from .deploy.gguf import MODELFILE, export_gguf

        _quiet_transformers()
        path = export_gguf(adapter, out, outtype=outtype, model=model, overwrite=overwrite, ollama=ollama)
        _console().print(f"wrote {path} (llama.cpp LoRA adapter, {outtype})")
        if ollama:
            _console().print(f"wrote {path.parent / MODELFILE} (ollama create NAME -f {path.parent / MODELFILE})")
        return
    if ollama or outtype != "f32":
        raise LorakitError("--ollama and --outtype apply to --format gguf only")
    from .deploy.peft import export_peft
    from .deploy.vllm import report_lines

    path = export_peft(adapter, out, overwrite=overwrite)
    _console().print(f"wrote {path} (PEFT LoRA)")
    for line in report_lines(path):  # plain echo: the serve command must not be wrapped or marked up
        typer.echo(line)


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


@app.command()
@_friendly
def generate(
    adapter: Annotated[Path | None, typer.Argument(help="The adapter (none: the base alone).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A text file of prompts, one a line.")] = None,
    model: Annotated[str | None, typer.Option(help="Base hub id or folder (default: the adapter's base).")] = None,
    chat: Annotated[
        bool | None, typer.Option("--chat/--no-chat", help="Use the chat template [default: if the tokenizer has one].")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per prompt.")] = 128,
    num_beams: Annotated[int, typer.Option(help="Beam size (1: greedy).")] = 1,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampling at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: the smallest token set with this probability.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines {prompt, output} instead.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load a base stored only as pytorch_model.bin.")
    ] = False,
) -> None:
    """Continue prompts with the adapter (greedy, beam search or sampling); chat models get their template."""
    from .evaluation.generation import generate_texts, load_adapted, read_prompts, uses_chat_template

    texts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file is not None else [])
    if not texts:
        raise LorakitError("no prompt given; pass --prompt TEXT (repeatable) or --prompts-file FILE")
    options = _decoding(max_new_tokens, num_beams, temperature, top_p, batch_size)
    _quiet_transformers()
    adapted = load_adapted(adapter, model, trust_remote_code, allow_pickle)
    import torch

    torch.manual_seed(seed)
    outputs = generate_texts(adapted, texts, options, uses_chat_template(adapted.tokenizer, chat))
    if as_json:
        for text, output in zip(texts, outputs):
            sys.stdout.write(json.dumps({"prompt": text, "output": output}, ensure_ascii=False) + "\n")
        return
    from rich.markup import escape

    console = _console()
    for text, output in zip(texts, outputs):
        console.print(f"[bold]> {escape(text)}[/]")
        console.print(escape(output))


@app.command("chat")
@_friendly
def chat_(
    adapter: Annotated[Path | None, typer.Argument(help="The adapter (none: the base alone).")] = None,
    model: Annotated[str | None, typer.Option(help="Base hub id or folder (default: the adapter's base).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of each answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampling at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: the smallest token set with this probability.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load a base stored only as pytorch_model.bin.")
    ] = False,
) -> None:
    """Talk to the adapter: one line a turn, /reset forgets the conversation, /exit or Ctrl-D ends it."""
    from .evaluation.generation import chat_loop, load_adapted, uses_chat_template

    options = _decoding(max_new_tokens, 1, temperature, top_p, 1)
    options.stop = ""
    _quiet_transformers()
    adapted = load_adapted(adapter, model, trust_remote_code, allow_pickle)
    if not uses_chat_template(adapted.tokenizer, None):
        raise LorakitError(f"{adapted.base}: its tokenizer has no chat template; try lorakit generate --prompt")
    import torch

    torch.manual_seed(seed)
    from rich.markup import escape

    console = _console()
    console.print(f"chat with {escape(str(adapter or adapted.base))}; /reset, /exit or Ctrl-D")
    chat_loop(adapted, options, lambda: input("> "), lambda text: console.print(escape(text)))


def _decoding(max_new_tokens: int, num_beams: int, temperature: float, top_p: float, batch_size: int) -> Any:
    """Decoding options for generate and chat, refused with one line when they cannot work."""
    from .evaluation.evaluate import GenerateOptions, decoding_problems

    options = GenerateOptions(
        num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, top_p=top_p
    )
    problems = decoding_problems(options)
    if problems:
        raise LorakitError("; ".join(problems))
    return options


def main() -> None:
    """Entry point for `python -m lorakit`."""
    app(prog_name="lorakit")


__all__ = ["app", "main"]
