"""One epoch of prompt/completion LoRA training on E2E rows: lorakit's training loop against TRL's SFTTrainer + PEFT.

Both train the packaged SmolLM2-135M-Instruct (the safetensors folder lorakit converts once into its cache) in
fp32 with the hyperparameters of `recipes/smollm2-e2e.yaml`: LoRA r 4, alpha 32, dropout 0 on q_proj/v_proj, AdamW
lr 5e-4 (betas 0.9/0.999, eps 1e-6, weight decay 0.01), 25 linear warmup steps then linear decay to 0, batch 8,
no accumulation, no clipping (the recipe sets none and lorakit does not clip by default), max length 256,
seed 110, one epoch over the first --rows rows of the E2E training CSV, no evaluation, no checkpoint during the
epoch, a loss logged every step.

  lorakit  `train(cfg)`, the function behind `lorakit train recipes/smollm2-e2e.yaml --data CSV --prompt-field mr
           --completion-field ref --limit N --out DIR --overwrite --eval-data "" --save-every 1000000000`, with the
           config that command line resolves to (an empty --eval-data drops the recipe's hub eval set; the large
           --save-every leaves only the checkpoint written after the loop).
  trl      `SFTTrainer` + `peft.LoraConfig`, completion-only loss; the final PEFT adapter is saved to DIR/adapter
           (`lorakit import DIR/adapter --out x.safetensors` converts it for `lorakit eval`).

Every run is a fresh process of this script (`--worker lorakit|trl`), which times the training loop alone and
reads its own peak RSS (VmHWM; getrusage's ru_maxrss of a child can include the parent's, see common.py). The
epoch time runs from the first step to the end of the last (lorakit: while its progress bar is shown; TRL:
on_train_begin to on_train_end); model loading, tokenization and the adapter save are outside it.

The token sequences are the same for both: TRL gets the prompt "{mr}<|im_end|>" and the completion " {ref}"
(TRL appends EOS) and tokenizes them itself; before training, the TRL worker checks that every sequence it
prepared and its label mask equal lorakit's encoding (`--check` does only that). The batches differ: lorakit
shuffles with its length-grouped sampler (little padding), TRL with its random sampler (`--trl-sampler`:
group_by_length for transformers' length-grouped one, lorakit for lorakit's very batches, in order).

    python bench/epoch_speed.py --quick                  # 16 rows, a smoke test (minutes on 2 cores)
    python bench/epoch_speed.py                          # 2,000 rows, lorakit then TRL
    python bench/epoch_speed.py --repeats 2              # two rounds, alternating which system goes first
    python bench/epoch_speed.py --check                  # tokenization only: lorakit's and TRL's sequences
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-e2e.yaml"
DATA = str(ROOT.parent / "shared" / "data" / "e2e" / "trainset.csv")  # ../shared beside the checkout
SYSTEMS = {
    "lorakit": "lorakit CLI",
    "lorakit-packing": "lorakit --packing",
    "lorakit-compile": "lorakit --compile",
    "trl": "TRL SFTTrainer + PEFT",
}
VARIANTS = {"lorakit": {}, "lorakit-packing": {"packing": True}, "lorakit-compile": {"compile": True}}
"""lorakit's systems: the train options each adds to the recipe's."""
NO_SAVE = 1_000_000_000  # --save-every for lorakit: no checkpoint inside the epoch (one is written after it)
LOSS_TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------------------------
# The lorakit configuration both systems follow


def lorakit_flags(args: argparse.Namespace, system: str = "lorakit") -> dict[str, Any]:
    """The train options given on lorakit's command line on top of the recipe (no --out / --overwrite)."""
    return {
        "data": args.data,
        "prompt_field": "mr",
        "completion_field": "ref",
        "limit": args.rows,
        "eval_data": "",  # the recipe names a hub eval set (unreachable offline); empty: no evaluation
        "save_every": NO_SAVE,
        **VARIANTS.get(system, {}),
        # bench/quality.py trains other seeds (and, in its smoke test, a tiny model folder) through these workers
        **{key: getattr(args, key) for key in ("seed", "model") if getattr(args, key, None) is not None},
    }


