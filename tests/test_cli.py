"""The command line: fast help, one-line errors, merge end to end."""

import subprocess
import sys

import pytest
from tiny import randomize_lora, save_model, tiny_gpt2
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app

runner = CliRunner()


def test_cli_import_does_not_load_torch():
    code = "import sys, lorakit.cli; sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"lorakit {lorakit.__version__}"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("merge", "export", "import", "inspect"):
        assert command in result.output


def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing.safetensors'}: no such adapter file"]
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["train", "--rank", "abc"], "'--rank'"),
        (["train", "--no-such-option"], "--no-such-option"),
        (["eval", "a.safetensors", "--batch-size", "1.5"], "'--batch-size'"),
        (["merge", "a.safetensors", "--dtype", "fp8"], "'fp8'"),
        (["inspect"], "'adapter'"),
    ],
)
def test_usage_errors_are_one_error_line_too(args, named):
    """click's usage errors (wrong type, unknown option, missing argument) are one line, not a usage box."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named.lower() in lines[0].lower(), result.stderr
    assert result.stdout == ""


def test_no_arguments_show_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and "Usage" in result.output and "train" in result.output


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "merge", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    assert isinstance(result.exception, lorakit.LorakitError)


def test_unknown_dtype_is_rejected_by_name(tmp_path):
    result = runner.invoke(app, ["merge", "a.safetensors", "--out", str(tmp_path / "m"), "--dtype", "fp8"])
    assert result.exit_code == 2 and "fp8" in result.output


def test_merge_command(tmp_path):
    save_model(tiny_gpt2(), tmp_path / "base")
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v")
    randomize_lora(model)
    lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model=str(tmp_path / "base"))
    result = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "probe max |Δlogits|" in result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    again = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "merged")])
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
