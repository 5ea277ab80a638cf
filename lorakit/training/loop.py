"""`lorakit train`: one readable training loop, `train(config) -> TrainResult`.

Order of work: run folder checked, data (read and checked before any model loads), tokenizer, model, LoRA
layers, optimizer; only then is the run folder written (emptied first with --overwrite); optional resume, then
the loop: micro-batches -> loss summed over label tokens / tokens in the step -> backward -> (clip) -> AdamW
step at lr_at(step) -> log, evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..evaluation.evaluate import dataset_loss, label_count, to_device
from ..files import write_atomic
from ..lora.adapter import apply_adapter, save_adapter
from ..lora.wrap import add_lora, lora_layers
from ..models import PACKAGED, cache_dir, load_base, load_tokenizer
from .checkpoint import latest_checkpoint, load_checkpoint, load_optimizer, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, to_yaml
from .data import DataSpec, Encoded, batch_order, collate, encode, read_rows
from .distributed import World, all_sum, barrier, device_for, gather_objects, init_world
from .loss import batch_loss


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
    world_size: int = 1
    main: bool = True
    """False on the ranks other than 0 of a distributed run (they print and write nothing)."""


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `peak`, then linear decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def check_run_dir(cfg: TrainConfig) -> Path:
    """The run folder, checked but not touched: an existing non-empty one only with --resume or --overwrite."""
    out = Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    busy = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{out}: exists and is not a folder")
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise LorakitError(f"{out}: no checkpoint to resume from (expected {out}/checkpoints/latest)")
    elif busy and not cfg.overwrite:
        raise LorakitError(f"{out}: run folder exists and is not empty; pass --resume to continue it or --overwrite")
    return out


def start_run_dir(out: Path, cfg: TrainConfig) -> None:
    """Create the run folder (emptied with --overwrite); called once data and model have loaded without error."""
    if cfg.overwrite and not cfg.resume and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def with_demo_data(cfg: TrainConfig) -> TrainConfig:
    """No --data: the generated demo set (and its eval split), written once to the cache."""
    if cfg.data is not None:
        return cfg
    from ..demo import write_demo_data

    train_path, eval_path = write_demo_data(cache_dir() / "demo")
    cfg.data = str(train_path)
    if cfg.eval_data is None:
        cfg.eval_data = str(eval_path)
    return cfg


def data_spec(cfg: TrainConfig, source: str, split: str, limit: int | None) -> DataSpec:
    return DataSpec(
        source=source,
        split=split,
        hub_config=cfg.data_config,
        text_field=cfg.text_field,
        prompt_field=cfg.prompt_field,
        completion_field=cfg.completion_field,
        messages_field=cfg.messages_field,
        label_field=cfg.label_field,
        prompt_template=cfg.prompt_template,
        completion_template=cfg.completion_template,
        limit=limit,
    )


def pad_id_of(tokenizer: Any) -> int:
    """Any valid id works: padding is masked by position, never by token id."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def autocast_for(precision: str, device: torch.device) -> Any:
    """A context-manager factory for the compute precision (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def base_dropout_off(model: nn.Module) -> None:
    """Silence the base model's own dropout (the paper's GPT-2 has none); LoRA dropout is untouched."""
    lora_dropouts = {id(layer.dropout) for _, layer in lora_layers(model)}
    for module in model.modules():
        if isinstance(module, nn.Dropout) and id(module) not in lora_dropouts:
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_p"):  # attention code that reads a float, not a module
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def micro_batches(
    encoded: Encoded, batch_size: int, seed: int, epoch: int, index: int
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, index of the next batch, example indices) forever, from a position; each epoch reshuffled by seed.

    In a distributed run `batch_size` is the global micro-batch (per-device batch x world size) and every rank
    draws the same batches, then keeps its own share: the run sees what one process with that batch would see.
    """
    lengths = [len(e.input_ids) for e in encoded.examples]
    while True:
        order = batch_order(lengths, batch_size, seed, epoch)
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


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated on the device; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LossStep(nn.Module):
    """The model's summed loss as a module, so that DDP's forward (and gradient sync) sees every step."""

    def __init__(self, model: nn.Module, task: str, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_sum, _ = batch_loss(self.model, batch, self.task, self.label_smoothing)
        return loss_sum


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and checkpoint); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training loss per step and evaluation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig, console: Any = None) -> TrainResult:
    """Fine-tune LoRA adapters as `cfg` says; writes the run folder and returns what happened.

    Raises:
        LorakitError: bad input (before anything loads), a non-finite loss (exit code 1, the last good
            checkpoint kept), or Ctrl-C (a checkpoint is saved first; exit code 130).
    """
    from rich.console import Console

    world = init_world()
    if not world.main:
        console = Console(stderr=True, quiet=True)  # rank 0 alone prints and writes
    console = console or Console(stderr=True)
    started = time.perf_counter()
    cfg = with_demo_data(cfg)
    out = check_run_dir(cfg)

    # Data: read and checked before the model loads.
    rows = read_rows(data_spec(cfg, cfg.data, cfg.split, cfg.limit), task=cfg.task)
    eval_rows = None
    if cfg.eval_data:
        eval_spec = data_spec(cfg, cfg.eval_data, cfg.eval_split, cfg.eval_limit)
        eval_rows = read_rows(eval_spec, task=cfg.task, label_names=rows.label_names)  # the training label ids
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if tokenizer is None:
        raise LorakitError(f"{cfg.model or PACKAGED}: no tokenizer found with the model")
    spec = data_spec(cfg, cfg.data, cfg.split, cfg.limit)
    encoded = encode(rows, tokenizer, cfg.max_length, spec)
    eval_encoded = encode(eval_rows, tokenizer, cfg.max_length, spec) if eval_rows is not None else None
    pad_id = pad_id_of(tokenizer)
    console.print(
        f"data: {len(encoded.examples)} examples ({rows.format}) from {cfg.data}"
        + (f"; {encoded.truncated} truncated to {cfg.max_length} tokens" if encoded.truncated else "")
        + (f"; {encoded.dropped} dropped (nothing left to learn after truncation)" if encoded.dropped else "")
    )

    # Model and LoRA layers.
    num_labels = cfg.num_labels
    if cfg.task == "classification" and num_labels is None:
        num_labels = rows.num_labels  # from the label ids or names; a class with no row still counts
    elif cfg.task == "classification" and num_labels < rows.num_labels:
        raise LorakitError(f"--num-labels {num_labels}: {cfg.data} has {rows.num_labels} classes")
    device = device_for(world)
    torch.manual_seed(cfg.seed)  # a new head's and A's initialization (the same on every rank)
    model = load_base(  # the frozen base in the compute precision (or 8 bits); LoRA parameters stay fp32
        cfg.model,
        dtype=cfg.precision,
        task=cfg.task,
        trust_remote_code=cfg.trust_remote_code,
        num_labels=num_labels,
        load_in_8bit=cfg.load_in_8bit,
        device=device,
    )
    add_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, layers=cfg.layers)
    if cfg.task == "classification":
        # The new head is trained in full next to LoRA (as in the paper's GLUE runs) and saved in the adapter.
        new = set(getattr(model, "lorakit_new_params", []))
        for name, param in model.named_parameters():
            if name in new:
                param.requires_grad_(True)
    if not cfg.load_in_8bit:  # an 8-bit model is placed on its device when it loads and cannot move
        model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if not cfg.base_dropout:
        base_dropout_off(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = autocast_for(cfg.precision, device)
    step_module: nn.Module = LossStep(model, cfg.task, cfg.label_smoothing)
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Only parameters that require gradients (the LoRA A/B, a new head) are synchronized.
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(cfg.seed + world.rank)  # LoRA dropout masks differ between ranks

    global_batch = cfg.batch_size * world.size
    batches_per_epoch = math.ceil(len(encoded.examples) / global_batch)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    console.print(
        f"model: {cfg.model or PACKAGED}; LoRA r={cfg.rank} alpha={cfg.alpha:g} on {cfg.targets}: "
        f"{trainable:,} trainable of {trainable + frozen:,} parameters; {total} steps; effective batch "
        f"{cfg.batch_size} x {world.size} process(es) x {cfg.grad_accum} accumulation = "
        f"{cfg.batch_size * world.size * cfg.grad_accum} on {device.type}"
        + (" (8-bit base)" if cfg.load_in_8bit else "")
    )

    # Resume: adapter, optimizer, RNG and data position from the latest checkpoint.
    if world.main:
        start_run_dir(out, cfg)
    barrier(world)
    step, epoch, index, resumed_from, first_eval = 0, 0, 0, None, None
    checkpoint_path = latest_checkpoint(out) if cfg.resume else None
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        saved_world = int(ckpt.state.get("world_size", 1))
        if saved_world != world.size:  # the data position counts global batches; RNG states are per process
            raise LorakitError(
                f"{checkpoint_path}: saved by a run on {saved_world} process(es), this run has {world.size}; "
                f"resume with --nproc {saved_world}"
            )
        apply_adapter(model, ckpt.adapter)
        load_optimizer(optimizer, ckpt.optimizer, ckpt.state["adam_steps"])
        set_rng_state(ckpt.optimizer, world.rank)
        scaler_state = ckpt.state.get("scaler")
        if scaler_state:
            scaler.load_state_dict(scaler_state)
        if ckpt.state.get("data") != encoded.fingerprint():
            raise LorakitError(
                f"{checkpoint_path}: the training data, tokenizer or --max-length differ from the run being resumed"
            )
        step, epoch, index = ckpt.step, ckpt.state["epoch"], ckpt.state["batch"]
        first_eval = ckpt.state.get("first_eval_loss")
        resumed_from = step
        console.print(f"resumed from {checkpoint_path} (step {step})")
    # resume/overwrite act on this invocation; saved as false, config.yaml reused as a recipe never deletes a run.
    # nproc is the run's own (the launcher strips --nproc from the workers' command line): a plain `--resume`
    # re-launches as many processes.
    if world.main:
        nproc = world.local_size if world.distributed else cfg.nproc
        write_atomic(out / "config.yaml", to_yaml(replace(cfg, resume=False, overwrite=False, nproc=nproc)))
    log = MetricsLog(out / "metrics.jsonl", resumed_from, enabled=world.main)

    def evaluate_now() -> float | None:
        if eval_encoded is None:
            return None
        shard = eval_encoded.examples[world.rank :: world.size]  # each rank scores its share; sums are combined
        result = dataset_loss(model, shard, cfg.batch_size, pad_id, cfg.task, cfg.eval_batches, autocast)
        total_loss, count = all_sum(world, result.loss * result.tokens, result.tokens)
        loss = total_loss / max(count, 1)
        log.write({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))})
        return loss

    def checkpoint() -> Path:
        state = {"epoch": epoch, "batch": index, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        state.update(first_eval_loss=first_eval, data=encoded.fingerprint(), world_size=world.size)
        rng = gather_objects(world, rng_state())  # every rank's generators, for an exact resume
        path = out / "checkpoints" / f"step-{step:06d}"
        if world.main:
            path = save_checkpoint(out, step, model, optimizer, state, base_model=cfg.model or PACKAGED, rng=rng)
        barrier(world)
        return path

    if first_eval is None and eval_encoded is not None:
        first_eval = evaluate_now()  # the base model's loss: the "before" of before/after
    stream = micro_batches(encoded, global_batch, cfg.seed, epoch, index)
    last_loss, eval_loss, tokens_seen, last_checkpoint = None, None, 0, checkpoint_path
    with StopFlag() as stop, _progress(console, total, step) as progress:
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(step, total, cfg.warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for _ in range(cfg.grad_accum):
                epoch, index, ids = next(stream)
                share, weight = rank_share(ids, world)
                batches.append((collate([encoded.examples[i] for i in share], pad_id, cfg.task), weight))
            # Normalize by the label tokens of the whole step, on all ranks together.
            (n_labels,) = all_sum(world, sum(label_count(b, cfg.task) * w for b, w in batches))
            step_loss, step_tokens = 0.0, 0
            for i, (batch, weight) in enumerate(batches):
                batch = to_device(batch, device)
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last or not world.distributed else step_module.no_sync()
                with sync:
                    with autocast():
                        loss_sum = step_module(batch) * weight
                    # DDP averages gradients over ranks; scaling by the world size makes that a sum.
                    scaler.scale(loss_sum * world.size / max(n_labels, 1)).backward()
                step_loss += float(loss_sum.detach())
                step_tokens += int(batch["attention_mask"].sum()) if weight else 0
            step_loss, step_tokens = all_sum(world, step_loss, step_tokens)
            loss_value = step_loss / max(n_labels, 1)
            if not math.isfinite(loss_value):
                where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise LorakitError(f"loss became {loss_value} at step {step + 1}; training stopped{where}", exit_code=1)
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_value
            tokens_seen += step_tokens
            seconds = time.perf_counter() - t0
            tokens_per_s = step_tokens / seconds if seconds > 0 else 0.0
            if step % cfg.log_every == 0 or step == total:
                log.write(
                    {
                        "step": step,
                        "epoch": round(epoch + index / batches_per_epoch, 4),
                        "loss": loss_value,
                        "lr": lr,
                        "tokens_per_s": round(tokens_per_s, 1),
                        "peak_memory_mb": round(peak_memory_mb(device), 1),
                    }
                )
            progress.update(step, loss_value, lr, tokens_per_s)
            if world.distributed:  # every rank must stop at the same step
                stop.requested = all_sum(world, float(stop.requested))[0] > 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                eval_loss = evaluate_now()
            if (cfg.save_every and step % cfg.save_every == 0) or stop.requested:
                last_checkpoint = checkpoint()
            if stop.requested:
                raise LorakitError(
                    f"interrupted at step {step}; checkpoint saved in {last_checkpoint}; continue with --resume "
                    f"--out {out}",
                    exit_code=130,
                )
    if eval_encoded is not None:
        eval_loss = evaluate_now()
    if last_checkpoint is None or last_checkpoint.name != f"step-{step:06d}":
        last_checkpoint = checkpoint()
    adapter = out / "adapter.safetensors"
    if world.main:
        save_adapter(model, adapter, base_model=cfg.model or PACKAGED, extra={"train_config": json.dumps(asdict(cfg))})
        plot_losses(log.records, out / "loss.png")
    barrier(world)
    changed = any(bool(b.detach().abs().sum() > 0) for _, layer in lora_layers(model) for b in layer.lora_B)
    if not changed:
        console.print(
            "[bold red]warning: the LoRA B matrices are still all zero: training changed nothing "
            "(learning rate 0, no steps, or no label tokens?)[/]"
        )
    return TrainResult(
        out=out,
        adapter=adapter,
        steps=step,
        trainable_params=trainable,
        frozen_params=frozen,
        adapter_bytes=adapter.stat().st_size if world.main else 0,
        seconds=time.perf_counter() - started,
        tokens=tokens_seen,
        train_loss=last_loss,
        eval_loss=eval_loss,
        first_eval_loss=first_eval,
        truncated=encoded.truncated,
        dropped=encoded.dropped,
        resumed_from=resumed_from,
        lora_changed=changed,
        peak_memory_mb=peak_memory_mb(device),
        world_size=world.size,
        main=world.main,
    )


class _Progress:
    """A rich progress bar: step, loss, learning rate, tokens/s and time left."""

    def __init__(self, console: Any, total: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tokens_per_s:,.0f}")


@contextlib.contextmanager
def _progress(console: Any, total: int, start: int) -> Iterator[_Progress]:
    bar = _Progress(console, total, start)
    with bar.progress:
        yield bar
