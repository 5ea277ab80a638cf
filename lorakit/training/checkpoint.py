"""Training checkpoints: what `--resume` needs to continue a run exactly, with no pickle anywhere.

`<run>/checkpoints/step-000120/` holds
- `adapter.safetensors`: the adapter at that step (a normal adapter file);
- `optimizer.safetensors`: AdamW moments per trainable parameter, and the RNG states as uint8 tensors;
- `state.json`: the `RunState` (step, data position, first and last evaluation, ...) and AdamW's step counts.

A step folder is written under a temporary name, flushed to disk and renamed: its presence means it is complete.
`--resume` continues from the newest step folder; `checkpoints/latest` names it too (for people and older
versions) but never decides. Older folders are removed once a newer one is complete: the newest `--save-total-limit`
(default `KEEP`) are kept, by step number.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError
from ..files import atomic_dir, write_atomic
from ..lora.adapter import Adapter, read_adapter, save_adapter
from .config import TrainConfig

KEEP = TrainConfig.save_total_limit  # checkpoints kept by default; older ones go once a newer one is complete
FILES = ("adapter.safetensors", "optimizer.safetensors", "state.json")
BEST_COPY = "best-adapter.safetensors"
"""A checkpoint of a run with a best adapter also holds a copy of it: a resume puts back `best/` as it was at
that step (a killed run may have written a newer best that the resumed run recomputes, or not)."""
_STEP_FOLDER = re.compile(r"step-(\d+)")


def crash_point(name: str) -> None:
    """A named point of the checkpoint write; tests replace this to kill the process exactly there."""


@dataclass
class RunState:
    """What changes while a run trains; a checkpoint's `state.json` is exactly this (plus AdamW's step counts)."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batch: int = 0
    """Index of the next global micro-batch within that epoch."""
    first_eval_loss: float | None = None
    """Evaluation loss of the base, before the first step."""
    last_eval_step: int | None = None
    last_eval_loss: float | None = None
    data: str = ""
    """Fingerprint of the encoded training examples (a resumed run must see the same)."""
    eval_data: str | None = None
    """Fingerprint of the encoded evaluation examples."""
    world_size: int = 1
    """Processes of the run (the data position counts global batches; RNG states are per process)."""
    scaler: dict[str, Any] | None = None
    """fp16 gradient scaler state."""
    best_step: int | None = None
    """Step of the best evaluation so far (the one `best/adapter.safetensors` holds); None before the first."""
    best_value: float | None = None
    """Its value of the run's `best_metric`."""
    evals_without_improvement: int = 0
    """Evaluations since the best improved by more than `early_stopping_threshold`."""
    stopped_early: bool = False
    """The run stopped here by early stopping: it is finished."""

    @classmethod
    def from_json(cls, value: Any, where: Path) -> RunState:
        """The state saved in `where`, every field checked."""
        if not isinstance(value, dict):
            raise LorakitError(f"{where}: expected a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in value.items() if k in known}
        values.setdefault("world_size", 1)  # checkpoints of single-process runs of lorakit 0.1
        values.setdefault("evals_without_improvement", 0)  # checkpoints of lorakit before best adapters
        for name, low in (("step", 0), ("epoch", 0), ("batch", 0), ("world_size", 1), ("evals_without_improvement", 0)):
            if name not in values:
                raise LorakitError(f"{where}: no {name!r}; the checkpoint is damaged")
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise LorakitError(f"{where}: {name} is {v!r}, expected a whole number of at least {low}")
        for name in ("first_eval_loss", "last_eval_loss", "best_value"):
            v = values.get(name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise LorakitError(f"{where}: {name} is {v!r}, expected a finite number or null")
        for name in ("last_eval_step", "best_step"):
            v = values.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise LorakitError(f"{where}: {name} is {v!r}, expected a whole number or null")
        if (values.get("best_step") is None) != (values.get("best_value") is None):
            raise LorakitError(f"{where}: best_step and best_value are set together; the checkpoint is damaged")
        if not isinstance(values.get("stopped_early", False), bool):
            raise LorakitError(f"{where}: stopped_early is {values['stopped_early']!r}, expected true or false")
        for name, allowed in (("data", (str,)), ("eval_data", (str, type(None))), ("scaler", (dict, type(None)))):
            if name in values and not isinstance(values[name], allowed):
                raise LorakitError(f"{where}: {name} is {values[name]!r}, which is not what lorakit writes there")
        return cls(**values)


@dataclass
class Checkpoint:
    """A checkpoint read back from disk and checked."""

    path: Path
    state: RunState
    adam_steps: dict[str, float]
    adapter: Adapter
    tensors: dict[str, torch.Tensor]
    """Optimizer moments (`exp_avg.<i>`, `exp_avg_sq.<i>`) and RNG states (`[rank<r>.]rng.*`)."""


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The CPU's torch RNG state and, on a CUDA run, the state of this process's own GPU (`device`; default: the
    current CUDA device), as uint8 tensors. One GPU's state per process: a resume on a machine that shows another
    number of GPUs restores it on the GPU that process then has."""
    states = {"rng.cpu": torch.get_rng_state()}
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_state(
    tensors: dict[str, torch.Tensor],
    rank: int = 0,
    where: Path | str = "checkpoint",
    device: torch.device | None = None,
) -> None:
    """Restore the generators saved for `rank` (`rank{r}.rng.*`; single-process checkpoints: `rng.*`): the CPU's, and
    the saved GPU state on this process's GPU (`device`; default: the current CUDA device). Checkpoints of lorakit
    0.1 hold every visible GPU's state (`rng.cuda.N`): the one of this process's GPU index is restored."""
    prefix = f"rank{rank}." if f"rank{rank}.rng.cpu" in tensors else ""
    if f"{prefix}rng.cpu" not in tensors:
        raise LorakitError(f"{where}: no RNG state for rank {rank}; resume with the same number of processes")
    cpu = tensors[f"{prefix}rng.cpu"]
    expected = torch.get_rng_state()
    if cpu.dtype != torch.uint8 or cpu.shape != expected.shape:
        raise LorakitError(
            f"{where}: the CPU RNG state is {cpu.dtype} {tuple(cpu.shape)}, expected uint8 {tuple(expected.shape)}"
        )
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        torch.set_rng_state(cpu)
        if device is not None and device.type == "cuda":
            gpu = tensors.get(f"{prefix}rng.cuda", tensors.get(f"{prefix}rng.cuda.{device.index or 0}"))
            if gpu is not None:
                torch.cuda.set_rng_state(gpu, device)
    except (RuntimeError, ValueError) as e:
        raise LorakitError(f"{where}: cannot restore the RNG state ({e})") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """AdamW moments by parameter index, and the per-parameter step counts."""
    tensors, steps = {}, {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = optimizer.state.get(p)
        if not state:
            continue
        tensors[f"exp_avg.{i}"] = state["exp_avg"].detach().cpu().contiguous()
        tensors[f"exp_avg_sq.{i}"] = state["exp_avg_sq"].detach().cpu().contiguous()
        steps[str(i)] = float(state["step"])
    return tensors, steps


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    steps: Any,
    where: Path | str = "checkpoint",
    steps_where: Path | str | None = None,
) -> None:
    """Give AdamW back its moments and step counts, each checked against the parameter it belongs to.

    `where` names the file of the moments (`optimizer.safetensors`), `steps_where` that of the step counts
    (`state.json`; default: `where`).
    """
    steps_where = steps_where or where
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(steps, dict):
        raise LorakitError(f"{steps_where}: adam_steps is {steps!r}, expected an object")
    moments_of = {k.split(".", 1)[1] for k in tensors if k.startswith(("exp_avg.", "exp_avg_sq."))}
    if moments_of != set(steps):  # written together: a parameter with moments and no step count is damage
        raise LorakitError(
            f"{steps_where}: AdamW step counts for {len(steps)} parameter(s), but {where} holds moments for "
            f"{len(moments_of)}; the checkpoint is damaged"
        )
    restored = {}
    for key, step in steps.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(params)):
            raise LorakitError(f"{steps_where}: optimizer state names parameter {key!r}; the model has {len(params)}")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step < 2**53:
            raise LorakitError(f"{steps_where}: AdamW step count {step!r} for parameter {key}")
        p = params[int(key)]
        moments = {}
        for name in ("exp_avg", "exp_avg_sq"):
            t = tensors.get(f"{name}.{key}")
            if t is None or t.shape != p.shape or not torch.is_floating_point(t):
                found = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise LorakitError(f"{where}: {name} of parameter {key} is {found}, expected {tuple(p.shape)}")
            moments[name] = t.to(p.device, p.dtype)
        restored[p] = {"step": torch.tensor(float(step)), **moments}
    optimizer.state.update(restored)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    base_model: str | None = None,
    rng: list[dict[str, torch.Tensor]] | None = None,
    keep: int = KEEP,
    best: bytes | None = None,
) -> Path:
    """Write a complete checkpoint of `state.step`, then point `latest` at it and prune old ones: the newest `keep`
    step folders (by step number, this one included) stay.

    `rng` holds every rank's generator states in a distributed run (default: this process's); `best` the bytes of
    the run's best adapter file, kept as `BEST_COPY`.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    target = root / f"step-{state.step:06d}"
    tensors, steps = optimizer_tensors(optimizer)
    if rng is None or len(rng) == 1:
        tensors.update(rng[0] if rng else rng_state())
    else:
        for r, states in enumerate(rng):
            tensors.update({f"rank{r}.{k}": v for k, v in states.items()})
    with atomic_dir(target, overwrite=True) as tmp:  # flushed to disk, then renamed
        save_adapter(model, tmp / "adapter.safetensors", base_model=base_model)
        crash_point("adapter")
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        crash_point("optimizer")
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "adam_steps": steps}, indent=1))
        crash_point("state")
        if best is not None:
            (tmp / BEST_COPY).write_bytes(best)
    crash_point("published")
    write_atomic(root / "latest", target.name + "\n")
    crash_point("pointer")
    for old in step_folders(root)[:-keep]:
        hidden = old.with_name(f".{old.name}.old")  # renamed first: a half-removed folder never looks complete
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        crash_point("pruned")
    return target


def step_folders(root: Path) -> list[Path]:
    """The `step-N` folders under `root`, oldest first (by N, not by name: step-1000000 follows step-999999)."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    for path in reversed(step_folders(run_dir / "checkpoints")):
        if all((path / name).is_file() for name in FILES):
            return path
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors and JSON only), every part checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = _state_json(path)
    state = RunState.from_json(saved, path / "state.json")
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise LorakitError(f"{path / 'optimizer.safetensors'}: unreadable ({e})") from None
    adapter = read_adapter(path / "adapter.safetensors")
    return Checkpoint(path, state, saved.get("adam_steps", {}), adapter, tensors)


def _state_json(path: Path) -> Any:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LorakitError(f"{path / 'state.json'}: unreadable ({e})") from None


def read_state(path: Path) -> RunState:
    """The `RunState` of a checkpoint folder alone (no tensors read), checked."""
    return RunState.from_json(_state_json(path), path / "state.json")
