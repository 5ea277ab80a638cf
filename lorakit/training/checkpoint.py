"""Training checkpoints: what `--resume` needs to continue a run exactly, with no pickle anywhere.

`<run>/checkpoints/step-000120/` holds
- `adapter.safetensors`: the adapter at that step (a normal adapter file);
- `optimizer.safetensors`: AdamW moments per LoRA parameter, and the RNG states as uint8 tensors;
- `state.json`: step, data position, AdamW step counts, grad-scaler state, the trainer's counters.
`<run>/checkpoints/latest` names the newest complete checkpoint; it is written last, so a killed process
leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError
from ..files import atomic_dir, write_atomic
from ..lora.adapter import Adapter, read_adapter, save_adapter

KEEP = 2  # checkpoints kept; older ones are removed once a newer one is complete


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    step: int
    state: dict[str, Any]
    adapter: Adapter
    optimizer: dict[str, torch.Tensor]


def rng_state() -> dict[str, torch.Tensor]:
    """Every torch RNG state (CPU and each CUDA device) as uint8 tensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def set_rng_state(tensors: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Restore the generators saved for `rank` (`rank{r}.rng.*`; single-process checkpoints: `rng.*`)."""
    prefix = f"rank{rank}." if f"rank{rank}.rng.cpu" in tensors else ""
    if f"{prefix}rng.cpu" not in tensors:
        raise LorakitError(f"checkpoint has no RNG state for rank {rank}; resume with the same number of processes")
    torch.set_rng_state(tensors[f"{prefix}rng.cpu"])
    cuda_prefix = f"{prefix}rng.cuda."
    cuda = sorted((k for k in tensors if k.startswith(cuda_prefix)), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


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


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], steps: dict[str, float]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, step in steps.items():
        i = int(key)
        if i >= len(params):
            raise LorakitError(f"checkpoint optimizer state names parameter {i}; the model has {len(params)}")
        p = params[i]
        optimizer.state[p] = {
            "step": torch.tensor(step),
            "exp_avg": tensors[f"exp_avg.{i}"].to(p.device, p.dtype),
            "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device, p.dtype),
        }


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    base_model: str | None = None,
    rng: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint for `step`, then point `latest` at it and prune old ones.

    `rng` holds every rank's generator states in a distributed run (default: this process's).
    """
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    target = root / f"step-{step:06d}"
    tensors, steps = optimizer_tensors(optimizer)
    if rng is None or len(rng) == 1:
        tensors.update(rng[0] if rng else rng_state())
    else:
        for r, states in enumerate(rng):
            tensors.update({f"rank{r}.{k}": v for k, v in states.items()})
    with atomic_dir(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter.safetensors", base_model=base_model)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "adam_steps": steps}, indent=1))
    write_atomic(root / "latest", target.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors and JSON only)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        optimizer = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"{path}: unreadable checkpoint ({e})") from None
    adapter = read_adapter(path / "adapter.safetensors")
    return Checkpoint(path, int(state["step"]), state, adapter, optimizer)
