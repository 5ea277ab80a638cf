"""The run folder: checked before anything loads, claimed (locked, marked, cleaned) once the run can start, and the
files in it that grow while it trains (`metrics.jsonl`, `loss.png`).

    runs/x/
      .lorakit                 marker: a folder lorakit made (what --overwrite may replace)
      .lorakit.lock            held by the one process training here
      config.yaml              the resolved configuration the run started with (a resume adds comments only)
      metrics.jsonl            one JSON object per line, each with `step`
      loss.png                 training and evaluation loss
      adapter.safetensors      at the end
      best/adapter.safetensors the best evaluated adapter (by best_metric), when the run evaluates
      checkpoints/step-000120/ what --resume needs (see checkpoint.py)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..files import check_out, empty_folder, folder_lock, mark, remove_leftovers, write_atomic
from .checkpoint import latest_checkpoint
from .config import TrainConfig, to_yaml

KIND = "run"


def run_folder(cfg: TrainConfig) -> Path:
    """The run folder of `cfg`: `--out`, or a new `runs/<date>-<time>/`."""
    return Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def local_inputs(cfg: TrainConfig) -> list[str]:
    """The local files and folders the run reads (a run folder must never hold or be one of them)."""
    return [s for s in (cfg.data, cfg.eval_data, cfg.model) if s and Path(s).expanduser().exists()]


def check_run_folder(cfg: TrainConfig) -> Path:
    """The run folder, checked but not touched: with --resume it must hold a checkpoint; otherwise it must be new,
    empty, or (with --overwrite) a run folder lorakit made that holds none of the run's inputs."""
    out = run_folder(cfg)
    if cfg.resume:
        if out.exists() and not out.is_dir():
            raise LorakitError(f"{out}: exists and is not a folder")
        if latest_checkpoint(out) is None:
            raise LorakitError(f"{out}: no checkpoint to resume from (expected a step-N folder in {out}/checkpoints)")
        return out
    choices = "pass --resume to continue the run, --overwrite to replace it, or choose another --out"
    check_out(out, KIND, cfg.overwrite, local_inputs(cfg), choices)
    return out


def claim_run_folder(out: Path, cfg: TrainConfig, stack: contextlib.ExitStack, locked: bool) -> None:
    """Make `out` this run's folder: create it, hold its lock for the run, empty it with --overwrite, remove what
    killed runs left behind, and mark it as a lorakit run folder. Called once data and model have loaded."""
    out.mkdir(parents=True, exist_ok=True)
    if not locked:
        stack.enter_context(folder_lock(out))
    if cfg.overwrite and not cfg.resume:
        empty_folder(out)
    remove_leftovers(out)
    for folder in (out / "checkpoints", out / "best"):
        if folder.is_dir():
            remove_leftovers(folder)
    mark(out, KIND)


def save_config(out: Path, cfg: TrainConfig, resumed_at: int | None = None, changes: list[str] | None = None) -> None:
    """config.yaml: the resolved configuration, written when the run starts and never rewritten by a resume. The
    settings a resume may change (`RESUME_MAY_CHANGE`: where files are, how often to save, evaluate and log, ...)
    are appended as a comment, `# resumed at step N with: name: old -> new; ...`; the values stay those of step 0
    (a later `--resume` reads them: pass such a flag again)."""
    path = out / "config.yaml"
    if resumed_at is None or not path.is_file():  # a new run, or a lorakit 0.1 run folder without one
        write_atomic(path, to_yaml(cfg))
    elif changes:
        text = path.read_text(encoding="utf-8")
        note = f"# resumed at step {resumed_at} with: " + "; ".join(changes).replace("\n", " ")
        write_atomic(path, text + ("" if text.endswith("\n") else "\n") + note + "\n")


def note_in_config(out: Path, note: str) -> None:
    """Append `# note` to config.yaml (once: a resumed run that finishes again adds nothing); the settings above it
    stay as they were."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    line = "# " + note.replace("\n", " ")
    if line not in text.splitlines():
        write_atomic(path, text + ("" if text.endswith("\n") else "\n") + line + "\n")


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines after the checkpoint's step are dropped, and so is
    a damaged line (what a kill or a full disk leaves at the end)."""

    def __init__(
        self, path: Path, resume_step: int | None, enabled: bool = True, also: Callable[[dict], None] | None = None
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.also = also  # another sink for each record (--report-to)
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                record = _record(line)
                if record is not None and record["step"] <= resume_step:
                    self.records.append(record)
            write_atomic(path, "".join(_line(r) for r in self.records))
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self.also is not None:
            self.also(record)
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(_line(record))
        except OSError as e:  # a full disk: name the file (a half-written last line is dropped on resume)
            raise OSError(e.errno, e.strerror, str(self.path)) from e


def _line(record: dict[str, Any]) -> str:
    """One JSON line; a NaN or infinite value (an overflowing evaluation) is written as null, so the file stays
    JSON that any reader accepts."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line as a dict with an integer step, or None for a damaged one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


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
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomic(path, image.getvalue())


__all__ = ["check_run_folder", "claim_run_folder", "MetricsLog", "plot_losses", "run_folder", "save_config"]
