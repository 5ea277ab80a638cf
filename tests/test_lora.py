"""The LoRA layer: exact start, merge/unmerge, fused slices, dtypes, disabling."""

import pytest
import torch
import torch.nn.functional as F
from tiny import probe_ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.lora.layer import LoRALayer, Slice, all_finite


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "build,targets",
    [(tiny_gpt2, "q,v"), (tiny_gpt2, "all-linear"), (tiny_llama, "all-linear"), (tiny_bert, "q,k,v,o,mlp")],
)
def test_fresh_adapter_gives_base_output_exactly(build, targets):
    base, model = build(), build()
    ids = probe_ids()
    lorakit.add_lora(model, targets, rank=4, alpha=32, dropout=0.1)
    assert torch.equal(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("build,targets", [(tiny_gpt2, "q,v"), (tiny_gpt2, "o,mlp"), (tiny_llama, "q,v,o,mlp")])
def test_merged_equals_unmerged_and_unmerge_restores(build, targets):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = probe_ids()
    lorakit.add_lora(model, targets, rank=4, alpha=32)
    randomize_lora(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(build(), ids))  # the update matters
    lorakit.merge_adapter(model)
    lorakit.merge_adapter(model)  # idempotent
    assert all(layer.merged for _, layer in lorakit.lora_layers(model))
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    lorakit.unmerge_adapter(model)
    lorakit.unmerge_adapter(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, value in before.items():
        assert torch.allclose(after[name], value, atol=1e-6), name


def test_q_v_slices_leave_k_bit_identical():
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v", rank=4, alpha=32)
    randomize_lora(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    out, base = layer(x), layer.base(x)
    n = 32
    assert torch.equal(out[..., n : 2 * n], base[..., n : 2 * n])  # k
    assert not torch.allclose(out[..., :n], base[..., :n])  # q
    assert not torch.allclose(out[..., 2 * n :], base[..., 2 * n :])  # v
    layer.merge()
    assert torch.equal(layer(x)[..., n : 2 * n], base[..., n : 2 * n])  # k rows of the merged weight untouched


def reference_forward(layer, x):
    """The LoRA layer as plain autograd ops: base(x) + scaling * B_i A_i dropout(x) on each output slice."""
    out = layer.base(x)
    h = layer.dropout(x)
    parts = []
    for s, a, b in zip(layer.slices, layer.lora_A, layer.lora_B):
        start, stop = (0, out.shape[-1]) if s.name is None else (s.start, s.stop)
        parts.append((start, stop, F.linear(F.linear(h.to(a.dtype), a) * layer.scaling, b).to(out.dtype)))
    columns, at = [], 0
    for start, stop, part in sorted(parts, key=lambda p: p[0]):
        columns += [out[..., at:start], out[..., start:stop] + part]
        at = stop
    return torch.cat([*columns, out[..., at:]], dim=-1)


@pytest.mark.parametrize("base_type", ["conv1d", "linear"])
@pytest.mark.parametrize("slices", [None, "qv"])
@pytest.mark.parametrize("precision", ["fp32", "fp32-dropout", "fp32-input-no-grad", "bf16-base", "autocast-bf16"])
def test_forward_and_gradients_equal_plain_autograd(base_type, slices, precision):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(24, 8) if base_type == "conv1d" else nn.Linear(8, 24, bias=slices is None)
    if precision == "bf16-base":
        base = base.to(torch.bfloat16)
    chosen = None if slices is None else [Slice("q", 0, 8), Slice("v", 16, 24)]
    layer = LoRALayer(base, rank=2, alpha=4, slices=chosen, dropout=0.5 if precision == "fp32-dropout" else 0.0)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(3, 5, 8, dtype=base.weight.dtype)
    grad = torch.randn(3, 5, 24)
    results = []
    for forward in (layer.forward, lambda x: reference_forward(layer, x)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(precision != "fp32-input-no-grad")
        torch.manual_seed(1)  # the same dropout mask for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast-bf16"):
            # fp32: the hand-written _LoRALinear; otherwise autograd over the generic ops.
            assert layer._fusable(xi) == precision.startswith("fp32")
            out = forward(xi)
        out.backward(grad.to(out.dtype))
        results.append([out, xi.grad, *(p.grad for p in layer.parameters() if p.requires_grad)])
    fp32 = precision.startswith("fp32")
    for mine, expected in zip(*results):
        if expected is None:
            assert mine is None
            continue
        assert mine.dtype == expected.dtype and mine.shape == expected.shape
        assert torch.allclose(mine.float(), expected.float(), rtol=1e-5 if fp32 else 2e-2, atol=1e-5 if fp32 else 2e-2)
    assert all(g is not None and g.dtype == torch.float32 for g in results[0][2:])


def test_gpt2_medium_q_v_rank4_has_393216_parameters_from_config_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16))
    names = lorakit.add_lora(model, "q,v", rank=4, alpha=32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 24 * 2 * (4 * 1024 + 1024 * 4) == 393_216
    assert len(names) == 48 and names[0] == "transformer.h.0.attn.c_attn.q"


def test_base_frozen_lora_fp32_on_bf16_base():
    model = tiny_llama().to(torch.bfloat16)
    lorakit.add_lora(model, "q,v", rank=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A[0].dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    randomize_lora(model)
    out = model(input_ids=probe_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.lora_B[0].grad is not None and layer.base.weight.grad is None


def test_conv1d_layout_is_read_from_the_type():
    model = tiny_gpt2()
    lorakit.add_lora(model, "mlp", rank=2, alpha=2)
    fc = model.transformer.h[0].mlp.c_fc
    assert (fc.in_features, fc.out_features) == (32, 128)  # Conv1D weight is stored (32, 128)
    randomize_lora(model)
    x = torch.randn(3, 32)
    expected = fc.base(x) + x @ fc.delta_weight(0).T
    assert torch.allclose(fc(x), expected, atol=1e-5)


def test_disable_gives_base_output_and_dropout_only_on_lora_path():
    model, base = tiny_gpt2(), tiny_gpt2()
    ids = probe_ids()
    lorakit.add_lora(model, "q,v", rank=4, alpha=32, dropout=0.5)
    model.train()
    base.train()
    for m in (model, base):  # base dropout off, as in the paper's GPT-2
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    for _, layer in lorakit.lora_layers(model):
        layer.dropout.p = 0.5
    assert torch.equal(logits(model, ids), logits(base, ids))  # B = 0: dropout on the LoRA input changes nothing
    randomize_lora(model)
    lorakit.set_adapter_enabled(model, False)
    assert torch.equal(logits(model, ids), logits(base, ids))
    lorakit.set_adapter_enabled(model, True)
    assert not torch.equal(logits(model, ids), logits(base, ids))


def test_dropout_zero_uses_identity():
    layer = LoRALayer(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.0)
    assert isinstance(layer.dropout, nn.Identity)


def test_delta_weight_is_scaling_b_a():
    layer = LoRALayer(nn.Linear(6, 10), rank=3, alpha=12)
    with torch.no_grad():
        layer.lora_B[0].normal_()
    a, b = layer.lora_A[0], layer.lora_B[0]
    assert torch.allclose(layer.delta_weight(0), 4.0 * b @ a)
    x = torch.randn(5, 6)
    assert torch.allclose(layer(x), layer.base(x) + 4.0 * x @ a.T @ b.T, atol=1e-5)


def test_merge_refuses_non_finite_update_and_leaves_weight_unchanged():
    layer = LoRALayer(nn.Linear(4, 4), rank=2, alpha=2)
    before = layer.base.weight.clone()
    with torch.no_grad():
        layer.lora_A[0].fill_(1e30)
        layer.lora_B[0].fill_(1e30)
    with pytest.raises(lorakit.LorakitError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base.weight, before) and not layer.merged


def test_merge_refuses_an_update_that_overflows_the_weight_dtype():
    layer = LoRALayer(nn.Linear(4, 4).half(), rank=2, alpha=2)
    before = layer.base.weight.clone()
    with torch.no_grad():
        layer.lora_A[0].fill_(300.0)  # B A = 2 * 300 * 300 = 180,000: finite in fp32, inf in fp16
        layer.lora_B[0].fill_(300.0)
    with pytest.raises(lorakit.LorakitError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base.weight, before) and not layer.merged


def test_all_finite_is_exact_even_when_the_sum_overflows():
    big = torch.full((4, 4), 3e38)
    assert all_finite(big)  # the float32 sum is inf; the elementwise test decides
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.randn(64, 64)
        t[5, 7] = bad
        assert not all_finite(t) and not all_finite(t.half())
    assert all_finite(torch.randn(64, 64).bfloat16())


def test_bad_layer_arguments():
    with pytest.raises(lorakit.LorakitError, match="rank must be a positive integer"):
        LoRALayer(nn.Linear(4, 4), rank=0, alpha=1)
    with pytest.raises(lorakit.LorakitError, match="dropout must be in"):
        LoRALayer(nn.Linear(4, 4), rank=1, alpha=1, dropout=1.5)
    with pytest.raises(lorakit.LorakitError, match="cannot wrap Embedding"):
        LoRALayer(nn.Embedding(4, 4), rank=1, alpha=1)
    with pytest.raises(lorakit.LorakitError, match="outside output size"):
        LoRALayer(nn.Linear(4, 4), rank=1, alpha=1, slices=[Slice("q", 2, 6)])


def test_add_lora_twice_and_disable_merged_are_refused():
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v")
    with pytest.raises(lorakit.LorakitError, match="already has LoRA layers"):
        lorakit.add_lora(model, "o")
    lorakit.merge_adapter(model)
    with pytest.raises(lorakit.LorakitError, match="unmerge it first"):
        lorakit.set_adapter_enabled(model, False)


def test_linear8bitlt_base_is_wrapped_and_merge_refused():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    q = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(lin.state_dict())
    layer = LoRALayer(q, rank=2, alpha=4)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), q(x))  # B = 0
    assert layer.lora_A[0].dtype == torch.float32 and layer.base_dtype == "int8"
    with torch.no_grad():
        layer.lora_B[0].normal_()
    assert torch.allclose(layer(x), q(x) + x @ layer.delta_weight(0).T, atol=1e-4)
    with pytest.raises(lorakit.LorakitError, match="cannot merge into a quantized"):
        layer.merge()
