"""The `lorakit` command line: thin Typer commands over the library.

torch and transformers are imported inside the commands, so `lorakit --help` stays instant.
"""

from __future__ import annotations

import functools
import json
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
    from .merge import merge_to_folder

    _quiet_transformers()
    console = _console()
    result = merge_to_folder(adapter, out, model=model, dtype=dtype, overwrite=overwrite)
    console.print(
        f"merged {result.modules} modules into {result.base_model} ({result.dtype}); "
        f"probe max |Δlogits| = {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    )
    console.print(f"wrote {result.out}")


@app.command()
@_friendly
def export(
    adapter: Annotated[Path, typer.Argument(help="The adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", help="The PEFT adapter folder to write.")],
    format: Annotated[Literal["peft"], typer.Option("--format", help="Target format.")] = "peft",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Write the adapter in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    from .export import export_peft

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
    from .export import import_peft

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
    from .inspect import inspect_adapter, print_report

    report = inspect_adapter(adapter, svd=svd, compare=compare)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report, _console())


def main() -> None:
    """Entry point for `python -m lorakit`."""
    app(prog_name="lorakit")


__all__ = ["app", "main"]
