"""`lorakit train`: `train(config) -> TrainResult`, in parts that read top to bottom.

    train(cfg)
      setup(cfg)        data read and checked, tokenizer, model + LoRA layers, optimizer     -> Run (fixed)
      resume(run)       adapter, optimizer, RNG and data position from the newest checkpoint  -> RunState
      fit(run, state)   the loop: train_step -> log -> evaluate -> checkpoint, until the last step (or early stop)
      finish(run, ...)  last evaluation and checkpoint, adapter.safetensors, loss.png         -> TrainResult

`Run` holds what a run is set up with and never changes; `RunState` (checkpoint.py) what changes as it trains,
which is exactly what a checkpoint stores. One optimizer step: micro-batches -> loss summed over label tokens /
the label tokens of an average step (`Run.step_labels`) -> backward -> (clip) -> AdamW at lr_at(step) (warmup,
then --lr-scheduler).

With evaluation rows, every evaluation after step 0 is a candidate for the best adapter (`best/adapter.safetensors`,
by `best_metric`); `early_stopping_patience` evaluations in a row without an improvement (by more than
`early_stopping_threshold`) stop the run, which is then finished: a `--resume` of it has nothing to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import check_bf16, memory_record, peak_memory, set_tf32, start_cuda_peak
from ..errors import LorakitError, TrainingDiverged, TrainingInterrupted
from ..evaluation.evaluate import GenerateOptions, PromptGroup, generate, prompt_groups
from ..evaluation.metrics import MetricWarning, text_metrics
from ..files import folder_lock, write_atomic
from ..lora.adapter import apply_adapter, read_adapter, save_adapter
from ..lora.wrap import add_lora, lora_layers, oversized_ranks
from ..models import base_name, check_task, context_length, load_base, load_config, load_tokenizer, meta_base
from . import attention, compiling, packing
from .checkpoint import (
    BEST_COPY,
    RunState,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import (
    FIELDS,
    LOWER_IS_BETTER,
    RESUME_MAY_CHANGE,
    TrainConfig,
    build_config,
    read_run_config,
    resume_changes,
)
from .data import Encoded, Rows, batch_order, collate, encode, read_rows, split_rows, to_device
from .distributed import World, all_sum, barrier, device_for, gather_objects, init_world
from .failure import fail_point, one_failure_ends_all
from .fsdp import ShardedStep, check_fsdp, load_model, shard_model
from .loss import LossStep, dataset_loss, example_label_count, with_label_index
from .precision import Autocast, autocast_for, check_precision, fp32_master_weights, gradient_scaler
from .reporting import Reporters, check_available, parse_report_to
from .runfolder import MetricsLog, check_run_folder, claim_run_folder, note_in_config, plot_losses, save_config
from .steploss import LossTracker

BEST = Path("best") / "adapter.safetensors"
"""The best adapter, in the run folder."""
TEXT_METRICS_LOGGED = ("bleu", "rouge_l")
"""What `--eval-generate` scores at each evaluation (as `lorakit eval --generate`), with `best_metric`."""
MAX_NEW_TOKENS = GenerateOptions.max_new_tokens


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    out: Path
    adapter: Path
    steps: int
    trainable_params: int
    frozen_params: int
    adapter_bytes: int
    seconds: float
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    truncated: int
    dropped: int
    resumed_from: int | None
    lora_changed: bool
    peak_memory_mb: float = 0.0
    peak_reserved_mb: float | None = None
    """CUDA: the most the caching allocator held (None on the CPU)."""
    world_size: int = 1
    main: bool = True
    """False on the ranks other than 0 of a distributed run (they print and write nothing)."""
    best_adapter: Path | None = None
    """best/adapter.safetensors; None when the run does not evaluate."""
    best_metric: str = "loss"
    best_step: int | None = None
    best_value: float | None = None
    stopped_early: bool = False
    planned_steps: int | None = None
    """The steps the run was set up for (more than `steps` when it stopped early)."""
    nothing_done: bool = False
    """A `--resume` of a run that had stopped early: nothing was trained or written."""


@dataclass
class Run:
    """What a run is set up with; none of it changes while it trains (that is `RunState`)."""

    cfg: TrainConfig
    world: World
    device: torch.device
    out: Path
    console: Any
    encoded: Encoded
    eval_encoded: Encoded | None
    pad_id: int
    model: nn.Module
    step_module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any
    autocast: Autocast
    total_steps: int
    batches_per_epoch: int
    base_model: str
    log: MetricsLog | None = None
    tokenizer: Any = None
    eval_prompts: list[PromptGroup] | None = None
    """The unique evaluation prompts and their references, with `eval_generate`."""
    generate_options: GenerateOptions | None = None
    notes: set[str] = field(default_factory=set)
    """Notes (a metric that cannot run here) printed already: each once."""
    progress: Any = None
    """The progress display while the loop runs (evaluation and generation passes add their bars to it)."""
    step_labels: float = 1.0
    """Label tokens (classification: examples) of an average optimizer step over an epoch: every step's summed loss
    is divided by it, so each label token of the epoch weighs the same whatever batch it falls in (see
    train_step)."""


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "linear") -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warmup to `peak` over `warmup` steps, then

    - linear:   peak x (total - step) / (total - warmup), down to 0 at step `total` (the paper's);
    - cosine:   peak x (1 + cos(pi x (step - warmup) / (total - warmup))) / 2, down to 0 at step `total`;
    - constant: peak.

    The last step (`total - 1`) still learns; the first step after the warmup runs at the peak.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected linear, cosine or constant")


def run_length(examples: int, cfg: TrainConfig, world_size: int = 1) -> tuple[int, int, int]:
    """(global micro-batches per epoch, optimizer steps per epoch, total steps) of a run on `examples` examples."""
    batches = math.ceil(examples / (cfg.batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return batches, per_epoch, total


def train(cfg: TrainConfig, console: Any = None) -> TrainResult:
    """Fine-tune LoRA adapters as `cfg` says; writes the run folder and returns what happened.

    Raises:
        LorakitError: bad input, found before anything loads where it can be.
        TrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C or SIGTERM; a checkpoint was saved first (`--resume` continues).
    """
    from rich.console import Console

    started = time.perf_counter()
    if cfg.data is None:
        raise LorakitError("no training data given; pass --data (a file, a datasets folder or a hub dataset)")
    packing.check_config(cfg)
    world = init_world()
    console = Console(stderr=True, quiet=True) if not world.main else console or Console(stderr=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(one_failure_ends_all(world))  # an error on any rank ends all; the group is destroyed
        out = check_run_folder(cfg)
        check_available(parse_report_to(cfg.report_to))  # a missing extra: now, not after loading
        changes = check_same_settings(cfg, out) if cfg.resume else []
        if cfg.resume and (done := stopped_before(cfg, out, world, console, started)) is not None:
            return done  # a run that stopped early is finished: nothing is loaded or written
        locked = world.main and out.is_dir()
        if locked:  # an existing folder: claim it before the slow part, so a second run fails at once
            stack.enter_context(folder_lock(out))
        run = setup(cfg, world, out, console)
        if world.main:
            claim_run_folder(out, run.cfg, stack, locked)
        barrier(world)
        state = resume(run) if cfg.resume else new_state(run)
        if world.main:  # resume/overwrite act on this invocation: saved as false, config.yaml never deletes a run
            saved = saved_config(run)
            save_config(out, saved, state.step if cfg.resume else None, changes)  # a resume: changes as comments
        reporters = Reporters(parse_report_to(cfg.report_to) if world.main else (), out, asdict(saved_config(run)))
        stack.callback(reporters.close)
        run.log = MetricsLog(
            out / "metrics.jsonl", state.step if cfg.resume else None, enabled=world.main, also=reporters.log
        )
        resumed_from = state.step if cfg.resume else None
        tokens, saved_at = fit(run, state)
        return finish(run, state, started, tokens, resumed_from, saved_at)


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def saved_config(run: Run) -> TrainConfig:
    """The configuration config.yaml records: resume/overwrite act on one invocation and are saved as false (so
    config.yaml used as a recipe never deletes a run); nproc as the run had it."""
    nproc = run.world.local_size if run.world.distributed else run.cfg.nproc
    return replace(run.cfg, resume=False, overwrite=False, nproc=nproc)


def setup(cfg: TrainConfig, world: World, out: Path, console: Any) -> Run:
    """Everything the run needs, in the order that fails cheapest first: data, tokenizer, model, optimizer."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows, eval_rows = read_data(cfg)
    fail_point("data", world)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model_config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    check_task(model_config, cfg.task, cfg.model or base_name(None))
    max_length = capped_max_length(cfg.max_length, context_length(model_config), console)
    encoded, eval_encoded = encode_data(cfg, rows, eval_rows, tokenizer, max_length)
    console.print(data_line(cfg, rows, eval_rows, encoded, max_length))
    if cfg.packing:
        encoded, unpacked = packing.pack(encoded, max_length), encoded
        batch = cfg.batch_size * world.size
        console.print(packing.data_note(unpacked, encoded, max_length, batch, cfg.seed, cfg.group_by_length))
    prompts = eval_prompts(cfg, eval_rows, eval_encoded, tokenizer) if eval_rows and cfg.eval_generate else None
    pad_id = pad_id_of(tokenizer)
    device = device_for(world)
    check_precision(cfg.precision, cfg.load_in_8bit, device)
    if cfg.fsdp:
        check_fsdp(cfg, world)
    check_bf16(cfg.precision, device)
    set_tf32(device, cfg.precision, cfg.tf32)
    if cfg.compile:
        compiling.check(device, 8 if cfg.load_in_8bit else 4 if cfg.load_in_4bit else None)
    attn = attention.resolve(cfg.attn_implementation, device, cfg.precision, model_config, cfg.task)
    model = build_model(cfg, rows, pad_id, device, console, world, attn)
    if cfg.packing:
        vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
        packing.check_model(model, device, autocast_for(cfg.precision, device), vocab, cfg.precision != "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    if cfg.compile:
        compiling.compile_blocks(model)
    step_module: nn.Module = LossStep(model, cfg.task, cfg.label_smoothing)
    if cfg.fsdp:  # the base is sharded (build_model); what trains is whole on every rank, averaged as by DDP
        step_module = ShardedStep(step_module, params, world)
    elif world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Only parameters that require gradients (the LoRA A/B, a new head) are synchronized.
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(cfg.seed + world.rank)  # LoRA dropout masks differ between ranks
    batches_per_epoch, _, total = run_length(len(encoded.examples), cfg, world.size)
    trainable = sum(p.numel() for p in params)
    console.print(
        f"model: {cfg.model or base_name(None)}; LoRA r={cfg.rank} alpha={cfg.alpha:g} on {cfg.targets}: "
        f"{trainable:,} trainable of {trainable + frozen:,} parameters; {total} steps; effective batch "
        f"{cfg.batch_size} x {world.size} process(es) x {cfg.grad_accum} accumulation = "
        f"{cfg.batch_size * world.size * cfg.grad_accum} on {device.type}"
        + (" (8-bit base)" if cfg.load_in_8bit else "")
        + (f" (4-bit {cfg.bnb_4bit_quant_type} base)" if cfg.load_in_4bit else "")
    )
    labels = sum(example_label_count(e, cfg.task) for e in encoded.examples)
    return Run(
        cfg, world, device, out, console, encoded, eval_encoded, pad_id, model, step_module, params, optimizer,
        gradient_scaler(cfg.precision, device), autocast_for(cfg.precision, device), total, batches_per_epoch,
        base_name(cfg.model), tokenizer=tokenizer, eval_prompts=prompts,
        generate_options=generate_options(cfg, prompts, max_length) if prompts else None,
        step_labels=max(labels * cfg.grad_accum / batches_per_epoch, 1.0),
    )  # fmt: skip


def eval_prompts(cfg: TrainConfig, rows: Rows, encoded: Encoded, tokenizer: Any) -> list[PromptGroup]:
    """The unique prompts of the evaluation rows that `--eval-generate` generates for (the first `eval_batches`
    batches' worth with `--eval-batches`)."""
    if encoded.format != "prompt_completion":
        raise LorakitError(f"--eval-generate needs prompt/completion rows; {cfg.eval_data} holds {encoded.format} rows")
    spec = cfg.data_spec("eval")
    groups = prompt_groups(rows, encoded, cfg.completion_field, tokenizer, cfg.completion_template, spec)
    return groups[: cfg.eval_batches * cfg.batch_size] if cfg.eval_batches else groups


def generate_options(cfg: TrainConfig, prompts: list[PromptGroup], max_length: int) -> GenerateOptions:
    """Greedy, as `lorakit eval --generate`: at most 64 new tokens, fewer where the prompt and the continuation would
    not fit in `max_length` (already capped at the model's context length)."""
    longest = max(len(g.prompt_ids) for g in prompts)
    return GenerateOptions(batch_size=cfg.batch_size, max_new_tokens=max(1, min(MAX_NEW_TOKENS, max_length - longest)))


def read_data(cfg: TrainConfig) -> tuple[Rows, Rows | None]:
    """The training rows and the evaluation rows (labels mapped to the training ids), read and checked.

    With `val_split` the evaluation rows are held out of the training rows (`split_rows`: the same `seed` gives the
    same split, so a resumed run sees the same data); `eval_limit` keeps the first of them.
    """
    rows = read_rows(cfg.data_spec("train"), task=cfg.task, num_labels=cfg.num_labels)
    if cfg.task == "classification" and cfg.num_labels is not None and cfg.num_labels < rows.num_labels:
        raise LorakitError(f"--num-labels {cfg.num_labels}: {cfg.data} has {rows.num_labels} classes")
    if cfg.val_split is not None:
        if cfg.eval_data:  # build_config refuses this too; a TrainConfig made by hand may hold both
            raise LorakitError("--val-split and --eval-data: choose one")
        rows, held = split_rows(rows, cfg.val_split, cfg.seed)
        return rows, held.subset(list(range(min(len(held.rows), cfg.eval_limit or len(held.rows)))))
    if not cfg.eval_data:
        return rows, None
    classes = (cfg.num_labels or rows.num_labels) if cfg.task == "classification" else None
    return rows, read_rows(cfg.data_spec("eval"), task=cfg.task, label_names=rows.label_names, num_labels=classes)


def encode_data(
    cfg: TrainConfig, rows: Rows, eval_rows: Rows | None, tokenizer: Any, max_length: int
) -> tuple[Encoded, Encoded | None]:
    """The training and evaluation examples; evaluation rows held out by `val_split` that leave nothing to evaluate
    are refused as such."""
    encoded = encode(rows, tokenizer, max_length, cfg.data_spec("train"))
    if eval_rows is None:
        return encoded, None
    try:
        return encoded, encode(eval_rows, tokenizer, max_length, cfg.data_spec("eval"))
    except LorakitError as e:
        if cfg.val_split is None:
            raise
        held = f"the {len(eval_rows.rows)} row(s) held out by --val-split {cfg.val_split:g} leave no evaluation rows"
        raise LorakitError(f"{held}: {e}") from None


def data_line(cfg: TrainConfig, rows: Rows, eval_rows: Rows | None, encoded: Encoded, max_length: int) -> str:
    """`data: N examples (format) from SOURCE`, with the --val-split counts, truncated and dropped rows."""
    split = ""
    if cfg.val_split is not None and eval_rows is not None:
        split = (
            f" (--val-split {cfg.val_split:g}, seed {cfg.seed}: {len(rows.rows)} rows to train on, "
            f"{len(eval_rows.rows)} held out for evaluation)"
        )
    return (
        f"data: {len(encoded.examples)} examples ({rows.format}) from {cfg.data}{split}"
        + (f"; {encoded.truncated} truncated to {max_length} tokens" if encoded.truncated else "")
        + (f"; {encoded.dropped} dropped (nothing left to learn after truncation)" if encoded.dropped else "")
    )


def capped_max_length(max_length: int, positions: int | None, console: Any) -> int:
    """`max_length`, at most the model's positions (longer rows could not run), saying so when it caps.
    config.yaml keeps the value asked for; the same model caps it the same way on resume."""
    if positions is None or max_length <= positions:
        return max_length
    console.print(f"note: --max-length {max_length} capped at {positions}, the model's context length")
    return positions


def pad_id_of(tokenizer: Any) -> int:
    """Any valid id works: padding is masked by position, never by token id."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def build_model(
    cfg: TrainConfig,
    rows: Rows,
    pad_id: int,
    device: torch.device,
    console: Any,
    world: World | None = None,
    attn: str | None = None,
) -> nn.Module:
    """The frozen base in the compute precision (or 8 or 4 bits) with LoRA layers, in training mode on `device`;
    with --fsdp sharded over the ranks (fsdp.py)."""
    torch.manual_seed(cfg.seed)  # a new head's and A's initialization (the same on every rank)
    num_labels = (cfg.num_labels or rows.num_labels) if cfg.task == "classification" else None
    pad_token_id = pad_id if cfg.task == "classification" else None
    sharded = cfg.fsdp and world is not None and world.distributed
    options = dict(dtype=cfg.precision, task=cfg.task, trust_remote_code=cfg.trust_remote_code, num_labels=num_labels)
    options.update(pad_token_id=pad_token_id)
    four_bit = cfg.bnb_4bit_quant_type if cfg.load_in_4bit else None
    # --fsdp: rank 0 reads the base into host memory and sends each rank its shard (never the whole base on one GPU)
    load = partial(
        load_base, cfg.model, **options, load_in_8bit=cfg.load_in_8bit, load_in_4bit=four_bit,
        device=torch.device("cpu") if sharded else device,
        allow_pickle=cfg.allow_pickle,
        attn_implementation=attn,
    )  # fmt: skip
    meta = partial(meta_base, cfg.model, **options, attn_implementation=attn)
    model = load_model(world, load, meta) if sharded else load()
    add_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, layers=cfg.layers)
    for name, limit in oversized_ranks(model)[:1]:
        more = len(oversized_ranks(model)) - 1
        console.print(
            f"[bold yellow]warning: rank {cfg.rank} is larger than the smaller side of {name} ({limit})"
            + (f" and of {more} more adapted layers" if more else "")
            + f"; an update there cannot have rank above {limit}[/]"
        )
    if cfg.task == "classification":
        # The new head is trained in full next to LoRA (as in the paper's GLUE runs) and saved in the adapter.
        new = set(getattr(model, "lorakit_new_params", []))
        for name, param in model.named_parameters():
            if name in new:
                param.requires_grad_(True)
    fp32_master_weights([p for p in model.parameters() if p.requires_grad])
    if not (cfg.load_in_8bit or cfg.load_in_4bit or sharded):  # placed on its device as it loads; cannot move
        model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if not cfg.base_dropout:
        base_dropout_off(model)
    if sharded:
        shard_model(model, world, device)
    return model


def base_dropout_off(model: nn.Module) -> None:
    """Silence the base model's own dropout (the paper's GPT-2 has none); LoRA dropout is untouched."""
    lora_dropouts = {id(layer.dropout) for _, layer in lora_layers(model)}
    for module in model.modules():
        if isinstance(module, nn.Dropout) and id(module) not in lora_dropouts:
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_p"):  # attention code that reads a float, not a module
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Resume


def new_state(run: Run) -> RunState:
    eval_fingerprint = run.eval_encoded.fingerprint() if run.eval_encoded else None
    return RunState(data=run.encoded.fingerprint(), eval_data=eval_fingerprint, world_size=run.world.size)


def resume(run: Run) -> RunState:
    """The state of the newest complete checkpoint, with the adapter, optimizer and RNG restored.

    Refused: other training or evaluation data, another number of processes (and, before anything loaded,
    settings an exact resume cannot take: `check_same_settings`).
    """
    path = latest_checkpoint(run.out)
    if path is None:
        expected = f"expected a step-N folder in {run.out}/checkpoints"
        raise LorakitError(f"{run.out}: no checkpoint to resume from ({expected})")
    ckpt = load_checkpoint(path)
    state = ckpt.state
    if state.world_size != run.world.size:  # the data position counts global batches; RNG states are per process
        raise LorakitError(
            f"{path}: saved by a run on {state.world_size} process(es), this run has {run.world.size}; "
            f"resume with --nproc {state.world_size}"
        )
    if state.data != run.encoded.fingerprint():
        raise LorakitError(f"{path}: the training data, tokenizer or --max-length differ from the run being resumed")
    if state.eval_data is not None and state.eval_data != (run.eval_encoded and run.eval_encoded.fingerprint()):
        raise LorakitError(f"{path}: the evaluation data differ from the run being resumed")
    apply_adapter(run.model, ckpt.adapter)
    load_optimizer(run.optimizer, ckpt.tensors, ckpt.adam_steps, path / "optimizer.safetensors", path / "state.json")
    set_rng_state(ckpt.tensors, run.world.rank, path / "optimizer.safetensors", run.device)
    if state.scaler and run.scaler.is_enabled():
        run.scaler.load_state_dict(state.scaler)
    if run.world.main:
        restore_best(run.out, path, state)
    run.console.print(f"resumed from {path} (step {state.step})")
    return state


def restore_best(out: Path, path: Path, state: RunState) -> None:
    """Put back `best/adapter.safetensors` as it was at the checkpoint's step: a killed run may have written a newer
    best after it, which the resumed run recomputes from there (the same, in an exact resume)."""
    best, copy = out / BEST, path / BEST_COPY
    if state.best_step is None:
        best.unlink(missing_ok=True)
    elif copy.is_file():
        saved = copy.read_bytes()
        if not best.is_file() or best.read_bytes() != saved:
            write_atomic(best, saved)


def stopped_before(cfg: TrainConfig, out: Path, world: World, console: Any, started: float) -> TrainResult | None:
    """The result of a `--resume` of a run that has stopped early and written its adapter: it is finished, so this
    says so and does nothing. None for any other run (one killed after it stopped and before its adapter was
    written resumes as usual and only finishes)."""
    path = latest_checkpoint(out)
    state = read_state(path) if path is not None else None
    adapter = out / "adapter.safetensors"
    if state is None or not state.stopped_early or not adapter.is_file():
        return None
    final = read_adapter(adapter)
    saved = read_adapter(path / "adapter.safetensors").tensors
    if final.tensors.keys() != saved.keys() or not all(torch.equal(t, saved[k]) for k, t in final.tensors.items()):
        return None
    console.print(
        f"{out}: the run stopped early at step {state.step}, {no_improvement(cfg, state)}; it is finished, "
        "nothing to do (start a new run with another --out to train further)"
    )
    return TrainResult(
        out=out,
        adapter=adapter,
        steps=state.step,
        trainable_params=sum(t.numel() for t in final.tensors.values()),
        frozen_params=0,
        adapter_bytes=adapter.stat().st_size,
        seconds=time.perf_counter() - started,
        tokens=0,
        train_loss=None,
        eval_loss=state.last_eval_loss,
        first_eval_loss=state.first_eval_loss,
        truncated=0,
        dropped=0,
        resumed_from=state.step,
        lora_changed=True,
        world_size=state.world_size,
        main=world.main,
        best_adapter=out / BEST if state.best_step is not None else None,
        best_metric=cfg.best_metric,
        best_step=state.best_step,
        best_value=state.best_value,
        stopped_early=True,
        nothing_done=True,
    )


def check_same_settings(cfg: TrainConfig, out: Path) -> list[str]:
    """Refuse to resume with settings that change the run (a changed --lr would mix two runs); returns the
    settings that differ and a resume may change (`RESUME_MAY_CHANGE`), as `name: saved -> new`, for config.yaml
    to record at the step they change (never as if they held from step 0)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return []  # a run folder of lorakit 0.1 before its first config.yaml: nothing to compare
    saved = build_config(read_run_config(saved_path), source=str(saved_path))
    changes = resume_changes(saved, cfg)
    if changes:
        raise LorakitError(
            f"{out}: --resume continues the run as it was configured, and these settings differ: "
            + "; ".join(changes)
            + "; start a new run (another --out) to change them"
        )
    return [
        f"{name}: {getattr(saved, name)!r} -> {getattr(cfg, name)!r}"
        for name in FIELDS
        if name in RESUME_MAY_CHANGE
        and name not in ("resume", "overwrite", "dry_run")  # what this invocation does, not settings of the run
        and getattr(saved, name) != getattr(cfg, name)
        and not (name == "out" and os.path.realpath(saved.out or "") == os.path.realpath(cfg.out or ""))
    ]


