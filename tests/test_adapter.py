"""The adapter file: bit-exact round trip, size, metadata, strict loading, task switching."""

import hashlib
import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import probe_ids, randomize_lora, tiny_gpt2, tiny_llama

import lorakit
from lorakit.files import atomic_dir, write_atomic
from lorakit.lora.adapter import read_adapter


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=probe_ids() if ids is None else ids).logits


def trained(build=tiny_gpt2, targets="q,v", seed=1, **kw):
    model = build(**kw)
    lorakit.add_lora(model, targets, rank=4, alpha=32, dropout=0.1)
    randomize_lora(model, seed=seed)
    return model


@pytest.fixture
def saved(tmp_path):
    model = trained()
    path = lorakit.save_adapter(model, tmp_path / "a.safetensors", base_model="tiny-gpt2")
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    fresh = tiny_gpt2()
    names = lorakit.load_adapter(fresh, path)
    assert names == [
        "transformer.h.0.attn.c_attn.q",
        "transformer.h.0.attn.c_attn.v",
        "transformer.h.1.attn.c_attn.q",
        "transformer.h.1.attn.c_attn.v",
    ]
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(model), logits(fresh))
    layer = fresh.transformer.h[0].attn.c_attn
    assert (layer.rank, layer.alpha, layer.dropout_p) == (4, 32.0, 0.1)


def test_file_holds_only_a_b_and_its_size_is_params_times_four_plus_header(saved):
    model, path = saved
    tensors = load_file(path)
    assert sorted(tensors) == sorted(
        f"transformer.h.{i}.attn.c_attn.{s}.lora_{m}" for i in (0, 1) for s in "qv" for m in "AB"
    )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert os.path.getsize(path) == 8 + header + 4 * params


def test_metadata_describes_the_adapter(saved):
    _, path = saved
    meta = read_adapter(path).metadata
    assert meta["format"] == "lorakit-adapter" and meta["format_version"] == "1"
    assert meta["lorakit_version"] == lorakit.__version__
    assert (meta["rank"], meta["alpha"], meta["dropout"], meta["targets"]) == ("4", "32", "0.1", "q,v")
    assert meta["base_model"] == "tiny-gpt2" and meta["base_class"] == "GPT2LMHeadModel"
    assert len(meta["base_fingerprint"]) == 16
    modules = json.loads(meta["modules"])
    assert modules[0]["path"] == "transformer.h.0.attn.c_attn" and modules[0]["slices"] == [["q", 0, 32], ["v", 64, 96]]
    assert modules[0]["base_type"] == "Conv1D" and modules[0]["in_features"] == 32


def test_merged_model_saves_the_same_adapter(saved, tmp_path):
    model, path = saved
    lorakit.merge_adapter(model)
    again = read_adapter(lorakit.save_adapter(model, tmp_path / "b.safetensors", base_model="tiny-gpt2"))
    first = read_adapter(path)
    assert again.metadata == first.metadata  # fingerprint taken from the pristine base
    assert again.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)


def test_foreign_base_is_refused_and_model_left_plain(saved):
    _, path = saved
    other = tiny_gpt2(seed=5)
    with pytest.raises(lorakit.LorakitError, match="trained on another base"):
        lorakit.load_adapter(other, path)
    assert not list(lorakit.lora_layers(other))
    lorakit.load_adapter(other, path, verify_base=False)  # explicit opt-out
    assert len(list(lorakit.lora_layers(other))) == 2


def test_other_shapes_and_architectures_are_refused(saved):
    _, path = saved
    with pytest.raises(lorakit.LorakitError, match="adapter for another base"):
        lorakit.load_adapter(tiny_gpt2(n_embd=64), path)
    with pytest.raises(lorakit.LorakitError, match="not found in this model"):
        lorakit.load_adapter(tiny_llama(), path)


def test_same_weights_in_bf16_are_accepted_by_the_sketch(saved):
    _, path = saved
    base = tiny_gpt2().to(torch.bfloat16)
    lorakit.load_adapter(base, path)
    assert base.transformer.h[0].attn.c_attn.lora_A[0].dtype == torch.float32


def test_digests_are_blake2b_of_the_weight_bytes_and_old_sha256_ones_still_match(saved):
    _, path = saved
    original = read_adapter(path)
    weight = tiny_gpt2().transformer.h[0].attn.c_attn.weight.detach()
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    prefix = f"{weight.dtype}:{tuple(weight.shape)}:".encode()
    assert original.modules[0].digest == "blake2b:" + hashlib.blake2b(prefix + raw, digest_size=32).hexdigest()

    # An adapter written by lorakit 0.1 records bare sha256 digests: still checked exactly, still accepted.
    modules = json.loads(original.metadata["modules"])
    modules[0]["digest"] = hashlib.sha256(prefix + raw).hexdigest()
    rewrite(path, original, metadata={**original.metadata, "modules": json.dumps(modules)})
    lorakit.load_adapter(tiny_gpt2(), path)
    modules[0]["digest"] = hashlib.sha256(prefix + raw[:-1] + b"x").hexdigest()  # one byte off
    rewrite(path, original, metadata={**original.metadata, "modules": json.dumps(modules)})
    with pytest.raises(lorakit.LorakitError, match="trained on another base"):
        lorakit.load_adapter(tiny_gpt2(), path)