def lorakit_command(args: argparse.Namespace, out: Path, system: str = "lorakit") -> list[str]:
    """`lorakit train ...` arguments (after the program name)."""
    argv = ["train", str(RECIPE)]
    for key, value in lorakit_flags(args, system).items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return [*argv, "--out", str(out), "--overwrite"]


def lorakit_config(args: argparse.Namespace, out: Path | None = None, system: str = "lorakit") -> Any:
    """The TrainConfig the command line above resolves to."""
    from lorakit.training.config import build_config, read_recipe

    flags = lorakit_flags(args, system)
    flags = flags if out is None else {**flags, "out": str(out), "overwrite": True}
    return build_config(read_recipe(RECIPE), flags, source=str(RECIPE))


def data_spec(cfg: Any) -> Any:
    """The training data's DataSpec, as `lorakit train` reads it: TrainConfig names the fields alike."""
    from lorakit.training.data import DataSpec

    shared = {f.name for f in dataclasses.fields(DataSpec)} & {f.name for f in dataclasses.fields(cfg)}
    return DataSpec(source=cfg.data, hub_config=cfg.data_config, **{name: getattr(cfg, name) for name in shared})


def lorakit_encoding(cfg: Any) -> Any:
    """lorakit's own encoding of the training rows (lorakit.training.data.Encoded), as `lorakit train` makes it."""
    from lorakit.models import load_tokenizer
    from lorakit.training.data import encode, read_rows

    spec = data_spec(cfg)
    return encode(read_rows(spec, task=cfg.task), load_tokenizer(cfg.model), cfg.max_length, spec)


def lorakit_batches(encoded: Any, cfg: Any) -> list[list[int]]:
    """The example indices of each batch of lorakit's first epoch."""
    from lorakit.training.data import batch_order

    return batch_order([len(e.input_ids) for e in encoded.examples], cfg.batch_size, cfg.seed, 0, cfg.group_by_length)


def ampere() -> bool:
    """A CUDA GPU with TF32 (compute capability 8.0 or newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Positions the model runs over when each batch is padded to its longest example."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def loss_summary(losses: list[float]) -> dict[str, float]:
    """Mean loss of the last 10% of the logged steps (at least one), of the whole epoch, and of the first step."""
    tail = max(1, round(len(losses) / 10))
    return {
        "loss_last10": statistics.fmean(losses[-tail:]),
        "loss_mean": statistics.fmean(losses),
        "loss_first": losses[0],
        "last10_steps": tail,
    }


# ---------------------------------------------------------------------------------------------------------------
# Measuring inside a worker


class Meter:
    """Wall and CPU time, other processes' CPU share and peak RSS between begin() and end() of the epoch."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.clock = common.Clock()

    def begin(self) -> None:
        before = common.peak_memory_mb("cpu")  # VmHWM: loading model, data, tokenizer
        common.reset_peak_memory("cpu")  # VmHWM := VmRSS (Linux >= 4.0)
        at_start = common.current_memory_mb("cpu")
        reset = common.peak_memory_mb("cpu") <= at_start + 64
        self.result.update(peak_before_mb=before, rss_at_start_mb=at_start, peak_reset=reset)
        self.clock.start()

    def end(self) -> None:
        seconds, cpu_seconds, others = self.clock.stop()
        peak = common.peak_memory_mb("cpu")
        self.result.update(epoch_s=seconds, epoch_cpu_s=cpu_seconds, others_cpu_share=others, peak_epoch_mb=peak)
        self.result["peak_mb"] = max(peak, self.result["peak_before_mb"])


