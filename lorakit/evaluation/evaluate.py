"""Evaluation: loss and perplexity with the training masking, generation, text and classification metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..files import write_atomic
from ..training.data import DataSpec, Encoded, Example, Rows, collate, encode, read_rows, template_values
from ..training.loss import IGNORE, batch_loss
from .metrics import classification_metrics, text_metrics


@dataclass
class LossResult:
    """Mean loss over label tokens (examples for classification) and the count it averages over."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def label_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """Positions that carry a loss: shifted label tokens (causal LM) or examples (classification)."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def dataset_loss(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    task: str = "causal-lm",
    max_batches: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LossResult:
    """Token-weighted mean loss over `examples` (in order, batches of `batch_size`, no label smoothing)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    # Sorted by length so that batches carry little padding; the mean does not depend on the order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for n, index in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            break
        batch = to_device(collate([examples[i] for i in index], pad_id, task), device)
        with autocast():
            loss_sum, tokens = batch_loss(model, batch, task)
        total += float(loss_sum)
        count += tokens
    model.train(was_training)
    return LossResult(total / max(count, 1), count)


@dataclass
class GenerateOptions:
    """Decoding settings for `--generate` (greedy when num_beams is 1)."""

    num_beams: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 8
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
    if encoded.format != "prompt_completion":
        raise LorakitError(f"--generate needs prompt/completion rows; {rows.source} holds {encoded.format} rows")
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


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[list[int]], options: GenerateOptions) -> list[str]:
    """Decoded continuations of each prompt (batched, left-padded), cut at `options.stop`."""
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
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
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
    return texts


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
    predictions_dir: Path | None,
) -> ModelScores:
    """Loss and perplexity (the training masking), plus generation metrics or classification accuracy."""
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
        predictions = generate(model, tokenizer, [g.prompt_ids for g in groups], generate_options)
        scores.metrics = text_metrics(predictions, [g.references for g in groups], metric_names)
        if predictions_dir is not None:
            path = predictions_dir / f"{safe_name(name)}.predictions.jsonl"
            write_predictions(path, groups, predictions)
            scores.predictions = str(path)
    return scores


def safe_name(name: str) -> str:
    """A file-name-safe version of a model or adapter name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


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
) -> list[ModelScores]:
    """Score the base model, then each adapter on it, on one dataset (the base loads once).

    The base is `model`, else the base the first adapter records, else the packaged default. Each adapter
    is checked against the base's fingerprint before it is scored.
    """
    from ..lora.adapter import apply_adapter, read_adapter
    from ..lora.wrap import lora_layers, unwrap
    from ..models import load_base, load_tokenizer

    loaded = [read_adapter(a) for a in adapters]  # every file checked before the model loads
    rows = read_rows(spec, task=task)
    source = model or next((a.base_model for a in loaded if a.base_model), None)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LorakitError(f"{source}: no tokenizer found with the model")
    encoded = encode(rows, tokenizer, max_length, spec)
    if generate_options is not None and encoded.format != "prompt_completion":
        raise LorakitError(f"--generate needs prompt/completion rows; {spec.source} holds {encoded.format} rows")
    base = load_base(
        source,
        task=task if task == "classification" else None,
        trust_remote_code=trust_remote_code,
        num_labels=encoded.num_labels if task == "classification" else None,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device)
    names = metric_names or ["bleu", "rouge_l"]
    results = [
        score_model("base", base, tokenizer, rows, encoded, spec, batch_size, generate_options, names, predictions_dir)
    ]
    for path, adapter in zip(adapters, loaded):
        if any(True for _ in lora_layers(base)):
            unwrap(base)  # back to the plain base: the next adapter may target other modules
        apply_adapter(base, adapter)
        base.to(device)
        results.append(
            score_model(
                str(path), base, tokenizer, rows, encoded, spec, batch_size, generate_options, names, predictions_dir
            )
        )
    return results
