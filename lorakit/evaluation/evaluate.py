"""Evaluation: loss and perplexity with the training masking, generation, text and classification metrics."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError, Note
from ..files import write_atomic
from ..training.data import (
    IGNORE,
    DataSpec,
    Encoded,
    Example,
    Rows,
    collate,
    encode,
    read_rows,
    template_values,
    to_device,
)
from ..training.loss import dataset_loss
from .metrics import classification_metrics, text_metrics


@dataclass
class GenerateOptions:
    """Decoding settings for `--generate` (greedy when num_beams is 1)."""

    num_beams: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
    temperature: float = 0.0
    """0: greedy (or beam search); above 0: sampling at this temperature, from the `top_p` nucleus."""
    top_p: float = 1.0
    stop: str = "\n\n"
    """Generated text is cut at the first occurrence (the paper's E2E decoding stops at a blank line)."""


@dataclass
class PromptGroup:
    """One unique prompt and every reference written for it (E2E: all references of one MR)."""

    prompt: str
    prompt_ids: list[int]
    references: list[str]


def prompt_groups(
    rows: Rows,
    encoded: Encoded,
    completion_field: str,
    tokenizer: Any,
    completion_template: str | None = None,
    spec: DataSpec | None = None,
) -> list[PromptGroup]:
    """Unique prompts of prompt/completion data, in first-seen order, with all their references.

    A reference is the row's whole completion text (also when its tokens were truncated), filled into
    `completion_template` when one is given, with `{eos}` and `{bos}` left out.
    """
    if encoded.format == "messages":
        return _chat_groups(rows, encoded, tokenizer, spec.messages_field if spec else "messages")
    if encoded.format != "prompt_completion":
        raise LorakitError(
            f"--generate needs prompt/completion or chat rows; {rows.source} holds {encoded.format} rows"
        )
    groups: dict[tuple[int, ...], PromptGroup] = {}
    for e in encoded.examples:
        start = next(i for i, label in enumerate(e.labels) if label != IGNORE)  # first completion token
        key = tuple(e.input_ids[:start])
        row = rows.rows[e.row]
        if completion_template is None:
            reference = str(row[completion_field]).strip()
        else:  # encode() filled this template already, so it cannot fail here
            values = template_values(row, spec, {}) if spec else row
            reference = completion_template.format_map({**values, "eos": "", "bos": ""}).strip()
        if key not in groups:
            text = tokenizer.decode(list(key), skip_special_tokens=True)
            groups[key] = PromptGroup(text, list(key), [])
        groups[key].references.append(reference)
    return list(groups.values())


def _chat_groups(rows: Rows, encoded: Encoded, tokenizer: Any, field: str) -> list[PromptGroup]:
    """Chat rows: the conversation up to its last assistant turn (the chat template, assistant turn opened) is the
    prompt, that turn's text the reference; rows with the same prompt share it."""
    groups: dict[tuple[int, ...], PromptGroup] = {}
    for e in encoded.examples:
        messages = rows.rows[e.row][field]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True)
        key = tuple(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if key not in groups:
            groups[key] = PromptGroup(tokenizer.decode(list(key), skip_special_tokens=True), list(key), [])
        groups[key].references.append(str(messages[last]["content"]).strip())
    return list(groups.values())


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    options: GenerateOptions,
    on_batch: Callable[[], None] | None = None,
    adapters: list[int] | None = None,
) -> list[str]:
    """Decoded continuations of each prompt (batched, left-padded), cut at `options.stop`; `on_batch` is called
    after each batch (a progress bar). `adapters`: on a model with stacked adapters (lora/multi.py), the adapter
    index of each prompt (-1: the base alone)."""
    from ..lora.multi import adapter_per_row

    if adapters is not None and len(adapters) != len(prompts):
        raise LorakitError(f"{len(adapters)} adapter indices for {len(prompts)} prompts")
    model.eval()
    device = next(p.device for p in model.parameters())
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = prompts[start : start + options.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        rows = adapter_per_row(model, adapters[start : start + len(chunk)]) if adapters is not None else nullcontext()
        with rows:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                **_sampling(options),
                num_beams=options.num_beams,
                length_penalty=options.length_penalty,
                no_repeat_ngram_size=options.no_repeat_ngram_size,
                max_new_tokens=options.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row in out[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            texts.append(text.split(options.stop)[0].strip() if options.stop else text.strip())
        if on_batch is not None:
            on_batch()
    return texts


def _sampling(options: GenerateOptions) -> dict[str, Any]:
    if options.temperature > 0:
        return {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
    return {"do_sample": False}


@torch.no_grad()
def classify(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> list[int]:
    """Predicted class per example (argmax of the logits)."""
    model.eval()
    device = next(p.device for p in model.parameters())
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id, "classification"), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions += logits.argmax(-1).tolist()
    return predictions


@dataclass
class ModelScores:
    """One row of the eval table: the base or an adapter."""

    name: str
    loss: float
    perplexity: float
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}
        d.update(self.metrics)
        if self.predictions:
            d["predictions"] = self.predictions
        return d


def write_predictions(path: Path, groups: list[PromptGroup], predictions: list[str]) -> None:
    """JSONL, one object per unique prompt: prompt, prediction, references."""
    lines = [
        json.dumps({"prompt": g.prompt, "prediction": p, "references": g.references}, ensure_ascii=False)
        for g, p in zip(groups, predictions)
    ]
    write_atomic(path, "".join(line + "\n" for line in lines))


def read_predictions(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Predictions and references from a predictions JSONL file (as `--generate` writes it)."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path}: no such predictions file")
    predictions, references = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "prediction" not in record or "references" not in record:
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise LorakitError(f"{path}:{n}: expected keys prompt, prediction, references (found: {found})")
        refs = record["references"]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise LorakitError(f"{path}:{n}: 'references' must be a list of strings")
        predictions.append(str(record["prediction"]))
        references.append(refs)
    if not predictions:
        raise LorakitError(f"{path}: no predictions")
    return predictions, references


def score_model(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    rows: Rows,
    encoded: Encoded,
    spec: DataSpec,
    batch_size: int,
    generate_options: GenerateOptions | None,
    metric_names: list[str],
    predictions_file: Path | None,
    predictions: list[str] | None = None,
) -> ModelScores:
    """Loss and perplexity (the training masking), plus generation metrics or classification accuracy.
    `predictions`: the generated texts of the prompts, when they were generated already (else generated here)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    task = "classification" if encoded.format == "classification" else "causal-lm"
    result = dataset_loss(model, encoded.examples, batch_size, pad_id, task)
    scores = ModelScores(name, result.loss, result.perplexity, result.tokens)
    if task == "classification":
        predicted = classify(model, encoded.examples, batch_size, pad_id)
        labels = [e.labels[0] for e in encoded.examples]
        scores.metrics = classification_metrics(predicted, labels, max(encoded.num_labels or 2, 2))
    elif generate_options is not None:
        groups = prompt_groups(rows, encoded, spec.completion_field, tokenizer, spec.completion_template, spec)
        if predictions is None:
            predictions = generate(model, tokenizer, [g.prompt_ids for g in groups], generate_options)
        scores.metrics = text_metrics(predictions, [g.references for g in groups], metric_names)
        if predictions_file is not None:
            write_predictions(predictions_file, groups, predictions)
            scores.predictions = str(predictions_file)
    return scores


def safe_name(name: str) -> str:
    """A file-name-safe version of a model or adapter name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def prediction_files(folder: Path, names: list[str]) -> list[Path]:
    """One predictions file per name, distinct even where safe names collide (`a/b` and `a_b`)."""
    stems = [safe_name(n) for n in names]
    counts = {s: stems.count(s) for s in stems}
    paths = []
    for name, stem in zip(names, stems):
        if counts[stem] > 1:
            stem += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        paths.append(folder / f"{stem}.predictions.jsonl")
    return paths


def decoding_problems(options: GenerateOptions) -> list[str]:
    """What cannot work in the decoding settings, each naming its option."""
    problems = []
    for name, value, low in (
        ("--batch-size", options.batch_size, 1),
        ("--num-beams", options.num_beams, 1),
        ("--max-new-tokens", options.max_new_tokens, 1),
        ("--no-repeat-ngram-size", options.no_repeat_ngram_size, 0),
    ):
        if value < low:
            problems.append(f"{name} must be at least {low}, got {value}")
    if not math.isfinite(options.length_penalty):
        problems.append(f"--length-penalty must be a finite number, got {options.length_penalty}")
    if not (math.isfinite(options.temperature) and options.temperature >= 0):
        problems.append(f"--temperature must be 0 (greedy) or more and finite, got {options.temperature}")
    if not 0 < options.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {options.top_p}")
    return problems


def recorded_task(adapters: list[Path]) -> str | None:
    """The task the adapters were trained for, when one of them records a classification head; else None."""
    from ..lora.adapter import read_adapter

    for path in adapters:
        metadata = read_adapter(path).metadata
        if "num_labels" in metadata:
            return "classification"
        try:
            task = json.loads(metadata.get("train_config", "{}")).get("task")
        except (ValueError, AttributeError):
            task = None
        if task == "classification":
            return "classification"
    return None


def check_eval_options(
    options: GenerateOptions, max_length: int, limit: int | None, threads: int | None, out: Path | None
) -> None:
    """Refuse values that cannot work, before anything loads (one line naming the option)."""
    problems = decoding_problems(options)
    for name, value, low in (("--max-length", max_length, 2), ("--limit", limit, 1), ("--threads", threads, 1)):
        if value is not None and value < low:
            problems.append(f"{name} must be at least {low}, got {value}")
    if out is not None and out.is_symlink() and not out.exists():
        problems.append(f"--out {out} is a broken symbolic link (predictions files go into a folder)")
    elif out is not None and out.exists() and not out.is_dir():
        problems.append(f"--out {out} exists and is not a folder (predictions files go into a folder)")
    if problems:
        raise LorakitError("; ".join(problems))


def model_labels(adapters: list[Path]) -> list[str]:
    """The eval table's row names: `base`, then each adapter as given (predictions files are named after them)."""
    return ["base", *map(str, adapters)]


def check_predictions_out(out: Path, adapters: list[Path]) -> None:
    """Before anything loads, that `--generate` can write its predictions files into `out`: no file is in the way
    of the folder or of a predictions file, and the folder (or, if new, the nearest folder above it that exists)
    takes a new file; a read-only folder is an OSError naming it."""
    for path in prediction_files(out, model_labels(adapters)):
        if path.is_dir():
            raise LorakitError(f"{path}: is a folder; it is in the way of a predictions file, move it or change --out")
    existing = out
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LorakitError(f"--out {out}: {existing} is not a folder (predictions files go into a folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lorakit-probe.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(existing)) from e
    os.close(fd)
    os.unlink(probe)


def data_spec_of(
    source: str, split: str, hub_config: str | None, limit: int | None, fields: dict[str, str | None]
) -> DataSpec:
    """The DataSpec of `lorakit eval`: its defaults, with the field names and templates given on the line."""
    if not split:  # as `train --split ''`: refused here, not sent to the hub as split ''
        raise LorakitError("--split must not be empty")
    mapping = {}
    for name, value in fields.items():
        if value == "" and not name.endswith("_template"):
            raise LorakitError(f"--{name.replace('_', '-')} must not be empty")
        mapping[name] = value or None if name.endswith("_template") else value
    return DataSpec(source=source, split=split, hub_config=hub_config or None, limit=limit, **mapping)


def evaluate_adapters(
    adapters: list[Path],
    spec: DataSpec,
    model: str | None = None,
    task: str = "causal-lm",
    max_length: int = 512,
    batch_size: int = 8,
    generate_options: GenerateOptions | None = None,
    metric_names: list[str] | None = None,
    predictions_dir: Path | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> list[ModelScores]:
    """Score the base model, then each adapter on it, on one dataset (the base loads once).

    The base is `model`, else the base the first adapter records, else the packaged default. Each adapter
    is checked against the base's fingerprint before it is scored.
    """
    from ..lora.adapter import apply_adapter, read_adapter
    from ..lora.wrap import lora_layers, unwrap
    from ..models import PACKAGED, check_task, context_length, load_base, load_config, load_tokenizer, recorded_base

    loaded = [read_adapter(a) for a in adapters]  # every file checked before the model loads
    heads = {int(a.metadata["num_labels"]) for a in loaded if "num_labels" in a.metadata}
    if task == "classification" and len(heads) > 1:
        raise LorakitError(f"the adapters have heads of {sorted(heads)} classes; evaluate one head size at a time")
    rows = read_rows(spec, task=task, num_labels=next(iter(heads), None) if task == "classification" else None)
    source = model or next((recorded_base(a.path, a.base_model) for a in loaded if a.base_model), None)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    config = load_config(source, trust_remote_code=trust_remote_code)
    check_task(config, task, source or PACKAGED)
    positions = context_length(config)
    if positions is not None and max_length > positions:
        message = f"--max-length {max_length} capped at {positions}, the model's context length"
        warnings.warn(message, Note, stacklevel=2)
        max_length = positions
    encoded = encode(rows, tokenizer, max_length, spec)
    if generate_options is not None and encoded.format not in ("prompt_completion", "messages"):
        held = f"{spec.source} holds {encoded.format} rows"
        raise LorakitError(f"--generate needs prompt/completion or chat rows; {held}")
    base = load_base(
        source,
        task=task if task == "classification" else None,  # causal LMs: the class they were saved as
        trust_remote_code=trust_remote_code,
        num_labels=(next(iter(heads), None) or encoded.num_labels) if task == "classification" else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        allow_pickle=allow_pickle,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device)
    names = metric_names or ["bleu", "rouge_l"]
    labels = model_labels(adapters)
    files = prediction_files(predictions_dir, labels) if predictions_dir is not None else [None] * len(labels)
    if generate_options is not None and stackable(loaded):
        data = (tokenizer, rows, encoded, spec, batch_size, generate_options, names)
        return _score_stacked(base, loaded, labels, files, *data)
    results = [score_model("base", base, tokenizer, rows, encoded, spec, batch_size, generate_options, names, files[0])]
    for label, adapter, file in zip(labels[1:], loaded, files[1:]):
        if any(True for _ in lora_layers(base)):
            unwrap(base)  # back to the plain base: the next adapter may target other modules
        apply_adapter(base, adapter)
        base.to(device)
        results.append(
            score_model(label, base, tokenizer, rows, encoded, spec, batch_size, generate_options, names, file)
        )
    return results


def stackable(adapters: list[Any]) -> bool:
    """Whether --generate runs the adapters in one pass (stacked on the base): some adapters, none with a head."""
    return bool(adapters) and not any(a.trained_params for a in adapters)


def _score_stacked(
    base: nn.Module,
    loaded: list[Any],
    labels: list[str],
    files: list[Path | None],
    tokenizer: Any,
    rows: Rows,
    encoded: Encoded,
    spec: DataSpec,
    batch_size: int,
    options: GenerateOptions,
    names: list[str],
) -> list[ModelScores]:
    """--generate with adapters in one pass: every adapter sits on the base at once (lora/multi.py) and each batch
    of generation mixes models, each prompt once per model (the base, then each adapter, in that order); the loss
    runs per model."""
    from ..lora.multi import adapter_per_row, stack_adapters

    stack_adapters(base, loaded)  # checks every adapter's base fingerprint
    groups = prompt_groups(rows, encoded, spec.completion_field, tokenizer, spec.completion_template, spec)
    models = list(range(-1, len(loaded)))  # -1: the base alone
    order = [(g, m) for g in range(len(groups)) for m in models]
    prompts = [groups[g].prompt_ids for g, _ in order]
    texts = generate(base, tokenizer, prompts, options, adapters=[m for _, m in order])
    results = []
    for m, label, file in zip(models, labels, files):
        predictions = [text for (_, model), text in zip(order, texts) if model == m]
        with adapter_per_row(base, m):
            scores = score_model(
                label, base, tokenizer, rows, encoded, spec, batch_size, options, names, file, predictions
            )
        results.append(scores)
    return results