def worker_lorakit(args: argparse.Namespace) -> dict[str, Any]:
    """Train with lorakit's `train(cfg)` in this process, as `lorakit train` does, and time its training loop."""
    from transformers.utils import logging

    from lorakit.training.loop import train

    logging.disable_progress_bar()  # as the CLI: no per-shard loading bars or advisory warnings
    logging.set_verbosity_error()
    meter, out = Meter(), Path(args.out)
    console = common.loop_console(meter.begin, meter.end)
    cfg = lorakit_config(args, out, args.worker)
    train(cfg, console=console)
    if console.loops != 1:
        raise SystemExit(f"expected one progress display around lorakit's training loop, saw {console.loops}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    result = {
        **meter.result,
        "steps": len(steps),
        "losses": [r["loss"] for r in steps],
        "lrs": [r["lr"] for r in steps],
        "tokens_per_s": [r["tokens_per_s"] for r in steps],
        "command": ["lorakit", *lorakit_command(args, out, args.worker)],
        "adapter": str(out / "adapter.safetensors"),
    }
    if cfg.packing:  # the rows it trained on: packed examples
        from lorakit.training.packing import pack

        packed = pack(lorakit_encoding(cfg), cfg.max_length)
        result["padded_tokens"] = padded_tokens(
            [len(e.input_ids) for e in packed.examples], lorakit_batches(packed, cfg)
        )
    return result


def trl_rows(cfg: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """TRL's prompt/completion rows: the recipe's templates filled in (TRL appends EOS to the completion)."""
    from lorakit.training.data import read_rows, template_values

    spec = data_spec(cfg)
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token or ""}
    out = []
    for i, row in enumerate(read_rows(spec, task=cfg.task).rows):
        values = template_values(row, spec, special)
        prompt, completion = cfg.prompt_template.format_map(values), cfg.completion_template.format_map(values)
        out.append({"row": i, "prompt": prompt, "completion": completion})
    return out


