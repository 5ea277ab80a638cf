"""The training configuration: one dataclass, loadable from a recipe YAML, overridable by flags.

A recipe is a serialized TrainConfig: snake_case keys, any subset. Unknown keys and bad values are all
collected and reported together, naming the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..errors import LorakitError
from .data import DataSpec
from .reporting import parse_report_to

Precision = Literal["fp32", "bf16", "fp16"]
Task = Literal["causal-lm", "classification"]
Scheduler = Literal["linear", "cosine", "constant"]
QuantType = Literal["nf4", "fp4"]
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2"]


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
    allow_pickle: bool = False
    """Load a base stored only as pickled `pytorch_model.bin` (pickles can run code; refused unless asked for)."""
    precision: Precision = "fp32"
    """Compute precision: fp32, bf16 (autocast) or fp16 (autocast + grad scaler)."""
    load_in_8bit: bool = False
    """Load the frozen base in 8 bits with bitsandbytes (`pip install 'lorakit[8bit]'`)."""
    load_in_4bit: bool = False
    """Load the frozen base in 4 bits with bitsandbytes (QLoRA: double quantization, computing in `precision`)."""
    bnb_4bit_quant_type: QuantType = "nf4"
    """The 4-bit data type of load_in_4bit: nf4 (normal float, QLoRA's) or fp4."""
    fsdp: bool = False
    """In a run of several processes (nproc / torchrun), shard the frozen base per transformer block (FSDP2)
    instead of holding a whole copy in each process."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    base_dropout: bool = False
    """Keep the base model's own dropout active while training (the paper's GPT-2 has none)."""
    attn_implementation: AttnImplementation = "auto"
    """Attention kernel: eager, sdpa (torch's scaled_dot_product_attention) or flash_attention_2 (the flash-attn
    package, CUDA, bf16/fp16); auto: the best available (flash_attention_2 where it can run, else transformers'
    default for the model: sdpa where supported)."""
    compile: bool = False
    """`torch.compile` the model's forward (the first steps compile; later ones run faster on GPUs)."""
    group_by_length: bool = False
    """Draw each batch from examples of similar length (shuffled in windows of 50 batches, each window sorted by
    length; the batches then shuffled): less padding, so faster, but batches of alike examples learn less from a
    step (SmolLM2 E2E, 2,000 rows, seed 110: dev loss 1.419 against 1.408 with random batches). Off: random batches, as
    transformers' Trainer and TRL draw them."""
    packing: bool = False
    """Causal LM: pack several examples into each row of up to `max_length` tokens (position ids restart at each
    example, no attention across examples), so rows carry no padding; `batch_size` counts packed rows."""
    tf32: bool = True
    """fp32 runs on a GPU with TF32 (Ampere or newer): its matmuls run as TF32, several times faster with a 10-bit
    mantissa for the inputs; false (`--no-tf32`) keeps exact fp32 matmuls. No effect on the CPU, bf16 or fp16."""

    # data
    data: str | None = None
    """Training data: .jsonl/.json/.csv/.parquet, a saved datasets folder or a hub dataset; None: the demo set."""
    eval_data: str | None = None
    """Evaluation data (same forms as `data`)."""
    val_split: float | None = None
    """Without eval_data: hold out this fraction (in (0, 1)) of the training rows, chosen by `seed`, as the evaluation
    data (never trained on); `ceil(rows x val_split)` rows are held out."""
    split: str = DataSpec.split
    """Split of a hub dataset or DatasetDict folder for `data`."""
    eval_split: str = "validation"
    """Split for `eval_data` when it is a hub dataset or DatasetDict folder."""
    data_config: str | None = DataSpec.hub_config
    """Hub dataset configuration name."""
    text_field: str = DataSpec.text_field
    prompt_field: str = DataSpec.prompt_field
    completion_field: str = DataSpec.completion_field
    messages_field: str = DataSpec.messages_field
    label_field: str = DataSpec.label_field
    prompt_template: str | None = DataSpec.prompt_template
    """Python format string over the row's fields plus {eos} and {bos}, e.g. "{mr}{eos}"."""
    completion_template: str | None = DataSpec.completion_template
    """Format string for the completion, e.g. " {ref}"."""
    limit: int | None = None
    """Use only the first N training rows."""
    eval_limit: int | None = None
    """Use only the first N evaluation rows."""
    max_length: int = 512
    """Truncate examples to this many tokens (truncated rows are counted and reported); capped at the model's
    context length."""

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
    """Linear warmup from 0 to the peak `lr` over this many steps, then the `lr_scheduler` schedule."""
    lr_scheduler: Scheduler = "linear"
    """After the warmup: `linear` decay to 0 (the paper's), `cosine` decay to 0, or `constant` at the peak."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float | None = None
    """Clip the gradient norm to this (None or 0: no clipping, as in the paper)."""
    label_smoothing: float = 0.0
    seed: int = 42

    # run
    out: str | None = None
    """Run folder (default: runs/<date>-<time>)."""
    save_every: int | None = None
    """Checkpoint every N steps (always at the end)."""
    save_total_limit: int = 2
    """Checkpoints kept: the newest N by step number (older ones are removed once a newer one is complete)."""
    eval_every: int | None = None
    """Evaluate on eval_data every N steps (always at the end when eval_data is given)."""
    eval_batches: int | None = None
    """Limit periodic evaluation to this many batches."""
    eval_generate: bool = False
    """At each evaluation also generate for the evaluation prompts (greedy) and score the text (BLEU, ROUGE-L and
    `best_metric`); needs prompt/completion evaluation rows."""
    best_metric: str = "loss"
    """What `best/adapter.safetensors` is chosen by: `loss` (the evaluation loss, lower is better) or a text
    metric (bleu, nist, meteor, rouge_l, cider; higher is better; needs eval_generate)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without an improvement of `best_metric` (None: never)."""
    early_stopping_threshold: float = 0.0
    """An improvement must beat the best so far by more than this (absolute, in the metric's own units)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    report_to: str = "none"
    """Also send the metrics to `tensorboard`, `wandb` (comma-separated) or `none`."""
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    """Print parameter counts, adapter size, a memory estimate and the run's length (local data is tokenized; no
    weights load); train nothing."""
    nproc: int | None = None
    """Launch this many processes through torchrun (data-parallel training on this machine)."""
    threads: int | None = None
    """CPU threads for torch in each process (None: torch's default, one per core)."""

    def data_spec(self, which: Literal["train", "eval"] = "train") -> DataSpec:
        """Where the training (or evaluation) rows come from and how their fields map onto a format."""
        train = which == "train"
        return DataSpec(
            source=self.data if train else self.eval_data,
            split=self.split if train else self.eval_split,
            hub_config=self.data_config,
            text_field=self.text_field,
            prompt_field=self.prompt_field,
            completion_field=self.completion_field,
            messages_field=self.messages_field,
            label_field=self.label_field,
            prompt_template=self.prompt_template,
            completion_template=self.completion_template,
            limit=self.limit if train else self.eval_limit,
        )


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
        raise ValueError(f"expected true or false, got {_short(value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {_short(value)}")
    if kind is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError, OverflowError):
                return float(value)  # also a string: YAML 1.1 (PyYAML) reads `lr: 2e-4` as the string "2e-4"
        raise ValueError(f"expected a number, got {_short(value)}")
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_short(value)}")
        if not value:
            if optional:
                return None  # an empty value clears a recipe's setting
            raise ValueError("must not be empty")
        return value
    if get_origin(kind) is list:
        if isinstance(value, str):
            if not value.strip():
                return None  # an empty value clears a recipe's setting
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(_is_index(v) for v in value):
            return [int(v) for v in value]
        raise ValueError(f"expected a list of integers, got {_short(value)}")
    return value


