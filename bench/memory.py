"""Peak memory of `lorakit train`: the `--dry-run` estimate against a measurement, per model and setting.

Each configuration trains in a fresh child process, through the real `lorakit.training.loop.train`, on rows of
random words cut to exactly `--seq` tokens (so every micro-batch is `--batch` x `--seq` with no padding and a
label at every position). What is compared:

- estimate: `MemoryEstimate.peak_bytes` (or `peak_bytes_checkpointed` with gradient checkpointing) from
  `lorakit.training.memory.dry_run_estimate` for the same configuration: weights + LoRA parameters, gradients and
  AdamW moments + activations kept for the backward pass + logits (and their softmax and gradient).
- measured, CPU: (peak RSS over the training steps) - (RSS once torch, transformers and lorakit are imported,
  before the tokenizer, data and model load). The resident-set high-water mark is reset (/proc/self/clear_refs)
  when the first step's forward starts, so the transient peak of reading the checkpoint does not count, while
  everything that stays resident (weights, allocator caches, the tokenizer) does. `static` is the RSS at that
  moment minus the same baseline, once every weight has been read (a memory-mapped checkpoint is paged in by the
  first forward otherwise); `steps` = measured - static is what the steps add (estimate: everything but weights).
- measured, CUDA: torch.cuda.max_memory_allocated over the steps, and memory_allocated when they start.

On CPU each configuration runs twice: with glibc's default allocator settings (what a user sees), and with
MALLOC_MMAP_THRESHOLD_=131072, which makes every freed block of 128 KiB or more go back to the operating system at
once, so that the RSS follows the live tensors. The default setting raises its mmap threshold after large blocks
are freed and then keeps freed transient buffers (activation intermediates, logits) in the heap: the difference
between the two columns is that retention, not tensors the estimate forgot.

Variants (`--variants`): `base` (the run as configured), `4bit` (`--load-in-4bit`, NF4), and `ddp2` / `fsdp2`: two
processes through torchrun (gloo on CPU), data-parallel with the whole base in each, or with `--fsdp`; for these
the measured figure is the larger of the two ranks' peaks, and the estimate is `--dry-run`'s per process (with
`--nproc 2`, and `--fsdp` for fsdp2).

    python bench/memory.py --quick                           # a smoke test: the tiny model, batch 2 x 64
    python bench/memory.py --markdown --json bench/results/memory.json
    python bench/memory.py --models smollm2 --checkpointing off --variants 4bit,ddp2,fsdp2 --markdown
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import common

# The "tiny" model: a small Llama with random weights and a word-level tokenizer (w0 ... w{vocab-5}), saved to
# a temporary folder; big enough that its activations are not lost in the process's noise.
TINY_LLAMA = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
DEFAULTS = {"tiny": dict(batch=8, seq=256), "smollm2": dict(batch=4, seq=256)}
MALLOC = {"returned": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "default": {"MALLOC_MMAP_THRESHOLD_": None}}


def save_tiny(folder: Path, seed: int) -> Path:
    """TINY_LLAMA with its word-level tokenizer, as a Hugging Face model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(TINY_LLAMA["vocab_size"] - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return folder


def write_rows(path: Path, model: str, rows: int, seq: int, seed: int) -> Path:
    """`rows` texts of random words, each longer than `seq` tokens (training cuts them to exactly `seq`)."""
    rng = random.Random(seed)
    if model == "tiny":
        vocab = [f"w{i}" for i in range(TINY_LLAMA["vocab_size"] - 4)]
    else:  # plain lowercase words: ~1-2 tokens each for SmolLM2's BPE
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choice(letters) for _ in range(rng.randrange(2, 8))) for _ in range(4000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(2 * seq)) for _ in range(rows)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec['steps']` steps in this (fresh) process; measure as the module docstring says."""
    import torch

    from lorakit.models import PACKAGED
    from lorakit.training.config import build_config
    from lorakit.training.data import DataSpec, read_rows
    from lorakit.training.distributed import init_world
    from lorakit.training.loop import train
    from lorakit.training.memory import dry_run_estimate

    world = init_world()  # ddp2 / fsdp2: this is one of two ranks under torchrun
    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PACKAGED if spec["model"] == "smollm2" else spec["folder"]
    values = dict(model=model, data=spec["data"], out=spec["out"], overwrite=True)
    options = dict(
        batch_size=spec["batch"],
        max_length=spec["seq"],
        max_steps=spec["steps"],
        targets=spec["targets"],
        rank=spec["rank"],
        lr=1e-4,
        gradient_checkpointing=spec["checkpointing"],
        load_in_4bit=spec["variant"] == "4bit",
        fsdp=spec["variant"] == "fsdp2",
        nproc=world.size if world.distributed else None,
    )
    cfg = build_config(values, options, source="bench")
    # Code is not data: import what the run will import (the model's modeling module through the meta model of
    # the estimate, the data readers through a first read of the rows) before the baseline is taken.
    est = dry_run_estimate(cfg)
    read_rows(DataSpec(source=cfg.data), task=cfg.task)
    import rich.progress  # noqa: F401  (the progress bar)

    if spec["variant"] == "4bit":
        import bitsandbytes  # noqa: F401  (its native library: code, not the model's memory)

    gc.collect()
    baseline = 0.0 if device == "cuda" else common.current_memory_mb(device)
    marks: dict[str, float] = {}

    def first_forward(module: torch.nn.Module, _inputs: Any) -> None:
        """The first step's forward starts: everything is loaded. Take `static` and reset the peak."""
        hook.remove()
        with torch.no_grad():  # read every weight: pages of a memory-mapped checkpoint become resident now
            for param in module.parameters():
                getattr(param, "_local_tensor", param).sum()  # (a shard of --fsdp: its local part)
        marks["static"] = common.current_memory_mb(device)
        common.reset_peak_memory(device)

    def loop_end() -> None:
        marks["peak"] = common.peak_memory_mb(device)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_forward)
    console = common.loop_console(on_start=lambda: None, on_end=loop_end)
    result = train(cfg, console=console)
    if world.distributed:  # ranks other than 0 draw no progress bar: their peak is taken at the end
        marks.setdefault("peak", common.peak_memory_mb(device))
        rank_file = Path(f"{spec['out']}.rank{world.rank}.json")  # the parent compares the ranks (run_child)
        rank_file.write_text(json.dumps({k: marks[k] - baseline for k in ("peak", "static")}))
        if not world.main:
            return {}
    elif console.loops != 1 or "static" not in marks:
        raise SystemExit(f"expected one training loop with forwards, saw {console.loops} live displays, {marks}")
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    estimate = est.peak_bytes_checkpointed if spec["checkpointing"] else est.peak_bytes
    return {
        **{k: spec[k] for k in ("model", "batch", "seq", "steps", "targets", "rank", "checkpointing", "variant")},
        "device": device,
        "estimate_mb": estimate / 2**20,
        "estimate_parts_mb": {k: v / 2**20 for k, v in est.to_json().items() if "bytes" in k},
        "measured_mb": marks["peak"] - baseline,
        "static_mb": marks["static"] - baseline,
        "steps_mb": marks["peak"] - marks["static"],
        "baseline_mb": baseline,
        "tokens_per_s": [r for r in records if "tokens_per_s" in r][-1]["tokens_per_s"],  # the first step pays more
        "trainable_params": result.trainable_params,
        "tokens_per_step": spec["batch"] * spec["seq"],
    }


VARIANTS = ("base", "4bit", "ddp2", "fsdp2")


def run_child(spec: dict[str, Any], environment: dict[str, str | None]) -> dict[str, Any]:
    """One measurement in a fresh process; ddp2 / fsdp2: two, through torchrun."""
    if spec["variant"] not in ("ddp2", "fsdp2"):
        return common.run_child(__file__, ["--child", json.dumps(spec)], environment)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    environment = {**environment, "OMP_NUM_THREADS": str(spec["threads"])}
    result = common.run_child(torchrun[0], [*torchrun[1:], "--child", json.dumps(spec)], environment)
    ranks = [json.loads(Path(f"{spec['out']}.rank{r}.json").read_text()) for r in range(2)]
    peak, static = max(r["peak"] for r in ranks), max(r["static"] for r in ranks)
    return {**result, "ranks": ranks, "measured_mb": peak, "static_mb": static, "steps_mb": peak - static}


def measure(folder: Path, args: Any) -> list[dict[str, Any]]:
    results = []
    for model in args.models.split(","):
        if model not in DEFAULTS:
            raise SystemExit(f"unknown model {model!r}; expected tiny or smollm2")
        batch = args.batch or DEFAULTS[model]["batch"]
        seq = args.seq or DEFAULTS[model]["seq"]
        model_dir = save_tiny(folder / "tiny", args.seed) if model == "tiny" else None
        data = write_rows(folder / f"{model}.jsonl", model, batch * args.steps, seq, args.seed)
        for setting, variant in [(c, v) for v in args.variants.split(",") for c in args.checkpointing.split(",")]:
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; expected {', '.join(VARIANTS)}")
            spec = dict(
                model=model, folder=str(model_dir), data=str(data), out=str(folder / "run"), batch=batch,
                seq=seq, steps=args.steps, targets=args.targets, rank=args.rank, checkpointing=setting == "on",
                threads=args.threads, variant=variant,
            )  # fmt: skip
            pair = {}
            for malloc, environment in [(m, MALLOC[m]) for m in args.malloc.split(",")]:
                pair[malloc] = run_child(spec, environment)
                print(
                    f"  {model}, {variant}, checkpointing {setting}, malloc {malloc}: estimate "
                    f"{pair[malloc]['estimate_mb']:.0f} MiB, measured {pair[malloc]['measured_mb']:.0f} MiB",
                    flush=True,
                )
            if "default" not in pair:  # --malloc returned
                pair["default"] = {k: float("nan") for k in pair["returned"]}
            pair.setdefault("returned", pair["default"])
            default = {f"{k}_default": v for k, v in pair["default"].items() if k.endswith(("_mb", "_per_s"))}
            results.append({**pair["returned"], **default})
    return results


def table(results: list[dict[str, Any]], args: Any) -> tuple[str, list[str], list[list[str]]]:
    columns = ["model", "variant", "batch x seq", "checkpointing", "estimate MiB", "measured MiB", "/ estimate"]
    columns += ["glibc default MiB", "/ estimate", "static MiB (est. weights)", "steps MiB (est. the rest)"]
    columns += ["tokens/s (glibc default)"]
    rows = []
    for r in results:
        weights, estimate = r["estimate_parts_mb"]["weights_bytes"], r["estimate_mb"]
        rows.append(
            [
                r["model"],
                r.get("variant", "base"),
                f"{r['batch']} x {r['seq']}",
                "on" if r["checkpointing"] else "off",
                f"{estimate:.0f}",
                f"{r['measured_mb']:.0f}",
                f"{r['measured_mb'] / estimate:.2f}",
                f"{r['measured_mb_default']:.0f}",
                f"{r['measured_mb_default'] / estimate:.2f}",
                f"{r['static_mb']:.0f} ({weights:.0f})",
                f"{r['steps_mb']:.0f} ({estimate - weights:.0f})",
                f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_default']:.0f})",
            ]
        )
    return f"lorakit train peak memory, {args.targets} r={args.rank}, fp32, {args.steps} steps", columns, rows


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, threads=None)
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--batch", type=int, help="micro-batch (default: 8 for tiny, 4 for smollm2)")
    p.add_argument("--seq", type=int, help="tokens per example (default: 256)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the AdamW moments exist from step 2)")
    common.lora_args(p, alpha=False, rank=8)
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run: off, on")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--malloc", default="returned,default", help="glibc settings to run: returned, default")
    p.add_argument("--variants", default="base", help="comma-separated: base, 4bit, ddp2, fsdp2 (module docstring)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = common.parse(p, argv, quick=dict(models="tiny", batch=2, seq=64, checkpointing="off"))
    if args.child:
        result = child(json.loads(args.child))
        if result:  # (rank 0 of ddp2 / fsdp2 prints for both)
            print(json.dumps(result))
        return
    info = common.start(args, threads=False)  # --threads is the children's
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp), args)
    note = "measured: freed memory returned to the OS (MALLOC_MMAP_THRESHOLD_=131072); glibc default: as a user runs"
    common.finish(args, info, *table(results, args), results, notes=[note], tiny_llama=TINY_LLAMA)


if __name__ == "__main__":
    main()
