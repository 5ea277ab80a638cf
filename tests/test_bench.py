"""The benchmark scripts still run: each one's `--quick` smoke test, end to end, in a child process.

They time nothing here; what is checked is that they run, that the systems they compare agree where they
must (the same first-step loss, an exact merge) and that the JSON they write holds every system.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the dev extra)")
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
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the dev extra)")
def test_lora_layer_quick_times_base_peft_and_lorakit(tmp_path):
    data = run_script("lora_layer", tmp_path)
    by_case: dict[str, set] = {}
    for r in data["results"]:
        by_case.setdefault(r["case"], set()).add(r["system"])
        assert r["median_ms"] > 0
    assert by_case["quick c_attn"] == {"base", "peft", "lorakit"}
    assert by_case["quick c_attn q,v"] == {"base", "lorakit"}  # PEFT has no q,v slices of a fused projection
