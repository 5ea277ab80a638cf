"""What fits where: `lorakit train --dry-run` on real models' configs, written from their published dimensions.

Writes a `config.json` folder per model (no weights, no tokenizer: the dry run needs neither) under --out, runs the
dry run of each setting through the CLI's own code (`lorakit.training.memory.dry_run`) and prints a Markdown table
of the estimated peak per device, with the exact commands. A setting "fits" a device when its estimate is at most
90% of the device's memory (the rest: the CUDA context, allocator fragmentation).

    python scripts/fits.py --out /tmp/configs
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

LLAMA_31 = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)  # fmt: skip
# Published config.json values of each model (Hugging Face hub), the ones that set its shapes.
CONFIGS = {
    "gpt2-medium": dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257, n_positions=1024, n_ctx=1024,
        n_embd=1024, n_layer=24, n_head=16, bos_token_id=50256, eos_token_id=50256,
    ),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        LLAMA_31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3.1-70b": dict(
        LLAMA_31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8,
    ),
}  # fmt: skip
COMMON = "--precision bf16 --targets all-linear --rank 16 --batch-size 1 --max-length 2048 --gradient-checkpointing"
SETTINGS = {  # name -> (extra flags, devices it is for)
    "bf16": ("", 1),
    "4-bit NF4": ("--load-in-4bit", 1),
    "bf16, --fsdp 2": ("--fsdp --nproc 2", 2),
    "bf16, --fsdp 8": ("--fsdp --nproc 8", 8),
}
DEVICES = {"1 x 24 GB": (1, 24), "2 x 24 GB": (2, 24), "8 x 80 GB": (8, 80)}
MARGIN = 0.9


def write_configs(out: Path) -> dict[str, Path]:
    folders = {}
    for name, config in CONFIGS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        folders[name] = folder
    return folders


def peak_gb(folder: Path, flags: str) -> float:
    """The estimated peak per device of `lorakit train --dry-run` with these flags, in GB (10^9 bytes)."""
    from lorakit.cli import _train_config, _with_demo_data

    args = shlex.split(f"{COMMON} {flags}")
    values: dict = {"model": str(folder), "dry_run": True}
    i = 0
    while i < len(args):
        key = args[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[key], i = args[i + 1], i + 2
        else:
            values[key], i = True, i + 1
    for key in ("rank", "batch_size", "max_length", "nproc"):
        if key in values:
            values[key] = int(values[key])
    cfg = _with_demo_data(_train_config(None, values))
    from lorakit.training.memory import dry_run

    est = dry_run(cfg).estimate
    return (est.peak_bytes_checkpointed if cfg.gradient_checkpointing else est.peak_bytes) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the config folders are written")
    args = p.parse_args()
    folders = write_configs(args.out)
    header = ["model", *[f"{s} (GB/device)" for s in SETTINGS], *DEVICES]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, folder in folders.items():
        peaks = {s: peak_gb(folder, flags) for s, (flags, _) in SETTINGS.items()}
        cells = [name, *[f"{peaks[s]:.1f}" for s in SETTINGS]]
        for count, memory in DEVICES.values():
            fits = [s for s, (_, n) in SETTINGS.items() if n == count and peaks[s] <= MARGIN * memory]
            cells.append(", ".join(fits) or "no")
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"lorakit train --model {args.out}/MODEL --dry-run {COMMON} [--load-in-4bit | --fsdp --nproc N]")


if __name__ == "__main__":
    main()
