"""The benchmark scripts still run: each one's `--quick` smoke test, end to end, in a child process.

They time nothing here (`--quick`: tiny shapes, one round, no waiting for a quiet machine, so a busy machine makes
them slower, never longer in rounds); what is checked is that they run, that the systems they compare agree where
they must (the same first-step loss, an exact merge) and that the JSON they write holds every system.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
HANG = 3600  # seconds: a guard against a hung script only; a busy 2-core machine takes a minute, not an hour
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the dev extra)")


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", str(out), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


@pytest.mark.slow
@needs_peft
def test_layer_speed_quick_runs_every_system_on_the_same_weights(tmp_path):
    data = run_script("layer_speed", tmp_path, "--no-memory")
    results = {r["system"]: r for r in data["results"]}
    assert sorted(results) == ["floor", "full", "lorakit", "lorakit-qv", "peft"]
    losses = [r["first_loss"] for r in results.values()]
    assert max(losses) - min(losses) < 1e-5  # the same weights, batch and seed; LoRA starts as the identity
    assert results["lorakit"]["trainable_params"] == results["peft"]["trainable_params"] > 0
    assert all(r["median_s"] > 0 and r["vs_peft"] > 0 for r in results.values())


@pytest.mark.slow
def test_merge_quick_merges_exactly(tmp_path):
    data = run_script("merge", tmp_path)
    results = data["results"]
    assert results["runs"][0]["max_abs_diff"] < 1e-4 and results["runs"][0]["modules"] == 2
    assert results["merged_mb"] == pytest.approx(results["base_mb"], rel=0.01)
    assert results["cli_seconds_median"] > 0 and results["import_seconds_median"] > 0
    assert len(results["plain_write_seconds"]) == 1 and results["plain_write_seconds_median"] > 0


@pytest.mark.slow
@needs_peft
def test_lora_layer_quick_times_base_peft_and_lorakit(tmp_path):
    data = run_script("lora_layer", tmp_path)
    by_case: dict[str, set] = {}
    for r in data["results"]:
        by_case.setdefault(r["case"], set()).add(r["system"])
        assert r["median_ms"] > 0
    assert by_case["quick c_attn"] == {"base", "peft", "lorakit"}
    assert by_case["quick c_attn q,v"] == {"base", "lorakit"}  # PEFT has no q,v slices of a fused projection


@pytest.mark.slow
def test_inference_quick_merged_model_matches_the_adapter(tmp_path):
    data = run_script("inference", tmp_path)
    seen = {(r["model"], r["workload"], r["batch"]) for r in data["results"]}
    assert seen == {(m, w, b) for m in ("quick-gpt2", "quick-llama") for w in ("forward", "decode") for b in (1, 2)}
    for r in data["results"]:
        assert r["merged_unmerged_max_abs_diff"] < 1e-4  # merge_adapter + unwrap gives the adapter's logits
        assert set(r["ms"]) == {"base", "merged", "unmerged"} and all(v > 0 for v in r["ms"].values())
        assert r["merged_vs_base"] > 0 and r["unmerged_vs_base"] > 0


@pytest.mark.slow
def test_memory_quick_measures_lorakit_train_against_its_estimate(tmp_path):
    data = run_script("memory", tmp_path)
    (r,) = data["results"]
    assert (r["model"], r["batch"], r["seq"], r["checkpointing"]) == ("tiny", 2, 64, False)
    assert r["trainable_params"] > 0 and r["tokens_per_s"] > 0 and r["tokens_per_s_default"] > 0
    # lorakit.training.loop.train(cfg, console) showed one progress display around its steps (see common.py)
    assert 0 < r["estimate_mb"] and 0 < r["static_mb"] < r["measured_mb"] and r["measured_mb_default"] > 0


def test_epoch_speed_parses_its_arguments():
    """epoch_speed.py needs TRL (the bench extra) and minutes to run; its --help needs neither."""
    command = [sys.executable, str(BENCH / "epoch_speed.py"), "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--trl-sampler" in proc.stdout


def quality_data(tmp_path: Path) -> dict[str, Path]:
    """Tiny models and CSVs for bench/quality.py --quick: a BERT classifier, a Llama, and learnable rows."""
    import csv
    import random

    from tiny import save_model, tiny_bert, tiny_llama

    rng = random.Random(0)
    # a bare BertModel checkpoint, as all-MiniLM-L6-v2 is: the classifier is a new head, trained by every system
    paths = {
        "bert": save_model(tiny_bert().bert, tmp_path / "bert"),
        "llama": save_model(tiny_llama(), tmp_path / "llama"),
    }

    def write(name: str, fields: list[str], rows: list[dict]) -> None:
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
        paths[name] = tmp_path / f"{name}.csv"

    for name, n in (("train", 24), ("test", 8)):
        rows = []
        for _ in range(n):
            label = rng.choice(["fresh", "rotten"])
            words = [f"w{rng.randrange(10, 80)}" for _ in range(rng.randrange(2, 6))]
            rows.append({"text": " ".join([*words, "w5" if label == "fresh" else "w6"]), "label": label})
        write(name, ["text", "label"], rows)
    for name, n in (("e2e-train", 8), ("e2e-dev", 4)):
        mrs = [[rng.randrange(10, 60) for _ in range(rng.randrange(2, 4))] for _ in range(n)]
        rows = [{"mr": " ".join(f"w{k}" for k in m), "ref": " ".join(f"w{k + 10}" for k in m)} for m in mrs]
        write(name, ["mr", "ref"], rows)
    return paths


def run_quality(tmp_path: Path, capsys, *args: str) -> str:
    """bench/quality.py's driver in this process (its workers and `lorakit eval` run as child processes); its output."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import quality

    capsys.readouterr()
    argv = [*args, "--quick", "--seeds", "1", "--threads", "1"]
    quality.main([*argv, "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    return capsys.readouterr().out


@pytest.mark.slow
@needs_peft
def test_quality_quick_classify_writes_units_and_report_and_resumes(tmp_path, capsys):
    d = quality_data(tmp_path)
    flags = ["classify", "--model", str(d["bert"]), "--train-data", str(d["train"]), "--eval-data", str(d["test"])]
    flags += ["--rows", "24"]  # 2 steps of 16 and 8: the second step's loss depends on A
    first = run_quality(tmp_path, capsys, *flags)
    units = tmp_path / "results" / "quality" / "classify"
    systems = ("lorakit", "peft", "peft-init")
    assert sorted(p.name for p in units.iterdir()) == ["eval-s1.json", *sorted(f"train-{s}-s1.json" for s in systems)]
    evaluation = json.loads((units / "eval-s1.json").read_text())
    assert set(evaluation["systems"]) == set(systems)
    assert all(0 <= r["accuracy"] <= 1 for r in evaluation["systems"].values())
    trains = {s: json.loads((units / f"train-{s}-s1.json").read_text()) for s in systems}
    assert all(t["steps"] == 2 for t in trains.values())
    # the same rows, batches and head (seed 1), LoRA B = 0: the same first loss whatever A is
    assert trains["lorakit"]["loss_first"] == pytest.approx(trains["peft"]["loss_first"], abs=1e-4)
    # PEFT from lorakit's A: the second loss too (PEFT's own A are other draws of the same distribution)
    assert trains["peft-init"]["losses"] == pytest.approx(trains["lorakit"]["losses"], abs=1e-4)
    start = trains["peft-init"]["start"]
    assert start["A_modules"] == 4 and start["head"] == ["classifier.bias", "classifier.weight"]
    assert start["peft_own_A_max_abs_diff"] > 0
    report = json.loads((tmp_path / "results" / "quality-classify.json").read_text())
    assert report["units"] == ["eval-s1", *sorted(f"train-{s}-s1" for s in systems)] and report["machine"]["cpu"]
    md = (tmp_path / "results" / "quality-classify.md").read_text()
    assert "| lorakit (`train(cfg)`) | 1 |" in md and "machine:" in md and "python bench/quality.py classify" in md
    assert "seed 1: PEFT from lorakit's start has lorakit's loss within 0.001 for the first 2 of 2 steps" in md
    assert "ran 4 unit(s), 0 done before" in first

    before = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    again = run_quality(tmp_path, capsys, *flags)  # everything finished: nothing trains or evaluates again
    assert "ran 0 unit(s), 4 done before" in again
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == before

    (units / "eval-s1.json").unlink()  # as if killed during the evaluation: only that unit runs again
    third = run_quality(tmp_path, capsys, *flags)
    assert "ran 1 unit(s), 3 done before" in third and (units / "eval-s1.json").is_file()


@pytest.mark.slow
def test_quality_quick_e2e_scores_lorakit_and_marks_missing_cells(tmp_path, capsys):
    d = quality_data(tmp_path)
    flags = ["e2e", "--model", str(d["llama"]), "--train-data", str(d["e2e-train"]), "--eval-data", str(d["e2e-dev"])]
    run_quality(tmp_path, capsys, *flags, "--systems", "lorakit")
    units = tmp_path / "results" / "quality" / "e2e"
    assert sorted(p.name for p in units.iterdir()) == ["eval-greedy-s1.json", "train-lorakit-s1.json"]
    evaluation = json.loads((units / "eval-greedy-s1.json").read_text())
    assert set(evaluation["systems"]) == {"lorakit"} and {"bleu", "rouge_l", "loss"} <= set(
        evaluation["systems"]["lorakit"]
    )
    assert evaluation["command"][:2] == ["lorakit", "eval"] and "--no-repeat-ngram-size" in evaluation["command"]
    md = (tmp_path / "results" / "quality-e2e.md").read_text()
    assert "| beam | lorakit (`train(cfg)`) | 0 | not yet run |" in md

    # a lorakit unit trained by an older lorakit (other batches and weighting) is trained (and scored) again
    train = units / "train-lorakit-s1.json"
    old = json.loads(train.read_text())
    assert old["weighting"] == "random batches, every label token the same"
    train.write_text(json.dumps({k: v for k, v in old.items() if k != "weighting"}))
    again = run_quality(tmp_path, capsys, *flags, "--systems", "lorakit")
    assert "trained by an older lorakit (length-grouped batches, per-step mean); training it again" in again
    assert "ran 2 unit(s), 0 done before" in again
    assert json.loads(train.read_text())["weighting"] == "random batches, every label token the same"


def test_quality_verdict_judges_the_spread_and_pairs_the_seeds_at_the_digits_asked():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import quality

    lorakit = {110: 1.4079, 111: 1.4090, 112: 1.4085}
    trl = {110: 1.4101, 111: 1.4112, 112: 1.4100}
    # differences -0.0022, -0.0022, -0.0015: the means differ by 0.0020, beyond the larger spread (0.0007)
    text = quality.verdict(lorakit, trl, 4)
    assert text.startswith("-0.0020: BEYOND the spread (0.0007); paired over 3 seeds -0.0020 ± 0.0004")
    assert text.endswith("ahead on 0, behind on 3, sign-flip p = 0.25")
    # a loss: lower is better, so the seeds are counted as higher and lower, not ahead and behind
    assert quality.verdict(lorakit, trl, 4, ("higher", "lower")).endswith("higher on 0, lower on 3, sign-flip p = 0.25")
    assert quality.verdict({1: 74.0, 2: 74.2, 3: 73.1}, {1: 74.3, 2: 74.7, 3: 73.6}).startswith(
        "-0.43: within the spread (0.59)"
    )
    assert quality.verdict({1: 1.0}, trl) == "n/a (fewer than 2 seeds)"
    assert quality.sign_flip_p([1.0, -1.0, 2.0, 0.5]) == 8 / 16  # 8 of the 16 sign flips have |sum| >= 2.5
    assert quality.seed_scores({"loss": 1.40794, "bleu": 58.2178}) == "eval loss 1.4079, BLEU 58.2"
    assert quality.seed_scores({"loss": 0.51871, "accuracy": 0.7398}) == "eval loss 0.5187, accuracy 74.0%"
