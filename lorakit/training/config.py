"""The training configuration: one dataclass, loadable from a recipe YAML, overridable by flags.

A recipe is a serialized TrainConfig: snake_case keys, any subset. Unknown keys and bad values are all
collected and reported together, naming the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..errors import LorakitError

Precision = Literal["fp32", "bf16", "fp16"]
Task = Literal["causal-lm", "classification"]


@dataclass
class TrainConfig:
    """Everything `lorakit train` needs; the resolved copy is saved as `config.yaml` in the run folder."""

    # model
    model: str | None = None
    """Hub id or model folder; None: the packaged SmolLM2-135M-Instruct."""
    task: Task = "causal-lm"
    """`causal-lm` (next-token loss) or `classification` (sequence classification head)."""
    num_labels: int | None = None
    """Classes for `classification` (default: counted from the training labels)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off unless asked for)."""
    precision: Precision = "fp32"
    """Compute precision: fp32, bf16 (autocast) or fp16 (autocast + grad scaler)."""
    load_in_8bit: bool = False
    """Load the frozen base in 8 bits with bitsandbytes (`pip install 'lorakit[8bit]'`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    base_dropout: bool = False
    """Keep the base model's own dropout active while training (the paper's GPT-2 has none)."""

    # data
    data: str | None = None
    """Training data: .jsonl/.json/.csv/.parquet, a saved datasets folder or a hub dataset; None: the demo set."""
    eval_data: str | None = None
    """Evaluation data (same forms as `data`)."""
    split: str = "train"
    """Split of a hub dataset or DatasetDict folder for `data`."""
    eval_split: str = "validation"
    """Split for `eval_data` when it is a hub dataset or DatasetDict folder."""
    data_config: str | None = None
    """Hub dataset configuration name."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    label_field: str = "label"
    prompt_template: str | None = None
    """Python format string over the row's fields plus {eos} and {bos}, e.g. "{mr}{eos}"."""
    completion_template: str | None = None
    """Format string for the completion, e.g. " {ref}"."""
    limit: int | None = None
    """Use only the first N training rows."""
    eval_limit: int | None = None
    """Use only the first N evaluation rows."""
    max_length: int = 512
    """Truncate examples to this many tokens (truncated rows are counted and reported)."""

    # LoRA
    targets: str = "q,v"
    """Projections to adapt: q, k, v, o, mlp, all-linear, module suffixes or re:REGEX."""
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    """Dropout on the input of the low-rank path."""
    layers: list[int] | None = None
    """Adapt only these transformer blocks."""

    # optimization
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Examples per micro-batch (per device)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    warmup_steps: int = 0
    """Linear warmup from 0, then linear decay to 0 at the last step."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float | None = None
    """Clip the gradient norm (None: no clipping, as in the paper)."""
    label_smoothing: float = 0.0
    seed: int = 42

    # run
    out: str | None = None
    """Run folder (default: runs/<date>-<time>)."""
    save_every: int | None = None
    """Checkpoint every N steps (always at the end)."""
    eval_every: int | None = None
    """Evaluate on eval_data every N steps (always at the end when eval_data is given)."""
    eval_batches: int | None = None
    """Limit periodic evaluation to this many batches."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    """Print parameter counts, adapter size and a memory estimate from the config alone; train nothing."""
    nproc: int | None = None
    """Launch this many processes through torchrun (data-parallel training on this machine)."""


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """Check one value against the field's type; returns the value (ints accepted for floats)."""
    hint = _HINTS[name]
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise ValueError(f"expected one of {', '.join(get_args(hint))}, got {value!r}")
        return value
    args = get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ValueError("must not be empty")
    kinds = [a for a in args if a is not type(None)] or [hint]
    kind = kinds[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads `lr: 2e-4` as the string "2e-4"
            with contextlib.suppress(ValueError):
                return float(value)
        raise ValueError(f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if get_origin(kind) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(
            isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) for v in value
        ):
            return [int(v) for v in value]
        raise ValueError(f"expected a list of integers, got {value!r}")
    return value


def _check_values(cfg: TrainConfig) -> list[str]:
    problems = []
    positive = ["rank", "batch_size", "grad_accum", "max_length", "log_every"]
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "save_every", "eval_every", "eval_batches", "limit", "eval_limit", "num_labels", "nproc"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            problems.append(f"{name}: must be at least 1, got {value}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout: must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        problems.append(f"label_smoothing: must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.lr <= 0:
        problems.append(f"lr: must be positive, got {cfg.lr}")
    if cfg.epochs <= 0:
        problems.append(f"epochs: must be positive, got {cfg.epochs}")
    if cfg.warmup_steps < 0:
        problems.append(f"warmup_steps: must be 0 or more, got {cfg.warmup_steps}")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite: choose one")
    return problems


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value mapping of a recipe YAML file (not yet validated)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LorakitError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise LorakitError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a mapping of train options, got {type(data).__name__}")
    return data


def build_config(
    recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, source: str = "recipe"
) -> TrainConfig:
    """A validated TrainConfig from recipe values, then overrides (flags) on top.

    Raises:
        LorakitError: listing every unknown key and bad value, each named.
    """
    values: dict[str, Any] = {}
    problems = []
    for mapping in (recipe or {}, overrides or {}):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                close = difflib.get_close_matches(name, FIELDS, n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                problems.append(f"unknown key {key!r}{hint}")
                continue
            try:
                values[name] = _coerce(name, value)
            except ValueError as e:
                problems.append(f"{key}: {e}")
    cfg = TrainConfig(**values)  # only the values that passed: the range checks below see every one of them
    problems += _check_values(cfg)
    if problems:
        raise LorakitError(f"{source}: " + "; ".join(problems))
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as a recipe (every key, in field order)."""
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


__all__ = ["TrainConfig", "build_config", "read_recipe", "to_yaml", "FIELDS"]
