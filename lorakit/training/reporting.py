"""`--report-to tensorboard,wandb`: the run's scalars and configuration, also in TensorBoard or Weights & Biases.

`metrics.jsonl` stays the record; every line written there (loss, lr, tokens/s, peak memory; the evaluation loss
and perplexity) goes to each reporter as scalars at its step, and the resolved configuration goes once at the
start. TensorBoard event files go to `<run>/tensorboard/` (torch's SummaryWriter; `tensorboard --logdir runs`);
W&B logs through its library into `<run>/wandb/`, online when `WANDB_API_KEY` or `WANDB_MODE=online` says so and
offline otherwise (`wandb sync <run>/wandb/offline-run-*` uploads it later). Both are optional extras.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from ..errors import LorakitError

REPORTERS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """The reporters a `--report-to` value names (`none` or empty: none), each known, in the order given."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in (*REPORTERS, "none")]
    if unknown:
        raise LorakitError(f"--report-to {value}: unknown {', '.join(unknown)}; expected tensorboard, wandb or none")
    if "none" in names and len(names) > 1:
        raise LorakitError(f"--report-to {value}: none cannot be combined with a reporter")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_available(names: tuple[str, ...]) -> None:
    """Refuse, before anything loads, a reporter whose package is not installed (one line naming the extra)."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise LorakitError(
                f"--report-to {name}: the {PACKAGES[name]} package is not installed; pip install 'lorakit[{name}]'"
            )


class Reporters:
    """The open reporters of one run (rank 0 only); `log` sends one metrics record, `close` flushes them."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict[str, Any]) -> None:
        self.writer: Any = None
        self.wandb_run: Any = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
        if "wandb" in names:
            os.environ.setdefault("WANDB_SILENT", "true")  # its banners are third-party output (shown by --debug)
            import wandb

            online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online"
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "lorakit"),
                name=out.name,
                dir=str(out),
                config=config,
                mode="online" if online else "offline",
            )

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if not isinstance(step, int) or not scalars:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


__all__ = ["REPORTERS", "parse_report_to", "check_available", "Reporters"]