# ---------------------------------------------------------------------------------------------------------------
# The loop


def fit(run: Run, state: RunState) -> tuple[int, int | None]:
    """Train from `state` to the last step; returns the tokens this invocation saw and the step of the newest
    checkpoint (None if there is none)."""
    cfg = run.cfg
    base_eval_seconds = None
    if state.first_eval_loss is None and run.eval_encoded is not None:
        started = time.perf_counter()
        state.first_eval_loss = evaluate(run, state)  # the base model's loss: the "before" of before/after
        base_eval_seconds = time.perf_counter() - started
    stream = micro_batches(
        run.encoded, cfg.batch_size * run.world.size, cfg.seed, state.epoch, state.batch, cfg.group_by_length
    )
    saved_at = state.step if cfg.resume else None
    tokens_seen = 0
    left = evals_left(cfg, run.total_steps, run.eval_encoded is not None)
    start_cuda_peak(run.device)  # the training's peak, not the base evaluation's
    tracker = LossTracker(run.world, run.device)
    loss, tokens_per_s, interval_tokens, interval_seconds = math.nan, 0.0, 0, 0.0  # since the last log line
    with StopFlag() as stop, _progress(run.console, run.total_steps, state.step, left) as progress:
        run.progress = progress
        if base_eval_seconds is not None:
            progress.eval_seconds.append(base_eval_seconds)
        while state.step < run.total_steps and not state.stopped_early:
            t0 = time.perf_counter()
            lr = lr_at(state.step, run.total_steps, cfg.warmup_steps, cfg.lr, cfg.lr_scheduler)
            tokens = train_step(run, state, stream, lr, tracker)
            tokens_seen += tokens
            interval_tokens += tokens
            if state.step % cfg.log_every == 0 or state.step == run.total_steps:
                loss = checked_loss(run, tracker, saved_at)  # the loss is read here only (a host-device sync)
                # the steps' time since the last log line (evaluations excluded), up to the device's finishing them
                seconds = interval_seconds + time.perf_counter() - t0
                tokens_per_s = interval_tokens / max(seconds, 1e-9)
                interval_tokens, interval_seconds = 0, 0.0
                record = {"step": state.step, "epoch": round(state.epoch + state.batch / run.batches_per_epoch, 4)}
                record.update(loss=loss, lr=lr, tokens_per_s=round(tokens_per_s, 1))
                run.log.write({**record, **memory_record(run.device)})
            else:
                interval_seconds += time.perf_counter() - t0
            progress.update(state.step, loss, lr, tokens_per_s, time.perf_counter() - t0)  # as of the last log
            if run.world.distributed:  # every rank must stop at the same step
                stop.requested = all_sum(run.world, float(stop.requested))[0] > 0
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < run.total_steps:
                checked_loss(run, tracker, saved_at)
                evaluate(run, state)
            if (cfg.save_every and state.step % cfg.save_every == 0) or stop.requested:
                checked_loss(run, tracker, saved_at)  # a checkpoint never holds a diverged adapter
                saved_at = checkpoint(run, state)
            if stop.requested:
                by = "" if stop.signum == signal.SIGINT else f" ({signal.Signals(stop.signum).name})"
                path = checkpoint_path(run, saved_at)
                raise TrainingInterrupted(
                    f"interrupted at step {state.step}{by}; checkpoint saved in {path}; continue with --resume "
                    f"--out {run.out}",
                    path,
                    stop.signum,
                )
            if state.stopped_early:
                run.console.print(f"early stopping at step {state.step}: {no_improvement(cfg, state)}")
        checked_loss(run, tracker, saved_at)
        if run.eval_encoded is not None and state.last_eval_step != state.step:
            evaluate(run, state)  # the final evaluation, still under the display (its bar, the time left)
    run.progress = None
    return tokens_seen, saved_at


