"""The README's command outputs are what the commands print now (scripts/readme_outputs.py writes them)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "readme_outputs.py"


def _script():
    spec = importlib.util.spec_from_file_location("readme_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tiny_gpt2_outputs_are_current(capsys):
    """The tiny GPT-2 script, inspect (table and JSON), merge, export and import, as the README shows them."""
    assert _script().main(["--check", "--only", "tiny"]) == 0, capsys.readouterr().err


def test_the_check_sees_a_stale_block():
    script = _script()
    readme = script.README.read_text(encoding="utf-8")
    outputs = {"inspect": "$ lorakit inspect adapter.safetensors\nsomething else\n"}
    assert script.differences(readme, outputs) == ["inspect"]
    assert script.differences(script.update(readme, outputs), outputs) == []
    # a probe's max |delta logits| differs between machines: not a difference
    block = next(m.group("body") for m in script.BLOCK.finditer(readme) if m.group("name") == "merge-export")
    assert script.differences(readme, {"merge-export": block.replace("e-0", "1e-0", 1)}) == []
