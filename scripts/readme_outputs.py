"""Produce every command output the README shows, so that it stays true.

Each output block in README.md sits between `<!-- output: NAME -->` and `<!-- end output -->`; this script runs
the commands of each block (in a fresh temporary folder, an 100-column terminal, the CLI in this process) and
writes what they printed there.

    python scripts/readme_outputs.py                 # rewrite every block (the demo trains for a few minutes)
    python scripts/readme_outputs.py --only tiny     # the tiny GPT-2 blocks (seconds)
    python scripts/readme_outputs.py --check --only tiny   # exit 1 if the README differs (tests/test_readme.py)

Numbers that depend on the machine's float rounding (a probe's max |delta logits|, the last digits of a norm in
the JSON) are compared as `<float>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WIDTH = 100
BLOCK = re.compile(r"(<!-- output: (?P<name>[\w-]+) -->\n```[^\n]*\n)(?P<body>.*?)(```\n<!-- end output -->)", re.S)
MACHINE_FLOAT = re.compile(r"\d\.\d+e-\d+|\d\.\d{8,}")  # a probe's tiny difference; a norm's last digits

# The script the README shows for the tiny GPT-2 examples; run as printed.
TINY_SCRIPT = """\
import torch
from transformers import GPT2Config, GPT2LMHeadModel
import lorakit

torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)
GPT2LMHeadModel(config).save_pretrained("tiny-gpt2")           # a stand-in for gpt2-medium

model = GPT2LMHeadModel.from_pretrained("tiny-gpt2")
names = lorakit.add_lora(model, targets="q,v", rank=4, alpha=32)  # wraps in place, freezes the base
print(names)
with torch.no_grad():                                             # pretend we trained: B != 0
    for _, layer in lorakit.lora_layers(model):
        for b in layer.lora_B:
            b.normal_(std=0.02)
lorakit.save_adapter(model, "adapter.safetensors")
"""


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    """Run in `folder` with a WIDTH-column terminal and no colour; restore both afterwards."""
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(folder)
    os.environ.update(COLUMNS=str(WIDTH), NO_COLOR="1", TERM="dumb")
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _cli(line: str) -> str:
    """`$ line` and what the command printed (stdout, then stderr), as a user sees it."""
    import shlex

    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, shlex.split(line)[1:], terminal_width=WIDTH)
    printed = (result.stdout + result.stderr).rstrip("\n")
    return f"$ {line}\n{printed}\n"


def _strip(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def tiny_outputs() -> dict[str, str]:
    """The blocks of the tiny GPT-2 section, from one fresh folder."""
    import io
    from contextlib import redirect_stdout

    outputs = {}
    with tempfile.TemporaryDirectory() as tmp, _in_folder(Path(tmp)):
        printed = io.StringIO()
        with redirect_stdout(printed):
            exec(compile(TINY_SCRIPT, "tiny_gpt2_example.py", "exec"), {"__name__": "__main__"})
        outputs["tiny-script"] = TINY_SCRIPT
        outputs["tiny-script-output"] = printed.getvalue()
        outputs["inspect"] = _cli("lorakit inspect adapter.safetensors")
        outputs["inspect-json"] = _abridged_json(_cli("lorakit inspect adapter.safetensors --json"))
        outputs["merge-export"] = "\n".join(
            _cli(line)
            for line in (
                "lorakit merge adapter.safetensors --out merged",
                "lorakit export adapter.safetensors --format peft --out peft-adapter",
                "lorakit import peft-adapter --out roundtrip.safetensors",
                "lorakit merge adapter.safetensors --out merged",
            )
        )
    return {name: _strip(text) for name, text in outputs.items()}


def _abridged_json(shown: str) -> str:
    """`inspect --json` with the first module of the list only, the others as `...`."""
    command, _, text = shown.partition("\n")
    report = json.loads(text)
    count = len(report["modules"])
    report["modules"] = report["modules"][:1]
    text = json.dumps(report, indent=2)
    if count > 1:
        text = text.replace("\n    }\n  ]", f"\n    }},\n    ... ({count - 1} more modules)\n  ]")
    return f"{command}\n{text}\n"


def demo_outputs() -> dict[str, str]:
    """The main job, `lorakit train` with no arguments (trains SmolLM2 for a few minutes on CPU), its dry run
    before and a generation with its adapter after."""
    with tempfile.TemporaryDirectory() as tmp, _in_folder(Path(tmp)):
        dry_run = _cli("lorakit train --dry-run")
        shown = _cli("lorakit train --out runs/demo")
        prompt = "name[Golden Lotus], food[Thai], area[riverside], price[cheap]"
        generated = _cli(f'lorakit generate runs/demo/adapter.safetensors --prompt "{prompt}" --max-new-tokens 40')
    home = str(Path.home())
    return {
        "demo": _strip(shown.replace(home, "~")),
        "demo-dry-run": _strip(dry_run.replace(home, "~")),
        "demo-generate": _strip(generated.replace(home, "~")),
    }


PRODUCERS: dict[str, Callable[[], dict[str, str]]] = {"tiny": tiny_outputs, "demo": demo_outputs}


def comparable(text: str) -> str:
    return MACHINE_FLOAT.sub("<float>", text)


def update(readme: str, outputs: dict[str, str]) -> str:
    """The README with the named blocks replaced by `outputs`; every name must have a block."""
    missing = set(outputs) - {m.group("name") for m in BLOCK.finditer(readme)}
    if missing:
        raise SystemExit(f"README.md has no block for {sorted(missing)}")

    def replace(match: re.Match) -> str:
        name = match.group("name")
        body = outputs.get(name, match.group("body"))
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, readme)


def differences(readme: str, outputs: dict[str, str]) -> list[str]:
    """The names of blocks whose text differs from `outputs` (machine-dependent floats aside)."""
    shown = {m.group("name"): m.group("body") for m in BLOCK.finditer(readme)}
    return [name for name, text in outputs.items() if comparable(shown.get(name, "")) != comparable(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PRODUCERS), action="append", help="only these groups of blocks")
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on a difference")
    args = parser.parse_args(argv)
    outputs: dict[str, str] = {}
    for group in args.only or sorted(PRODUCERS):
        outputs.update(PRODUCERS[group]())
    readme = README.read_text(encoding="utf-8")
    if args.check:
        stale = differences(readme, outputs)
        for name in stale:
            print(f"README.md: block {name!r} differs from what the commands print now", file=sys.stderr)
        return 1 if stale else 0
    README.write_text(update(readme, outputs), encoding="utf-8")
    print(f"README.md: {len(outputs)} blocks written ({', '.join(sorted(outputs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