def checked_loss(run: Run, tracker: LossTracker, saved_at: int | None) -> float:
    """The last step's loss, read from the device; a non-finite loss at any step so far stops the run."""
    loss, first_bad, bad_loss = tracker.read()
    if first_bad:
        message = diverged_message(
            run.cfg, bad_loss, first_bad, checkpoint_path(run, saved_at), before_any_update=first_bad == 1
        )
        raise TrainingDiverged(message, checkpoint_path(run, saved_at))
    return loss


def no_improvement(cfg: TrainConfig, state: RunState) -> str:
    """Why early stopping stopped the run: `no improvement of loss over 3 evaluations (best 1.2345 at step 40)`."""
    by = f" by more than {cfg.early_stopping_threshold:g}" if cfg.early_stopping_threshold else ""
    best = f"best {state.best_value:.4f} at step {state.best_step}" if state.best_step is not None else "no best yet"
    return f"no improvement of {cfg.best_metric}{by} over {state.evals_without_improvement} evaluations ({best})"


def checkpoint_path(run: Run, step: int | None) -> Path | None:
    return None if step is None else run.out / "checkpoints" / f"step-{step:06d}"


def train_step(run: Run, state: RunState, stream: Iterator, lr: float, tracker: LossTracker) -> int:
    """One optimizer step over `grad_accum` micro-batches; its loss goes to `tracker` (on the device); returns the
    tokens of the step on all ranks.

    The step's loss, summed over its label tokens on all ranks together, is divided by the label tokens of an
    average step (`run.step_labels`), not by its own: with --group-by-length (data.batch_order) a batch of short
    examples holds several times fewer label tokens than a batch of long ones, and dividing by its own
    count would weigh a short example's tokens several times as much as a long one's. With the constant every label
    token of an epoch counts the same, as when batches are drawn at random, which is what the evaluation loss
    (a mean over all tokens) and TRL / transformers' Trainer with random batches optimize. Accumulation and the
    number of processes do not change it. Every rank draws the same global micro-batches, so the label and token
    counts of all ranks are known on each from the examples: no communication, no host-device synchronisation.
    The logged loss is still the step's own mean per label token.
    """
    cfg, world = run.cfg, run.world
    fail_point(f"step{state.step + 1}", world)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches, n_labels, tokens = [], 0, 0
    examples = run.encoded.examples
    for _ in range(cfg.grad_accum):
        state.epoch, state.batch, ids = next(stream)
        n_labels += sum(example_label_count(examples[i], cfg.task) for i in ids)
        tokens += sum(len(examples[i].input_ids) for i in ids)
        share, weight = rank_share(ids, world)
        batch = collate([examples[i] for i in share], run.pad_id, cfg.task)
        batches.append((with_label_index(batch, cfg.task), weight))
    step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, (batch, weight) in enumerate(batches):
        batch = to_device(batch, run.device)
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not world.distributed else run.step_module.no_sync()
        with sync:
            with run.autocast():
                loss_sum = run.step_module(batch) * weight
            # DDP averages gradients over ranks; scaling by the world size makes that a sum.
            run.scaler.scale(loss_sum * world.size / run.step_labels).backward()
        step_loss += loss_sum.detach()
    if cfg.max_grad_norm:  # None or 0: no clipping
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.scaler = run.scaler.state_dict() if run.scaler.is_enabled() else None
    tracker.add(state.step, step_loss, n_labels)
    return tokens


