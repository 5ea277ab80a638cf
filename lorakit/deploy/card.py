"""Model cards: the `README.md` of a merged or PEFT-exported folder.

It starts with the Hugging Face hub's YAML metadata block (`base_model`, `library_name`, `tags`, `pipeline_tag`,
and `license` / `datasets` when they are known), so that `huggingface-cli upload` publishes a folder the hub renders
and links to its base; below it, what the adapter is (rank, alpha, targets, sizes), how it was trained (the
settings the adapter records) and, when the adapter is a run folder's, the evaluation losses of its run.
Everything comes from the adapter file and the files beside it: nothing is fetched.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..hub import is_hub_id
from ..lora.adapter import Adapter
from ..models import PACKAGED, PACKAGED_HUB_ID

CARD_NAME = "README.md"
_REPO_ID = re.compile(r"([\w.-]{1,96}/)?[\w.-]{1,96}")
LIBRARY = {"merged": "transformers", "peft": "peft"}
# The training settings a card shows, in this order (the adapter records every setting of its run).
SETTINGS = (
    "data", "eval_data", "task", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_steps",
    "weight_decay", "label_smoothing", "max_grad_norm", "max_length", "precision", "load_in_8bit",
    "load_in_4bit", "bnb_4bit_quant_type", "fsdp", "seed",
)  # fmt: skip


def model_card(adapter: Adapter, kind: str, base: str, name: str) -> str:
    """The card of a `kind` ("merged" or "peft") folder called `name`, made from `adapter` on `base`."""
    train = _train_config(adapter)
    classifier = "num_labels" in adapter.metadata or train.get("task") == "classification"
    meta: dict[str, Any] = {}
    if base == PACKAGED:
        meta["base_model"], meta["license"] = PACKAGED_HUB_ID, "apache-2.0"
    elif _hub_repo(base):
        meta["base_model"] = base
    meta["library_name"] = LIBRARY[kind]
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    meta["tags"] = ["lora", "lorakit"] + (["merged"] if kind == "merged" else [])
    license_ = None if base == PACKAGED else _base_license(base)
    if license_:
        meta["license"] = license_
    datasets = [v for v in (train.get("data"), train.get("eval_data")) if isinstance(v, str) and _hub_repo(v)]
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    sections = [f"---\n{header}---", f"# {name}", _summary(adapter, kind, base), _usage(kind, base, name, classifier)]
    sections += [_lora_table(adapter), _settings_table(train), _evaluation(adapter)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _hub_repo(name: str) -> bool:
    """A name the hub's metadata takes as a repository id (`org/name` or `name`, at most 96 characters each)."""
    return is_hub_id(name) and _REPO_ID.fullmatch(name) is not None


def _train_config(adapter: Adapter) -> dict[str, Any]:
    """The run settings the adapter records (`lorakit train` writes them), or {}."""
    try:
        value = json.loads(adapter.metadata.get("train_config", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _base_license(base: str) -> str | None:
    """The `license:` of the base's own model card, when it is on disk (a folder, or the hub cache)."""
    try:
        card: Path | None = Path(base) / CARD_NAME if Path(base).is_dir() else None
    except (OSError, ValueError):
        return None
    if card is None and _hub_repo(base):
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(base, CARD_NAME)
        except ValueError:  # not a valid repo id after all
            found = None
        card = Path(found) if isinstance(found, str) else None
    if card is None or not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return value if isinstance(value, str) else None


def _summary(adapter: Adapter, kind: str, base: str) -> str:
    what = (
        "the base's weights with the adapter merged in (`W0 + (alpha/r) B A`): a plain model, no added latency"
        if kind == "merged"
        else "the adapter in PEFT's LoRA format"
    )
    return (
        f"A LoRA adapter (Hu et al. 2021, arXiv 2106.09685) for `{base}`, trained with "
        f"lorakit {adapter.metadata.get('lorakit_version') or __version__}; "
        f"this folder holds {what}."
    )


def _usage(kind: str, base: str, name: str, classifier: bool) -> str:
    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    if kind == "merged":
        code = f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{name}")'
    else:
        code = (
            f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
            f'base = {auto}.from_pretrained("{PACKAGED_HUB_ID if base == PACKAGED else base}")\n'
            f'model = PeftModel.from_pretrained(base, "{name}")'
        )
    return f"## Use\n\n```python\n{code}\n```" + (_packaged_note(name) if kind == "peft" and base == PACKAGED else "")


def _packaged_note(name: str) -> str:
    """Where the packaged default's weights are, and how they differ from the hub's."""
    from ..models import packaged_folder

    return (
        f"\n\nThe adapter was trained on lorakit's packaged default (`{PACKAGED}`): the Q4_1 GGUF of "
        f"SmolLM2-135M-Instruct dequantized to float32, here in `{packaged_folder()}`. `{PACKAGED_HUB_ID}` "
        "(what `adapter_config.json` names, so that PEFT and transformers can load the folder) holds the same "
        "model at full precision, so its outputs differ from lorakit's by the 4-bit rounding; for lorakit's exact "
        "base pass that "
        f'folder: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{packaged_folder()}"), '
        f'"{name}")`.'
    )


def _lora_table(adapter: Adapter) -> str:
    rows = [
        ("rank / alpha", f"{adapter.rank} / {adapter.alpha:g} (scaling {adapter.alpha / adapter.rank:.4g})"),
        ("dropout", f"{adapter.dropout:g}"),
        ("targets", adapter.metadata.get("targets") or "-"),
        ("adapted modules", str(len(adapter.modules))),
        ("trainable parameters", f"{adapter.trainable_params:,}"),
        ("base class", adapter.metadata.get("base_class") or "-"),
    ]
    return "## LoRA\n\n" + _table(rows)


def _settings_table(train: dict[str, Any]) -> str:
    shown = [key for key in SETTINGS if key != "bnb_4bit_quant_type" or train.get("load_in_4bit")]
    rows = [(key, _value(train[key])) for key in shown if train.get(key) not in (None, "")]
    return "## Training\n\n" + _table(rows) if rows else ""


def _evaluation(adapter: Adapter) -> str:
    """The run's evaluation losses, when the adapter is the one its run folder's metrics.jsonl describes."""
    metrics = adapter.path.parent / "metrics.jsonl"
    if not metrics.is_file():
        return ""
    losses = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        loss = record.get("eval_loss") if isinstance(record, dict) else None
        if isinstance(loss, (int, float)) and math.isfinite(loss) and isinstance(record.get("step"), int):
            losses.append((record["step"], float(loss)))
    if not losses:
        return ""
    rows = [(f"step {step}", f"{loss:.4f}") for step, loss in (losses[0], losses[-1])]
    if len(losses) == 1:
        rows = rows[:1]
    return "## Evaluation\n\nLoss on the run's evaluation data (step 0: the base alone).\n\n" + _table(rows)


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {key} | {_cell(value)} |" for key, value in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["model_card", "CARD_NAME"]