def build_trl(args: argparse.Namespace, cfg: Any, encoded: Any, out: Path, callbacks: list[Any]) -> Any:
    """An SFTTrainer set up like the lorakit recipe; its train_dataset is prepared (tokenized) but not trained."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from lorakit.models import packaged_model_dir
    from lorakit.training.data import IGNORE
    from lorakit.training.loop import lr_at

    local = cfg.model is None or Path(cfg.model).is_dir()
    if not local or cfg.targets != "q,v" or cfg.layers or cfg.grad_accum != 1:
        raise SystemExit("this benchmark maps the smollm2-e2e recipe only (a local model, q,v, no accumulation)")
    folder = cfg.model or packaged_model_dir()  # the safetensors folder lorakit trains from
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    if args.trl_input == "text":
        rows = trl_rows(cfg, tokenizer)
    else:  # lorakit's token ids and loss mask, as TRL's pre-tokenized columns
        rows = [
            {"row": e.row, "input_ids": e.input_ids, "completion_mask": [int(x != IGNORE) for x in e.labels]}
            for e in encoded.examples
        ]
    if args.trl_sampler == "lorakit":  # lorakit's batches in lorakit's order, read sequentially
        batches = lorakit_batches(encoded, cfg)
        if any(len(batch) != cfg.batch_size for batch in batches[:-1]):
            print("warning: lorakit's short batch is not its last; TRL's batches after it are shifted", file=sys.stderr)
        by_row = {r["row"]: r for r in rows}
        rows = [by_row[encoded.examples[i].row] for batch in batches for i in batch]
    dataset = Dataset.from_list(rows)

    steps = max(1, math.ceil(cfg.epochs * math.ceil(len(dataset) / cfg.batch_size)))  # as lorakit counts them
    # TRL's default is True; lorakit's recipe: off (newer transformers name it activation_checkpointing)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    config = SFTConfig(
        **{name: cfg.gradient_checkpointing},
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps,
        optim="adamw_torch",
        max_grad_norm=cfg.max_grad_norm or 0.0,  # 0: no clipping, as lorakit without --max-grad-norm
        label_smoothing_factor=cfg.label_smoothing,
        max_length=cfg.max_length,
        seed=cfg.seed,
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        bf16=False,  # TRL's default is bf16 autocast; lorakit's recipe trains in fp32
        fp16=False,
        tf32=True if ampere() else None,  # as lorakit's fp32 on such a GPU (--no-tf32 turns it off)
        train_sampling_strategy="sequential" if args.trl_sampler == "lorakit" else args.trl_sampler,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    common_kwargs = dict(args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    if args.trl_schedule == "hf":  # TRL's own: peft_config, its AdamW and transformers' linear schedule
        return SFTTrainer(model=model, peft_config=lora, **common_kwargs)
    # lorakit's learning rate at every step: transformers' linear warmup gives step 0 a rate of 0 and step s
    # s/warmup of the peak, lorakit (s+1)/warmup; after warmup both decay linearly to 0 alike.
    set_seed(cfg.seed)  # as SFTTrainer does before it applies a peft_config
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, steps, cfg.warmup_steps, 1.0))
    return SFTTrainer(model=model, optimizers=(optimizer, schedule), **common_kwargs)


def compare_tokens(encoded: Any, prepared: Any) -> dict[str, Any]:
    """Compare TRL's prepared dataset (input_ids, labels, row) with lorakit's encoding, row by row."""
    ours = {e.row: e for e in encoded.examples}
    columns = zip(prepared["row"], prepared["input_ids"], prepared["labels"])
    theirs = {row: (ids, labels) for row, ids, labels in columns}
    ids_diff = [r for r in ours if r in theirs and theirs[r][0] != ours[r].input_ids]
    labels_diff = [r for r in ours if r in theirs and theirs[r][1] != ours[r].labels]
    missing = sorted(set(ours) ^ set(theirs))
    return {
        "rows_compared": len(set(ours) & set(theirs)),
        "input_ids_identical": not ids_diff and not missing,
        "labels_identical": not labels_diff and not missing,
        "rows_with_other_ids": ids_diff[:10],
        "rows_with_other_labels": labels_diff[:10],
        "rows_in_one_only": missing[:10],
    }


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    """Train one epoch with TRL's SFTTrainer and save the PEFT adapter."""
    from transformers import TrainerCallback

    meter = Meter()
    logged: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.begin()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # the step logs (the run summary logs train_loss instead)
                logged.append({"step": state.global_step, **logs})

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.end()

    cfg = lorakit_config(args)
    encoded = lorakit_encoding(cfg)
    out = Path(args.out)
    trainer = build_trl(args, cfg, encoded, out, [Clock()])
    check = compare_tokens(encoded, trainer.train_dataset)
    if not (check["input_ids_identical"] and check["labels_identical"]) and not args.allow_token_mismatch:
        raise SystemExit(f"TRL's token sequences differ from lorakit's: {check}")
    counted = {"real": 0, "padded": 0, "batches": 0}
    collate = trainer.data_collator

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["input_ids"].numel()
        counted["batches"] += 1
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    return {
        **meter.result,
        "steps": len(logged),
        "losses": [r["loss"] for r in logged],
        "lrs": [r.get("learning_rate") for r in logged],
        "token_check": check,
        "real_tokens_seen": counted["real"],
        "padded_tokens": counted["padded"],
        "batches": counted["batches"],
        "adapter": str(adapter),
        "import_command": ["lorakit", "import", str(adapter), "--out", str(out / "adapter.safetensors")],
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = worker_trl(args) if args.worker == "trl" else worker_lorakit(args)
    result.update(system=args.worker, threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The driver


def worker_args(args: argparse.Namespace, system: str, out: Path, result: Path) -> list[str]:
    argv = ["--worker", system, "--out", str(out), "--result", str(result), "--rows", str(args.rows)]
    argv += ["--data", args.data, "--threads", str(args.threads), "--trl-sampler", args.trl_sampler]
    argv += ["--trl-schedule", args.trl_schedule, "--trl-input", args.trl_input]
    return [*argv, "--allow-token-mismatch"] if args.allow_token_mismatch else argv


def run_worker(args: argparse.Namespace, system: str, round_: int) -> dict[str, Any]:
    """One system's epoch in a fresh process; its output goes to a log file (or the terminal with --verbose)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out, result, log = (work / f"{system}-r{round_}{suffix}" for suffix in ("", ".json", ".log"))
    result.unlink(missing_ok=True)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    env.update(HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    command = [sys.executable, __file__, *worker_args(args, system, out, result)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    print(f"  {system} (round {round_}) ... ", end="", flush=True)
    with contextlib.ExitStack() as stack:
        sink = None if args.verbose else stack.enter_context(log.open("w"))
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not result.is_file():
        tail = "" if args.verbose else "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{system} worker failed (exit code {proc.returncode}); log {log}:\n{tail}")
    data = json.loads(result.read_text())
    data.update(
        round=round_,
        process_s=seconds,
        process_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        log=None if args.verbose else str(log),
    )
    print(f"epoch {data['epoch_s']:.1f} s (process {seconds:.1f} s)", flush=True)
    return data


def schedule(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(round, system) in running order: --order given, reversed, or alternating which goes first."""
    runs = []
    for r in range(1, args.repeats + 1):
        names = list(args.systems)
        if args.order == "reversed" or (args.order == "alternate" and r % 2 == 0):
            names.reverse()
        runs += [(r, name) for name in names]
    return runs


def summarize(system: str, runs: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """One system over its rounds: medians of times, the largest peaks, the losses of the first round."""
    seconds = [r["epoch_s"] for r in runs]
    median_s = statistics.median(seconds)
    first = runs[0]
    same_batches = system in ("lorakit", "lorakit-compile")
    padded = first.get("padded_tokens", data["lorakit_padded_tokens"] if same_batches else None)
    rates = first.get("tokens_per_s") or []
    steady = statistics.median(rates[len(rates) // 2 :]) if len(rates) >= 2 else None
    return {
        "system": system,
        "label": SYSTEMS[system],
        "rounds": len(runs),
        "epoch_s": median_s,
        "epoch_s_runs": seconds,
        "epoch_cpu_s": statistics.median(r["epoch_cpu_s"] for r in runs),
        "others_cpu_share": max(r["others_cpu_share"] for r in runs),
        "steps": first["steps"],
        "real_tokens": data["real_tokens"],
        "real_tokens_per_s": data["real_tokens"] / median_s,
        "steady_tokens_per_s": steady,
        "padded_tokens": padded,
        "padding_share": 1 - data["real_tokens"] / padded if padded else None,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "peak_epoch_mb": max(r["peak_epoch_mb"] for r in runs),
        "rss_at_start_mb": statistics.median(r["rss_at_start_mb"] for r in runs),
        "peak_reset": all(r["peak_reset"] for r in runs),
        **loss_summary(first["losses"]),
        "process_s": statistics.median(r["process_s"] for r in runs),
    }


def table(summary: list[dict[str, Any]], data: dict[str, Any], args: argparse.Namespace) -> tuple[str, list, list]:
    columns = ["system", "epoch s", "real tokens", "real tok/s", "2nd-half tok/s", "padded tokens", "padding"]
    columns += ["peak RSS MiB"]
    columns += ["peak in epoch MiB", "RSS at start MiB", "steps", "first loss", "mean loss", "last-10% loss"]
    rows = []
    for s in summary:
        runs = ", ".join(f"{x:.1f}" for x in s["epoch_s_runs"])
        rows.append(
            [
                s["label"],
                f"{s['epoch_s']:.1f}" + (f" ({runs})" if s["rounds"] > 1 else ""),
                f"{s['real_tokens']:,}",
                f"{s['real_tokens_per_s']:.0f}",
                f"{s['steady_tokens_per_s']:.0f}" if s.get("steady_tokens_per_s") else "-",
                f"{s['padded_tokens']:,}" if s["padded_tokens"] else "-",
                f"{s['padding_share']:.1%}" if s["padding_share"] is not None else "-",
                f"{s['peak_mb']:.0f}",
                f"{s['peak_epoch_mb']:.0f}",
                f"{s['rss_at_start_mb']:.0f}",
                str(s["steps"]),
                f"{s['loss_first']:.4f}",
                f"{s['loss_mean']:.4f}",
                f"{s['loss_last10']:.4f}",
            ]
        )
    title = (
        f"One epoch of LoRA training, {data['examples']:,} E2E rows (batch 8, {data['steps']} steps), packaged "
        f"SmolLM2-135M-Instruct, fp32, r 4 alpha 32 on q,v, {args.threads} torch threads"
        + (f"; median of {args.repeats} rounds (each run listed)" if args.repeats > 1 else "")
    )
    return title, columns, rows


def notes(summary: list[dict[str, Any]], data: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What to read the table with."""
    by = {s["system"]: s for s in summary}
    out = []
    if "lorakit" in by and "trl" in by:
        a, b = by["lorakit"], by["trl"]
        last = b["loss_last10"] / a["loss_last10"] - 1
        mean = b["loss_mean"] / a["loss_mean"] - 1
        agree = abs(last) <= LOSS_TOLERANCE and abs(mean) <= LOSS_TOLERANCE
        out.append(
            f"- TRL / lorakit: epoch time {b['epoch_s'] / a['epoch_s']:.2f}x, real tokens/s "
            f"{b['real_tokens_per_s'] / a['real_tokens_per_s']:.2f}x, peak RSS {b['peak_mb'] / a['peak_mb']:.2f}x."
        )
        out.append(
            f"- Loss, TRL relative to lorakit: last {a['last10_steps']} steps {last:+.2%}, whole epoch {mean:+.2%}, "
            f"first step {b['loss_first'] / a['loss_first'] - 1:+.2%}: "
            + ("within" if agree else "NOT within")
            + f" {LOSS_TOLERANCE:.0%}."
        )
    if "trl" in by:
        out.append(
            "- Loss computation: lorakit projects only the label positions through the LM head; TRL 1.16 on a CPU "
            "runs its chunked LM head over every position (prompt and padding too; it keeps only label positions "
            "on CUDA/XPU with Triton) and also computes the entropy and top-1 accuracy it logs every step."
        )
    check = data.get("token_check")
    if check:
        same = check["input_ids_identical"] and check["labels_identical"]
        out.append(
            f"- Token sequences and label masks: {'identical' if same else 'DIFFERENT'} for all "
            f"{check['rows_compared']:,} rows (TRL's prepared dataset against lorakit's encoding; TRL input: "
            f"{args.trl_input})."
        )
    sampler = {
        "random": "its random sampler (more padding)",
        "group_by_length": "transformers' length-grouped sampler",
        "lorakit": "lorakit's batches in lorakit's order (sequential sampler over a reordered dataset)",
    }[args.trl_sampler]
    out.append(f"- Row order: lorakit shuffles with its length-grouped sampler (seed {data['seed']}); TRL: {sampler}.")
    schedule = {
        "lorakit": "lorakit's schedule in TRL too (LambdaLR over lr_at: (s+1)/warmup, then linear decay).",
        "hf": "TRL's own linear schedule (s/warmup: step 0 at lr 0), lorakit's (s+1)/warmup.",
    }[args.trl_schedule]
    out.append(f"- Learning rate: {schedule}")
    out.append(
        "- epoch s: first step to end of last step, loading and adapter saving excluded; real tokens: attention-mask "
        "ones over the epoch (the same sequences for both); peak RSS: the process's VmHWM (model loading included); "
        "peak in epoch: VmHWM reset when the epoch starts; others' CPU share during the epoch: "
        + ", ".join(f"{s['system']} {s['others_cpu_share']:.0%}" for s in summary)
        + "."
    )
    return out


def dataset_facts(args: argparse.Namespace) -> dict[str, Any]:
    """What both systems train on: example count, real tokens, lorakit's padded tokens."""
    cfg = lorakit_config(args)
    encoded = lorakit_encoding(cfg)
    lengths = [len(e.input_ids) for e in encoded.examples]
    return {
        "rows": args.rows,
        "examples": len(encoded.examples),
        "truncated": encoded.truncated,
        "dropped": encoded.dropped,
        "real_tokens": sum(lengths),
        "label_tokens": encoded.num_label_tokens,
        "steps": math.ceil(len(lengths) / cfg.batch_size),
        "lorakit_padded_tokens": padded_tokens(lengths, lorakit_batches(encoded, cfg)),
        "seed": cfg.seed,
        "max_length": cfg.max_length,
        "data": args.data,
        "recipe": str(RECIPE.relative_to(ROOT)),
    }


def check_only(args: argparse.Namespace) -> None:
    """--check: build TRL's dataset as the worker does and compare it with lorakit's encoding; no training."""
    from lorakit.training.data import IGNORE

    cfg = lorakit_config(args)
    encoded = lorakit_encoding(cfg)
    trainer = build_trl(args, cfg, encoded, Path(args.work) / "check", [])
    check = compare_tokens(encoded, trainer.train_dataset)
    print(json.dumps(check, indent=2))
    tokenizer = trainer.processing_class
    example = encoded.examples[0]
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    print(f"row 1, no loss: {tokenizer.decode(example.input_ids[:first])!r}")
    print(f"row 1, loss:    {tokenizer.decode(example.input_ids[first:])!r}")
    if not (check["input_ids_identical"] and check["labels_identical"]):
        raise SystemExit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__, threads=None, seed=False)
    p.add_argument("--rows", type=int, default=2000, help="first N rows of the CSV (default 2000; --quick: 16)")
    p.add_argument("--data", default=DATA, help=f"the E2E training CSV, columns mr, ref (default {DATA})")
    p.add_argument(
        "--systems",
        default="lorakit,trl",
        help="comma-separated, in running order: lorakit, lorakit-packing, lorakit-compile, trl",
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds of every system")
    p.add_argument(
        "--order",
        choices=["given", "reversed", "alternate"],
        default="alternate",
        help="which system goes first: as in --systems, reversed, or alternating every round (default)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--check", action="store_true", help="only compare the token sequences and masks; no training")
    p.add_argument(
        "--trl-sampler",
        choices=["random", "group_by_length", "lorakit"],
        default="random",
        help="TRL's row order: its random sampler (default), transformers' length-grouped one, or lorakit's batches",
    )
    p.add_argument(
        "--trl-schedule",
        choices=["lorakit", "hf"],
        default="lorakit",
        help="TRL's learning rate: lorakit's warmup/decay (default) or transformers' own linear schedule",
    )
    p.add_argument(
        "--trl-input",
        choices=["text", "ids"],
        default="text",
        help="TRL's data: prompt/completion text it tokenizes itself (default) or lorakit's input_ids + masks",
    )
    p.add_argument("--allow-token-mismatch", action="store_true", help="train TRL even if its tokens differ")
    p.add_argument("--work", default=str(ROOT / "runs" / "epoch_speed"), help="run folders, worker logs")
    p.add_argument("--verbose", action="store_true", help="show the workers' output instead of logging it")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = common.parse(p, argv, quick=dict(rows=16))
    if args.rows < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--rows, --repeats and --threads must be at least 1")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS) or len(set(args.systems)) != len(args.systems):
        p.error(f"--systems: a comma-separated list of distinct names from {', '.join(SYSTEMS)}")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if args.json is None:  # the results and their Markdown report (.md) beside them
        args.json = str(ROOT / "bench" / "results" / ("epoch_speed-quick.json" if args.quick else "epoch_speed.json"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.check:
        torch.set_num_threads(args.threads)
        check_only(args)
        return
    info = common.start(args, device="cuda" if torch.cuda.is_available() else "cpu")
    data = dataset_facts(args)
    print(
        f"data: {data['examples']:,} examples, {data['real_tokens']:,} real tokens, {data['steps']} steps of 8",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    for round_, system in schedule(args):
        runs[system].append(run_worker(args, system, round_))
    for system in args.systems:
        for r in runs[system]:
            if r["steps"] != data["steps"] and system != "lorakit-packing":  # packed rows: fewer steps
                raise SystemExit(f"{system} logged {r['steps']} steps, expected {data['steps']}")
    commands = {"lorakit": ["lorakit", *lorakit_command(args, Path(args.work) / "lorakit-r1")]}
    if "trl" in runs:
        data["token_check"] = runs["trl"][0]["token_check"]
        seen = runs["trl"][0]["real_tokens_seen"]
        if seen != data["real_tokens"]:
            print(f"warning: TRL's batches held {seen:,} real tokens, lorakit's encoding {data['real_tokens']:,}")
        commands["lorakit_import_trl_adapter"] = runs["trl"][0]["import_command"]
    for system in args.systems:
        if system != "lorakit" and system in VARIANTS:
            commands[system] = ["lorakit", *lorakit_command(args, Path(args.work) / f"{system}-r1", system)]
    summary = [summarize(s, runs[s], data) for s in args.systems]
    table_ = table(summary, data, args)
    common.finish(args, info, *table_, summary, notes(summary, data, args), data=data, commands=commands, runs=runs)


if __name__ == "__main__":
    main()