def diverged_message(
    cfg: TrainConfig, loss: float, step: int, last_checkpoint: Path | None, before_any_update: bool = False
) -> str:
    """One line; under fp16 it says the base overflows (certain before any update: LoRA's B is still zero, so the
    model is the frozen base) and names the precisions that have fp32's range."""
    where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
    hint = ""
    if cfg.precision == "fp16" and before_any_update:
        hint = "; the frozen base overflows fp16 (--precision fp16) before any update: use --precision bf16 or fp32"
    elif cfg.precision == "fp16":
        hint = "; the base may overflow fp16 (--precision fp16): try --precision bf16 or fp32"
    return f"loss became {loss} at step {step}; training stopped{where}{hint}"


def micro_batches(
    encoded: Encoded, batch_size: int, seed: int, epoch: int, index: int, group_by_length: bool = False
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, index of the next batch, example indices) forever, from a position; each epoch reshuffled by seed.

    In a distributed run `batch_size` is the global micro-batch (per-device batch x world size) and every rank
    draws the same batches, then keeps its own share: the run sees what one process with that batch would see.
    """
    lengths = [len(e.input_ids) for e in encoded.examples]
    while True:
        order = batch_order(lengths, batch_size, seed, epoch, group_by_length)
        for i in range(index, len(order)):
            yield epoch, i + 1, order[i]
        epoch, index = epoch + 1, 0


def rank_share(ids: list[int], world: World) -> tuple[list[int], float]:
    """This rank's examples of a global micro-batch, and the weight of its loss (0 for a stand-in example).

    A rank whose share is empty (a short last batch) still has to run forward and backward with the others:
    it takes the batch's first example and multiplies its loss by 0.
    """
    share = ids[world.rank :: world.size]
    return (share, 1.0) if share else (ids[:1], 0.0)


def evaluate(run: Run, state: RunState) -> float | None:
    """Loss on the evaluation data at this step (each rank scores its share; the sums are combined), with
    `eval_generate` the text metrics of generations, logged; after step 0 the best adapter and early stopping
    follow it (`track_best`)."""
    if run.eval_encoded is None:
        return None
    world = run.world
    # With --fsdp every rank runs every forward: all rows on each (the token-weighted mean is the same).
    shard = run.eval_encoded.examples if run.cfg.fsdp else run.eval_encoded.examples[world.rank :: world.size]
    batches = math.ceil(len(shard) / run.cfg.batch_size)
    batches = min(batches, run.cfg.eval_batches) if run.cfg.eval_batches else batches
    with _pass_bar(run, "eval", batches) as advance:
        result = dataset_loss(
            run.model, shard, run.cfg.batch_size, run.pad_id, run.cfg.task, run.cfg.eval_batches, run.autocast, advance
        )
    total_loss, count = all_sum(world, result.loss * result.tokens, result.tokens)
    loss = total_loss / max(count, 1)
    record: dict[str, Any] = {"step": state.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))}
    scores: dict[str, float | None] = {"loss": loss}
    if run.eval_prompts is not None:
        scores.update(generated_scores(run))
        record.update({f"eval_{name}": value for name, value in scores.items() if name != "loss"})
    state.last_eval_step, state.last_eval_loss = state.step, loss
    if state.step > 0 and track_best(run, state, scores[run.cfg.best_metric]):  # the base (step 0) is no candidate
        record["best"] = True
    run.log.write(record)
    return loss


@contextlib.contextmanager
def _pass_bar(run: Run, what: str, total: int) -> Iterator[Callable[[], None] | None]:
    """The bar of an evaluation pass while the progress display runs (none for the base's evaluation before it)."""
    if run.progress is None:
        yield None
        return
    with run.progress.pass_bar(what, total, timed=what == "eval") as advance:
        yield advance


def generated_scores(run: Run) -> dict[str, float | None]:
    """Text metrics of greedy generations for the evaluation prompts (rank 0 generates; every rank gets the scores).

    None for a metric that cannot run here (a note says why, once); for `best_metric` that is an error.
    """
    cfg, world = run.cfg, run.world
    best = [] if cfg.best_metric in LOWER_IS_BETTER else [cfg.best_metric]
    names = list(dict.fromkeys([*TEXT_METRICS_LOGGED, *best]))
    values = [0.0] * len(names)
    reasons: dict[str, str] = {}
    if world.main:
        prompts = run.eval_prompts or []
        cuda = [run.device.index or 0] if run.device.type == "cuda" else []
        with warnings.catch_warnings(record=True) as caught, torch.random.fork_rng(devices=cuda):
            warnings.simplefilter("always", MetricWarning)
            try:
                with run.autocast():
                    options = run.generate_options
                    with _pass_bar(run, "generate", math.ceil(len(prompts) / options.batch_size)) as advance:
                        texts = generate(run.model, run.tokenizer, [g.prompt_ids for g in prompts], options, advance)
            finally:
                run.model.train()
            scores = text_metrics(texts, [g.references for g in prompts], names)
        for w in caught:
            message = str(w.message)
            if not issubclass(w.category, MetricWarning):  # anything else: as if it had not been caught here
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                continue
            reasons[message.split(" ", 1)[0]] = message
            if message not in run.notes:
                run.notes.add(message)
                run.console.print(f"note: {message}", markup=False)
        values = [math.nan if scores[name] is None else float(scores[name]) for name in names]
    values = all_sum(world, *values)
    found = {name: None if math.isnan(v) else v for name, v in zip(names, values)}
    if best and found[best[0]] is None:
        why = reasons.get(best[0], f"{best[0]} unavailable")
        raise LorakitError(f"--best-metric {best[0]}: cannot be computed here ({why}); choose another --best-metric")
    return found


def track_best(run: Run, state: RunState, value: float | None) -> bool:
    """Compare this evaluation's `best_metric` with the best so far: a better value (lower loss, higher text metric)
    is the new best and its adapter is saved; an improvement by more than `early_stopping_threshold` resets the
    count of evaluations without one, which stops the run at `early_stopping_patience`. Returns: a new best."""
    cfg = run.cfg
    if value is None or not math.isfinite(value):
        gain = None  # a NaN or infinite value never improves
    elif state.best_value is None:
        gain = math.inf
    else:
        gain = state.best_value - value if cfg.best_metric in LOWER_IS_BETTER else value - state.best_value
    improved = gain is not None and gain > 0
    counted = gain is not None and gain > cfg.early_stopping_threshold
    state.evals_without_improvement = 0 if counted else state.evals_without_improvement + 1
    if improved:
        state.best_step, state.best_value = state.step, value
        save_best(run, state)
    patience = cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience and state.step < run.total_steps:
        state.stopped_early = True
    return improved


def save_best(run: Run, state: RunState) -> None:
    """best/adapter.safetensors (atomically): the adapter now, with its step and value in the metadata."""
    if not run.world.main:
        return
    from rich.markup import escape

    path = run.out / BEST
    extra = {
        **adapter_extra(run.cfg),
        "best_step": str(state.best_step),
        "best_metric": run.cfg.best_metric,
        "best_value": repr(state.best_value),
    }
    save_adapter(run.model, path, base_model=run.base_model, extra=extra)
    run.console.print(
        f"best {run.cfg.best_metric} {state.best_value:.4f} at step {state.step}: saved {escape(str(path))}"
    )


def adapter_extra(cfg: TrainConfig) -> dict[str, str]:
    """Metadata of the run's adapter files beyond what every adapter records."""
    return {"train_config": json.dumps(asdict(cfg))}


def checkpoint(run: Run, state: RunState) -> int:
    """Save a checkpoint of `state` (rank 0 writes; every rank's RNG state goes in); returns its step."""
    rng = gather_objects(run.world, rng_state(run.device))
    if run.world.main:
        keep = run.cfg.save_total_limit
        best_file = run.out / BEST
        best = best_file.read_bytes() if state.best_step is not None and best_file.is_file() else None
        save_checkpoint(
            run.out, run.model, run.optimizer, state, base_model=run.base_model, rng=rng, keep=keep, best=best
        )
    barrier(run.world)
    return state.step


def finish(
    run: Run, state: RunState, started: float, tokens: int, resumed_from: int | None, saved_at: int | None
) -> TrainResult:
    """The last evaluation and checkpoint (unless this step has them), the adapter and loss.png.

    A run killed after its last checkpoint resumes straight here and writes the same files and metrics lines.
    """
    if run.eval_encoded is not None and state.last_eval_step != state.step:
        evaluate(run, state)
    if saved_at != state.step:
        checkpoint(run, state)
    adapter = run.out / "adapter.safetensors"
    if run.world.main:
        save_adapter(run.model, adapter, base_model=run.base_model, extra=adapter_extra(run.cfg))
        plot_losses(run.log.records, run.out / "loss.png")
        if state.best_step is not None:
            metric = f"eval {run.cfg.best_metric}"
            note_in_config(run.out, f"best adapter: {BEST}, step {state.best_step}, {metric} {state.best_value:.6g}")
    barrier(run.world)
    changed = any(bool(b.detach().abs().sum() > 0) for _, layer in lora_layers(run.model) for b in layer.lora_B)
    if not changed:
        run.console.print(
            "[bold red]warning: the LoRA B matrices are still all zero: training changed nothing "
            "(learning rate 0, no steps, or no label tokens?)[/]"
        )
    train_losses = [r["loss"] for r in run.log.records if "loss" in r]
    trainable = sum(p.numel() for p in run.params)
    return TrainResult(
        out=run.out,
        adapter=adapter,
        steps=state.step,
        trainable_params=trainable,
        frozen_params=sum(p.numel() for p in run.model.parameters()) - trainable,
        adapter_bytes=adapter.stat().st_size if run.world.main else 0,
        seconds=time.perf_counter() - started,
        tokens=tokens,
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=state.last_eval_loss,
        first_eval_loss=state.first_eval_loss,
        truncated=run.encoded.truncated,
        dropped=run.encoded.dropped,
        resumed_from=resumed_from,
        lora_changed=changed,
        peak_memory_mb=peak_memory_mb(run.device),
        peak_reserved_mb=peak_memory(run.device).get("peak_reserved_mb"),
        world_size=run.world.size,
        main=run.world.main,
        best_adapter=run.out / BEST if state.best_step is not None else None,
        best_metric=run.cfg.best_metric,
        best_step=state.best_step,
        best_value=state.best_value,
        stopped_early=state.stopped_early,
        planned_steps=run.total_steps,
    )


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated on the device since training started; CPU: the process's peak resident set size."""
    return peak_memory(device)["peak_memory_mb"]


class StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and checkpoint; a second
    Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _Progress:
    """A rich progress bar: step, loss, learning rate, tokens/s and the time left for the whole run: the steps left
    at this invocation's mean step time plus the evaluations left at its mean evaluation time. An evaluation or
    generation pass shows a bar of its own while it runs."""

    def __init__(self, console: Any, total: int, start: int, evals_left: Callable[[int], int]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.total = total
        self.evals_left = evals_left
        self.step_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.task = self.progress.add_task("step", total=total, completed=start, info="loss -  lr -  - tok/s")

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, seconds: float) -> None:
        self.step_seconds.append(seconds)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  left {_clock(self.seconds_left(step))}"
        self.progress.update(self.task, completed=step, info=info)

    def seconds_left(self, step: int) -> float:
        """Steps and evaluations still to come, each at the mean time this invocation measured for it."""
        per_step = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.0
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0
        return (self.total - step) * per_step + self.evals_left(step) * per_eval

    @contextlib.contextmanager
    def pass_bar(self, what: str, total: int, timed: bool = True) -> Iterator[Callable[[], None]]:
        """A bar of its own for an evaluation or generation pass of `total` batches; yields its advance."""
        started = time.perf_counter()
        task = self.progress.add_task(what, total=total, info="")
        try:
            yield lambda: self.progress.advance(task)
        finally:
            self.progress.remove_task(task)
            if timed:
                self.eval_seconds.append(time.perf_counter() - started)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def evals_left(cfg: TrainConfig, total: int, evaluates: bool) -> Callable[[int], int]:
    """The number of evaluations after step `step`: every `eval_every` steps before the last, then the final one."""

    def left(step: int) -> int:
        if not evaluates or step >= total:
            return 0
        periodic = (total - 1) // cfg.eval_every - step // cfg.eval_every if cfg.eval_every else 0
        return periodic + 1

    return left


@contextlib.contextmanager
def _progress(console: Any, total: int, start: int, left: Callable[[int], int]) -> Iterator[_Progress]:
    bar = _Progress(console, total, start, left)
    with bar.progress:
        yield bar