POSITIVE_INTS = ("rank", "batch_size", "grad_accum", "log_every", "max_steps", "save_every", "eval_every")
POSITIVE_INTS += ("eval_batches", "limit", "eval_limit", "nproc", "threads", "save_total_limit")
POSITIVE_INTS += ("early_stopping_patience",)
POSITIVE_FLOATS = ("alpha", "lr", "epochs", "adam_eps")
FRACTIONS = ("dropout", "label_smoothing", "adam_beta1", "adam_beta2")  # in [0, 1)
NON_NEGATIVE_FLOATS = ("weight_decay", "max_grad_norm", "early_stopping_threshold")
LOWER_IS_BETTER = ("loss",)
"""Best metrics where lower is better; every other one (the text metrics) is higher-is-better."""


def best_metric_names() -> tuple[str, ...]:
    """What `best_metric` may name: the evaluation loss, then the text metrics of `lorakit eval --generate`."""
    from ..evaluation.metrics import TEXT_METRICS

    return (*LOWER_IS_BETTER, *TEXT_METRICS)


SEED_LIMIT = 2**63


def _is_index(value: Any) -> bool:
    """An int, or a string of ASCII digits (`--layers 0,1`)."""
    if isinstance(value, str):
        return value.strip().isascii() and value.strip().isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_values(cfg: TrainConfig) -> list[str]:
    """Every value that cannot work, named with what is allowed."""
    problems = []

    def need(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            problems.append(f"{name}: must be {allowed}, got {getattr(cfg, name)}")

    values = {name: getattr(cfg, name) for name in FIELDS}
    for name in POSITIVE_INTS:
        need(name, values[name] is None or values[name] >= 1, "at least 1")
    for name in POSITIVE_FLOATS:
        need(name, math.isfinite(values[name]) and values[name] > 0, "positive and finite")
    for name in FRACTIONS:
        need(name, 0.0 <= values[name] < 1.0, "in [0, 1)")
    for name in NON_NEGATIVE_FLOATS:
        value = values[name]
        need(name, value is None or (math.isfinite(value) and value >= 0), "0 or more and finite")
    need("max_length", cfg.max_length >= 2, "at least 2")
    need("num_labels", cfg.num_labels is None or cfg.num_labels >= 2, "at least 2")
    need("warmup_steps", cfg.warmup_steps >= 0, "0 or more")
    need("seed", 0 <= cfg.seed < SEED_LIMIT, "0 or more and below 2**63")
    need("val_split", cfg.val_split is None or 0.0 < cfg.val_split < 1.0, "in (0, 1)")
    if cfg.val_split is not None and cfg.eval_data:
        problems.append("val_split and eval_data: choose one (val_split holds out training rows for evaluation)")
    if cfg.layers is not None:
        need("layers", bool(cfg.layers) and min(cfg.layers) >= 0, "a non-empty list of block indices (0 or more)")
    try:
        parse_report_to(cfg.report_to)
    except LorakitError as e:
        problems.append(f"report_to: {e}")
    if cfg.num_labels is not None and cfg.task != "classification":
        problems.append(f"num_labels: only for task classification, got task {cfg.task}")
    if cfg.resume and cfg.overwrite:
        problems.append("resume and overwrite: choose one")
    problems += _quantization_and_sharding(cfg)
    problems += _best_and_early_stopping(cfg)
    return problems


def _quantization_and_sharding(cfg: TrainConfig) -> list[str]:
    """A 4-bit and an 8-bit base at once, a bitsandbytes base under FSDP (its packed weights and their
    quantization state are not tensors FSDP2 can shard and gather: untested here, so refused), or generation during
    training with a sharded base."""
    problems = []
    if cfg.load_in_4bit and cfg.load_in_8bit:
        problems.append("load_in_4bit and load_in_8bit: choose one")
    for name in ("load_in_4bit", "load_in_8bit"):
        if cfg.fsdp and getattr(cfg, name):
            problems.append(
                f"fsdp and {name}: FSDP cannot shard a bitsandbytes base here; use {name} without fsdp "
                "(each process holds the quantized base), or fsdp with a bf16 or fp32 base"
            )
    if cfg.fsdp and cfg.eval_generate:
        problems.append("fsdp and eval_generate: generation runs in one process, which a sharded base cannot")
    return problems


def _best_and_early_stopping(cfg: TrainConfig) -> list[str]:
    """The best-adapter and early-stopping settings that cannot work together with the rest."""
    problems = []
    known = best_metric_names()
    if cfg.best_metric not in known:
        problems.append(f"best_metric: must be one of {', '.join(known)}, got {cfg.best_metric}")
    elif cfg.best_metric not in LOWER_IS_BETTER and not cfg.eval_generate:
        problems.append(
            f"best_metric: {cfg.best_metric} scores generated text, which needs eval_generate (--eval-generate)"
        )
    # Without --data the demo set is used, and it brings its own evaluation rows.
    if cfg.eval_data is None and cfg.data is not None:
        used = dict(
            eval_generate=cfg.eval_generate,
            best_metric=cfg.best_metric != "loss",
            early_stopping_patience=cfg.early_stopping_patience is not None,
            early_stopping_threshold=cfg.early_stopping_threshold > 0,
        )
        for name in (n for n, on in used.items() if on):
            problems.append(f"{name}: needs eval_data (--eval-data), the rows evaluated during training")
    if cfg.early_stopping_patience is not None and cfg.eval_every is None:
        problems.append("early_stopping_patience: needs eval_every (--eval-every), the evaluations it counts")
    if cfg.early_stopping_threshold > 0 and cfg.early_stopping_patience is None:
        problems.append("early_stopping_threshold: only with early_stopping_patience (--early-stopping-patience)")
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
    typed: set[str] = set()  # names whose value came from the overrides

    def given_as(name: str) -> str:
        """A typed value's problem says so: the recipe (or a resumed run's config.yaml) named first may hold
        another, good value for it."""
        return f" (given as --{name.replace('_', '-')})" if name in typed and source != "flags" else ""

    for mapping, overriding in ((recipe or {}, False), (overrides or {}, True)):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                close = difflib.get_close_matches(name, FIELDS, n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                problems.append(f"unknown key {key!r}{hint}")
                continue
            if overriding:
                typed.add(name)
            try:
                values[name] = _coerce(name, value)
            except ValueError as e:
                problems.append(f"{key}: {e}{given_as(name)}")
    cfg = TrainConfig(**values)  # only the values that passed: the range checks below see every one of them
    problems += [p + given_as(p.split(":")[0]) for p in _check_values(cfg)]
    if problems:
        raise LorakitError(f"{source}: " + "; ".join(problems))
    return cfg


RESUME_MAY_CHANGE = frozenset(
    # Where things are (the data and base are checked by their fingerprints instead), how often to log, save and
    # evaluate, and how the processes run. Everything else shapes the run: changing it would mix two runs.
    ("model", "data", "eval_data", "split", "eval_split", "data_config", "text_field", "prompt_field")
    + ("completion_field", "messages_field", "label_field", "prompt_template", "completion_template", "limit")
    + ("eval_limit", "max_length", "trust_remote_code", "allow_pickle", "out", "save_every", "eval_every")
    + ("log_every", "report_to", "resume", "overwrite", "dry_run", "nproc", "threads", "save_total_limit")
    + ("tf32", "attn_implementation", "compile")  # how this machine runs the same computation
)


RUN_DID_BEFORE_THE_KEY = {"group_by_length": True}
"""Keys a run folder's config.yaml lacks when lorakit wrote it before the key existed, with what that run did:
until 2026-12-03 every run drew length-grouped batches (random batches are the default since)."""


def read_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """A run folder's config.yaml as recipe values, a key it predates set to what that run did
    (`RUN_DID_BEFORE_THE_KEY`), so a resume continues the run it was, not today's default."""
    return {**RUN_DID_BEFORE_THE_KEY, **read_recipe(path)}


def resume_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The settings in which `cfg` differs from the run being resumed and that an exact resume cannot take,
    as `name: saved -> new`."""
    return [
        f"{name}: {getattr(saved, name)!r} -> {getattr(cfg, name)!r}"
        for name in FIELDS
        if name not in RESUME_MAY_CHANGE and getattr(saved, name) != getattr(cfg, name)
    ]


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as a recipe (every key, in field order)."""
    import yaml

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


__all__ = ["TrainConfig", "build_config", "read_recipe", "read_run_config", "resume_changes", "to_yaml", "FIELDS"]