def test_task_switching_on_a_wrapped_model(tmp_path):
    one, two = trained(seed=1), trained(seed=2)
    p1 = lorakit.save_adapter(one, tmp_path / "1.safetensors")
    p2 = lorakit.save_adapter(two, tmp_path / "2.safetensors")
    model = tiny_gpt2()
    lorakit.load_adapter(model, p1)
    assert torch.equal(logits(model), logits(one))
    lorakit.merge_adapter(model)
    lorakit.load_adapter(model, p2)  # unmerges the first, swaps A/B
    assert not any(layer.merged for _, layer in lorakit.lora_layers(model))
    assert torch.allclose(logits(model), logits(two), atol=1e-5)
    mlp = trained(targets="mlp")
    p3 = lorakit.save_adapter(mlp, tmp_path / "3.safetensors")
    with pytest.raises(lorakit.LorakitError, match="load it onto a plain base"):
        lorakit.load_adapter(model, p3)
    other_rank = tiny_gpt2()
    lorakit.add_lora(other_rank, "q,v", rank=2)
    with pytest.raises(lorakit.LorakitError, match="another rank or slices"):
        lorakit.load_adapter(other_rank, p1)


def rewrite(path, original, tensors=None, metadata=None):
    save_file(
        original.tensors if tensors is None else tensors,
        path,
        metadata=original.metadata if metadata is None else metadata,
    )


def test_missing_unexpected_and_bad_tensors(saved):
    _, path = saved
    original = read_adapter(path)
    t = dict(original.tensors)
    name = "transformer.h.1.attn.c_attn.v.lora_B"
    cases = [
        ({k: v for k, v in t.items() if k != name}, "missing tensors transformer.h.1.attn.c_attn.v.lora_B"),
        ({**t, "extra.lora_A": torch.zeros(1)}, "unexpected tensors extra.lora_A"),
        ({**t, name: torch.zeros(3, 4)}, r"has shape \(3, 4\), expected \(32, 4\)"),
        ({**t, name: torch.zeros(32, 4, dtype=torch.int32)}, "expected a float type"),
        ({**t, name: torch.full((32, 4), float("nan"))}, "NaN or inf"),
    ]
    for tensors, message in cases:
        rewrite(path, original, tensors=tensors)
        with pytest.raises(lorakit.LorakitError, match=message):
            lorakit.load_adapter(tiny_gpt2(), path)


def test_bad_metadata(saved):
    _, path = saved
    original = read_adapter(path)
    meta = dict(original.metadata)
    for metadata, message in [
        ({**meta, "modules": "[{"}, "corrupt adapter metadata"),
        ({k: v for k, v in meta.items() if k != "rank"}, "corrupt adapter metadata"),
        ({**meta, "format_version": "9"}, "format version 9 is newer"),
        ({"format": "pt"}, "without lorakit adapter metadata"),
    ]:
        rewrite(path, original, metadata=metadata)
        with pytest.raises(lorakit.LorakitError, match=message):
            read_adapter(path)


def test_unreadable_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(lorakit.LorakitError, match="no such adapter file"):
        read_adapter(tmp_path / "nope.safetensors")
    with pytest.raises(lorakit.LorakitError, match="it is a folder"):
        read_adapter(tmp_path)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(lorakit.LorakitError, match="not a readable safetensors file"):
        read_adapter(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not tensors\n")
    with pytest.raises(lorakit.LorakitError, match="not a readable safetensors file"):
        read_adapter(text)
    pickle = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(lorakit.LorakitError, match="not a readable safetensors file"):
        read_adapter(pickle)  # never unpickled
    peft_like = tmp_path / "adapter_model.safetensors"
    save_file({"x": torch.zeros(1)}, peft_like)
    with pytest.raises(lorakit.LorakitError, match="lorakit import"):
        read_adapter(peft_like)


def test_save_without_layers_is_refused(tmp_path):
    with pytest.raises(lorakit.LorakitError, match="no LoRA layers"):
        lorakit.save_adapter(tiny_gpt2(), tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_trained_head_is_saved_loaded_and_checked(tmp_path):
    from tiny import tiny_bert

    model = tiny_bert(num_labels=3)
    lorakit.add_lora(model, "q,v")
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.normal_()
    model.classifier.requires_grad_(True)  # a new head, trained in full
    path = lorakit.save_adapter(model, tmp_path / "a.safetensors")
    adapter = read_adapter(path)
    assert adapter.trained_params == {"classifier.weight": (3, 32), "classifier.bias": (3,)}
    assert adapter.metadata["num_labels"] == "3" and adapter.metadata["base_class"] == "BertForSequenceClassification"
    fresh = tiny_bert(num_labels=3)  # same base weights, another (random) head
    lorakit.load_adapter(fresh, path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(lorakit.LorakitError, match="holds a trained classifier.weight of shape"):
        lorakit.load_adapter(tiny_bert(num_labels=2), path)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; files lorakit writes get 0666/0777 less the umask, as open() gives."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.bin", b"x")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
