"""lorakit inspect: exact sizes, update norms and spectra, subspace similarity, CLI output."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from tiny import randomize_lora, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.lora.inspect import effective_rank, inspect_adapter, update_singular_values

SPEC_KEYS = {"trainable_params", "file_bytes", "rank", "alpha", "base_model", "modules"}
SPEC_MODULE_KEYS = {"name", "rank", "params"}


def _saved(model, path, targets: str = "q,v", rank: int = 4, alpha: float = 32.0, random: bool = True):
    lorakit.add_lora(model, targets, rank=rank, alpha=alpha)
    if random:
        randomize_lora(model)
    lorakit.save_adapter(model, path)
    return path


def _set_lora(model, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """Give every A/B pair of the model these values (b: keep B when None)."""
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for lora_a, lora_b in zip(layer.lora_A, layer.lora_B, strict=True):
                lora_a.copy_(a)
                if b is not None:
                    lora_b.copy_(b[: lora_b.shape[0]])


def _dense_update(path, name: str) -> torch.Tensor:
    """scaling * B A of one A/B pair, formed densely in float64: (out_slice, in)."""
    adapter = lorakit.read_adapter(path)
    info = next(m for m in adapter.modules if name in m.names)
    a = adapter.tensors[f"{name}.lora_A"].double()
    b = adapter.tensors[f"{name}.lora_B"].double()
    return info.alpha / info.rank * (b @ a)


def _orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k) with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
    model = tiny_gpt2()
    path = _saved(model, tmp_path_factory.mktemp("gpt2") / "adapter.safetensors")
    return path, model


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_counts_and_sizes_are_exact(tmp_path, build):
    model = build()
    path = _saved(model, tmp_path / "a.safetensors", rank=4)
    report = inspect_adapter(path)
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * hidden // cfg.num_attention_heads
    r = 4
    # per layer: q (r*in + out_q*r) and v (r*in + out_v*r); GPT-2's fused c_attn slices are hidden wide
    assert report["trainable_params"] == layers * ((r * hidden + hidden * r) + (r * hidden + kv * r))
    assert report["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["trainable_params"] == sum(m["params"] for m in report["modules"])
    assert report["file_bytes"] == os.path.getsize(path)
    assert report["tensor_bytes"] == 4 * report["trainable_params"]
    assert report["tensor_bytes"] == sum(m["bytes"] for m in report["modules"])
    assert report["header_bytes"] == report["file_bytes"] - report["tensor_bytes"] > 0
    assert SPEC_KEYS <= report.keys()
    assert len(report["modules"]) == 2 * layers
    for m in report["modules"]:
        assert SPEC_MODULE_KEYS <= m.keys()
        assert m["rank"] == r and m["scaling"] == pytest.approx(32 / 4)
    assert (report["rank"], report["alpha"], report["targets"]) == (4, 32.0, "q,v")
    json.dumps(report)  # serializable as is


def test_fused_slices_are_one_entry_each(gpt2_adapter):
    path, model = gpt2_adapter
    modules = {m["name"]: m for m in inspect_adapter(path)["modules"]}
    hidden = model.config.n_embd
    q, v = modules["transformer.h.0.attn.c_attn.q"], modules["transformer.h.0.attn.c_attn.v"]
    assert q["path"] == v["path"] == "transformer.h.0.attn.c_attn"
    assert (q["slice"], v["slice"]) == ([0, hidden], [2 * hidden, 3 * hidden])
    assert (q["in_features"], q["out_features"]) == (hidden, 3 * hidden)
    assert q["params"] == 4 * hidden + hidden * 4


def test_update_norm_and_singular_values_match_dense(gpt2_adapter):
    path, _ = gpt2_adapter
    for m in inspect_adapter(path, svd=True)["modules"]:
        dense = _dense_update(path, m["name"])
        assert m["update_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)
        expected = torch.linalg.svdvals(dense)[: m["rank"]]
        assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), expected, rtol=1e-6)
        assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
        assert 1.0 <= m["effective_rank"] <= m["rank"]


def test_fresh_adapter_has_zero_update(tmp_path):
    path = _saved(tiny_llama(), tmp_path / "fresh.safetensors", random=False)  # B = 0
    for m in inspect_adapter(path, svd=True)["modules"]:
        assert m["update_norm"] == 0.0
        assert m["singular_values"] == [0.0] * 4
        assert m["effective_rank"] == 0.0


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    p = torch.tensor([0.75, 0.25])  # exp(H) by hand
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-float((p * p.log()).sum())))


def test_singular_values_of_constructed_update():
    out, inp, r = 40, 24, 4
    u, v = _orthonormal(out, r, seed=1), _orthonormal(inp, r, seed=2)  # (out, r), (in, r)
    d = torch.tensor([4.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    s = update_singular_values(v.T, u * d, scaling=2.0)  # B A = U diag(d) V^T
    assert torch.allclose(s, 2.0 * d, rtol=1e-10)
    assert effective_rank(update_singular_values(v.T, u, 1.0)) == pytest.approx(r)  # equal values
    one = torch.zeros(r, dtype=torch.float64)
    one[0] = 3.0
    assert effective_rank(update_singular_values(v.T, u * one, 1.0)) == pytest.approx(1.0, abs=1e-9)


def test_singular_values_when_a_side_is_narrower_than_rank():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 24, generator=g), torch.randn(2, 4, generator=g)  # out = 2 < r = 4
    s = update_singular_values(a, b, scaling=0.5)
    dense = torch.linalg.svdvals(0.5 * b.double() @ a.double())  # (2,)
    assert s.shape == (4,) and torch.allclose(s[:2], dense, rtol=1e-10) and s[2:].eq(0).all()


def test_effective_rank_through_the_file(tmp_path):
    model = tiny_llama()
    lorakit.add_lora(model, "q", rank=4, alpha=4)
    hidden = model.config.hidden_size
    _set_lora(model, _orthonormal(hidden, 4, 3).T.float(), _orthonormal(hidden, 4, 4).float())
    lorakit.save_adapter(model, tmp_path / "eq.safetensors")
    for m in inspect_adapter(tmp_path / "eq.safetensors", svd=True)["modules"]:
        assert m["singular_values"] == pytest.approx([1.0] * 4, rel=1e-5)
        assert m["effective_rank"] == pytest.approx(4.0, rel=1e-6)
        assert m["update_norm"] == pytest.approx(2.0, rel=1e-5)


def test_compare_with_itself(gpt2_adapter):
    path, _ = gpt2_adapter
    compare = inspect_adapter(path, compare=path)["compare"]
    assert compare["other"] == str(path)
    assert len(compare["modules"]) == 4 and compare["only_here"] == compare["only_other"] == []
    for m in compare["modules"]:
        assert m["rank"] == m["other_rank"] == 4
        assert m["phi"] == pytest.approx(1.0) and m["phi_top"] == pytest.approx(1.0)
        assert 0.0 <= m["phi"] <= 1.0


def _llama_with_a(path, a: torch.Tensor):
    model = tiny_llama()
    lorakit.add_lora(model, "q", rank=a.shape[0], alpha=8)
    _set_lora(model, a)
    lorakit.save_adapter(model, path)
    return path


def test_compare_orthogonal_subspaces_is_zero(tmp_path):
    eye = torch.eye(32)
    one = _llama_with_a(tmp_path / "one.safetensors", eye[:4])  # rows e0..e3
    two = _llama_with_a(tmp_path / "two.safetensors", eye[4:8])  # rows e4..e7
    for m in inspect_adapter(one, compare=two)["compare"]["modules"]:
        assert m["phi"] == pytest.approx(0.0, abs=1e-12) and m["phi_top"] == pytest.approx(0.0, abs=1e-12)


def test_compare_rank2_inside_rank4(tmp_path):
    eye = torch.eye(32)
    # rank 4: distinct singular values 4 > 3 > 2 > 1 along e0..e3, so its top-2 directions are e0, e1
    a4 = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ eye[:4]
    # rank 2: top direction (e0 + e2)/sqrt(2) (value 2), then e1 (value 1), both inside span(e0..e3)
    a2 = torch.stack([2.0 * (eye[0] + eye[2]) / math.sqrt(2), eye[1]])
    small = _llama_with_a(tmp_path / "r2.safetensors", a2)
    big = _llama_with_a(tmp_path / "r4.safetensors", a4)
    # phi(2, 2) = (|u1.e0|^2 + |u1.e1|^2 + |u2.e0|^2 + |u2.e1|^2) / 2 = (1/2 + 0 + 0 + 1) / 2
    # phi(1, 1) = |u1.e0|^2 = 1/2
    for m in inspect_adapter(small, compare=big)["compare"]["modules"]:
        assert (m["rank"], m["other_rank"]) == (2, 4)
        assert m["phi"] == pytest.approx(0.75, abs=1e-9)
        assert m["phi_top"] == pytest.approx(0.5, abs=1e-9)


def test_compare_lists_unmatched_names(tmp_path, gpt2_adapter):
    path, _ = gpt2_adapter
    q_only = _saved(tiny_gpt2(), tmp_path / "q.safetensors", targets="q", rank=2)
    compare = inspect_adapter(path, compare=q_only)["compare"]
    assert [m["name"] for m in compare["modules"]] == [f"transformer.h.{i}.attn.c_attn.q" for i in range(2)]
    assert compare["only_here"] == [f"transformer.h.{i}.attn.c_attn.v" for i in range(2)]
    assert compare["only_other"] == []
    reverse = inspect_adapter(q_only, compare=path)["compare"]
    assert reverse["only_here"] == [] and reverse["only_other"] == compare["only_here"]


def test_cli_json_matches_library(gpt2_adapter):
    path, _ = gpt2_adapter
    result = CliRunner().invoke(app, ["inspect", str(path), "--json", "--svd"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == inspect_adapter(path, svd=True)
    assert printed["trainable_params"] == 1024 and printed["file_bytes"] == os.path.getsize(path)


@pytest.mark.parametrize("flags", [[], ["--svd"], ["--compare", "SELF"], ["--svd", "--compare", "SELF"]])
def test_cli_tables_run(gpt2_adapter, flags):
    path, _ = gpt2_adapter
    args = ["inspect", str(path), *[str(path) if f == "SELF" else f for f in flags]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_missing_files_are_named(tmp_path, gpt2_adapter):
    path, _ = gpt2_adapter
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LorakitError, match="nope.safetensors"):
        inspect_adapter(missing)
    with pytest.raises(LorakitError, match="nope.safetensors"):
        inspect_adapter(path, compare=missing)
    result = CliRunner().invoke(app, ["inspect", str(path), "--compare", str(missing)])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "nope.safetensors" in result.stderr


def _tampered(path, tmp_path, **module_changes):
    """A copy of the adapter at `path` with every module record changed, and the top-level alpha set to match."""
    from safetensors.torch import save_file

    original = lorakit.read_adapter(path)
    modules = [{**m, **module_changes} for m in json.loads(original.metadata["modules"])]
    meta = {**original.metadata, "modules": json.dumps(modules)}
    if "alpha" in module_changes:
        meta["alpha"] = str(module_changes["alpha"])
    out = tmp_path / "tampered.safetensors"
    save_file(original.tensors, out, metadata=meta)
    return out


def test_cli_json_never_prints_nan(gpt2_adapter, tmp_path):
    path, _ = gpt2_adapter
    bad = _tampered(path, tmp_path, alpha=float("nan"))
    for args in (["inspect", str(bad), "--json"], ["inspect", str(path), "--json", "--compare", str(bad)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [
            f"error: {bad}: corrupt adapter metadata: alpha is nan, expected a finite number > 0"
        ]


def test_update_beyond_float_range_is_refused(gpt2_adapter, tmp_path):
    """A finite but absurd alpha whose update overflows: an error, not `Infinity` in the JSON."""
    path, _ = gpt2_adapter
    bad = _tampered(path, tmp_path, alpha=1.7e308)
    with pytest.raises(
        LorakitError, match=r"tampered.safetensors: transformer.h.0.attn.c_attn.q: the update .* overflows"
    ):
        inspect_adapter(bad)
