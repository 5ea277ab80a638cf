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


# ---------------------------------------------------------------- crafted files


def with_module(meta, index=0, **changes):
    """The metadata with module record `index` changed (a value of DELETE removes the key)."""
    modules = json.loads(meta["modules"])
    modules[index].update(changes)
    modules[index] = {k: v for k, v in modules[index].items() if v is not DELETE}
    return {**meta, "modules": json.dumps(modules)}


DELETE = object()
DEEP = "[" * 100_000 + "]" * 100_000
C_ATTN = "module transformer.h.0.attn.c_attn: "
CRAFTED = {  # name: (change to the metadata, what the error says after "corrupt adapter metadata: ")
    "alpha nan": (dict(alpha="nan"), "alpha is nan, expected a finite number > 0"),
    "alpha inf": (dict(alpha="inf"), "alpha is inf, expected a finite number > 0"),
    "alpha 0": (dict(alpha="0"), "alpha is 0, expected a finite number > 0"),
    "alpha text": (dict(alpha="big"), "alpha is 'big', expected a finite number > 0"),
    "module alpha nan": (dict(module=dict(alpha=float("nan"))), C_ATTN + "alpha is nan, expected a finite number > 0"),
    "module alpha -inf": (dict(module=dict(alpha=float("-inf"))), C_ATTN + "alpha is -inf, expected"),
    "module alpha -1": (dict(module=dict(alpha=-1)), C_ATTN + "alpha is -1, expected a finite number > 0"),
    "module alpha text": (dict(module=dict(alpha="32")), C_ATTN + "alpha is '32', expected a finite number > 0"),
    "modules object": (dict(modules='{"a": 1}'), "modules is {'a': 1}, expected a non-empty list of module records"),
    "modules entry int": (dict(modules="[1]"), "modules[0] is 1, expected an object (a module record)"),
    "modules entry list": (dict(modules="[[1, 2]]"), "modules[0] is [1, 2], expected an object"),
    "zero modules": (dict(modules="[]"), "modules is [], expected a non-empty list of module records"),
    "modules deep": (dict(modules=DEEP), "modules is JSON nested too deeply"),
    "module missing alpha": (dict(module=dict(alpha=DELETE)), C_ATTN + "alpha is missing, expected a finite number"),
    "module missing path": (dict(module=dict(path=DELETE)), "modules[0].path is missing"),
    "module path int": (dict(module=dict(path=5)), "modules[0].path is 5, expected a name"),
    "module path spaces": (dict(module=dict(path="a b\nc")), r"modules[0].path is 'a b\nc', expected a name"),
    "dropout text": (dict(dropout="abc"), "dropout is 'abc', expected a number in [0, 1)"),
    "dropout 1": (dict(dropout="1"), "dropout is 1, expected a number in [0, 1)"),
    "module dropout text": (dict(module=dict(dropout="abc")), C_ATTN + "dropout is 'abc', expected a number in [0, 1)"),
    "module dropout 1": (dict(module=dict(dropout=1.0)), C_ATTN + "dropout is 1.0, expected a number in [0, 1)"),
    "module dropout -0.1": (dict(module=dict(dropout=-0.1)), C_ATTN + "dropout is -0.1, expected"),
    "rank 0": (dict(module=dict(rank=0)), C_ATTN + "rank is 0, expected an integer >= 1"),
    "rank -4": (dict(module=dict(rank=-4)), C_ATTN + "rank is -4, expected an integer >= 1"),
    "rank 4.0": (dict(module=dict(rank=4.0)), C_ATTN + "rank is 4.0, expected an integer >= 1"),
    "rank true": (dict(module=dict(rank=True)), C_ATTN + "rank is True, expected an integer >= 1"),
    "in_features 0": (
        dict(module=dict(in_features=0)),
        C_ATTN + "in_features is 0, expected an integer in [1, 16777216]",
    ),
    "out_features -1": (
        dict(module=dict(out_features=-1)),
        C_ATTN + "out_features is -1, expected an integer in [1, 16777216]",
    ),
    # The tensors do not bound a sliced module's output size; export would allocate it.
    "out_features huge": (dict(module=dict(out_features=2**24 + 1)), C_ATTN + "out_features is 16777217, expected"),
    "slices overlap": (
        dict(module=dict(slices=[["q", 0, 32], ["v", 16, 48]])),
        C_ATTN + "slices: q [0, 32) and v [16, 48) overlap, expected disjoint output ranges",
    ),
    "slice outside": (
        dict(module=dict(slices=[["q", 0, 32], ["v", 64, 200]])),
        C_ATTN + "slices[1] is ['v', 64, 200], expected a non-empty range [start, stop) in [0, 96)",
    ),
    "slice negative": (dict(module=dict(slices=[["q", -32, 0]])), C_ATTN + "slices[0] start is -32, expected"),
    "slice empty": (
        dict(module=dict(slices=[["q", 32, 32]])),
        C_ATTN + "slices[0] is ['q', 32, 32], expected a non-empty",
    ),
    "slice names twice": (
        dict(module=dict(slices=[["q", 0, 32], ["q", 64, 96]])),
        C_ATTN + "slices: slice name q appears twice",
    ),
    "slices object": (dict(module=dict(slices={"q": 1})), C_ATTN + "slices is {'q': 1}, expected null or a non-empty"),
    "slices empty list": (dict(module=dict(slices=[])), C_ATTN + "slices is [], expected null or a non-empty list"),
    "slice short": (
        dict(module=dict(slices=[["q", 0]])),
        C_ATTN + "slices[0] is ['q', 0], expected [name, start, stop]",
    ),
    "module twice": ("twice", "module transformer.h.0.attn.c_attn is listed twice, expected each module once"),
    "tensor name twice": ("clash", "tensor transformer.h.0.attn.c_attn.q.lora_A is named by two records"),
    "format_version text": (dict(format_version="x"), "format_version is 'x', expected an integer >= 1"),
    "format_version 1.5": (dict(format_version="1.5"), "format_version is 1.5, expected an integer >= 1"),
    "format_version 0": (dict(format_version="0"), "format_version is 0, expected an integer >= 1"),
    "rank text": (dict(rank="four"), "rank is 'four', expected an integer >= 1"),
    "rank nan": (dict(rank="nan"), "rank is nan, expected an integer >= 1"),
    "trained_params list": (dict(trained_params="[1]"), "trained_params is [1], expected an object of name -> shape"),
    "trained_params shape text": (
        dict(trained_params='{"a.weight": "xy"}'),
        "trained_params a.weight is 'xy', expected a shape",
    ),
    "trained_params shape 0": (
        dict(trained_params='{"a.weight": [0, 2]}'),
        "trained_params a.weight is [0, 2], expected",
    ),
    "trained_params shape -1": (dict(trained_params='{"a.weight": [-1]}'), "trained_params a.weight is [-1], expected"),
    "trained_params deep": (dict(trained_params=DEEP), "trained_params is JSON nested too deeply"),
    "sketch text": (dict(module=dict(sketch="abc")), C_ATTN + "sketch is 'abc', expected a list of finite numbers"),
    "sketch nan": (
        dict(module=dict(sketch=[0.5, float("nan")])),
        C_ATTN + "sketch[1] is nan, expected a finite number",
    ),
    "digest int": (dict(module=dict(digest=5)), C_ATTN + "digest is 5, expected a string"),
    "base_type list": (dict(module=dict(base_type=[1])), C_ATTN + "base_type is [1], expected a string"),
    "dtype null": (dict(module=dict(dtype=None)), C_ATTN + "dtype is None, expected a string"),
    "num_labels text": (dict(num_labels="x"), "num_labels is 'x', expected an integer >= 1"),
    "train_config list": (dict(train_config="[1]"), "train_config is [1], expected a JSON object"),
    "train_config deep": (dict(train_config=DEEP), "train_config is JSON nested too deeply"),
    "huge int": (dict(modules="[" + "9" * 5000 + "]"), "modules is not valid JSON (Exceeds the limit"),
}


def crafted(path, original, change):
    """Rewrite `path` with its metadata changed as CRAFTED says."""
    meta = dict(original.metadata)
    if change == "twice":
        modules = json.loads(meta["modules"])
        meta["modules"] = json.dumps(modules + modules[:1])
    elif change == "clash":  # a whole-module record whose tensor names are those of c_attn's q slice
        modules = json.loads(meta["modules"])
        meta["modules"] = json.dumps(
            modules + [{**modules[0], "path": "transformer.h.0.attn.c_attn.q", "slices": None}]
        )
    else:
        change = dict(change)
        if "module" in change:
            meta = with_module(meta, **change.pop("module"))
        meta.update(change)
    rewrite(path, original, metadata=meta)
    return path


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_metadata_is_one_error_naming_file_key_and_value(saved, name):
    _, path = saved
    change, message = CRAFTED[name]
    crafted(path, read_adapter(path), change)
    with pytest.raises(lorakit.LorakitError) as e:
        read_adapter(path)
    assert str(e.value).startswith(f"{path}: corrupt adapter metadata: ")
    assert message in str(e.value) and "\n" not in str(e.value)
    model = tiny_gpt2()
    with pytest.raises(lorakit.LorakitError, match="corrupt adapter metadata"):
        lorakit.load_adapter(model, path)
    assert not list(lorakit.lora_layers(model))  # refused before the model changed


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64])
def test_tensor_dtypes_other_than_fp32_fp16_bf16_are_refused(saved, dtype):
    _, path = saved
    original = read_adapter(path)
    name = "transformer.h.0.attn.c_attn.q.lora_A"
    rewrite(path, original, tensors={**original.tensors, name: original.tensors[name].to(dtype)})
    with pytest.raises(lorakit.LorakitError) as e:
        read_adapter(path)
    assert str(e.value) == (
        f"{path}: tensor {name} has dtype {dtype}, expected a float type: float32, float16 or bfloat16"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_read(saved, dtype):
    _, path = saved
    original = read_adapter(path)
    rewrite(path, original, tensors={k: t.to(dtype) for k, t in original.tensors.items()})
    assert all(t.dtype == dtype for t in read_adapter(path).tensors.values())
    lorakit.load_adapter(tiny_gpt2(), path)


GARBAGE_JSON = [None, True, -1, 0, 2.5, float("nan"), float("inf"), 10**30, "", "x", [], [1], {}, {"a": 1}, [[[[]]]]]
GARBAGE_TEXT = ["", " ", "x", "nan", "-inf", "0", "-1", "1e999", "[", "{}", "[]", "null", "[[1]]", DEEP[:3000]]


def test_no_crafted_value_raises_anything_but_a_lorakit_error(saved, tmp_path):
    """Every metadata key and module record key, set to each garbage value: read_adapter either accepts the file
    (and then inspect gives strict JSON and export writes a valid PEFT config) or raises a LorakitError."""
    from lorakit.deploy.peft import export_peft
    from lorakit.lora.inspect import inspect_adapter

    _, path = saved
    original = read_adapter(path)
    variants = [{**original.metadata, key: text} for key in original.metadata for text in GARBAGE_TEXT]
    variants += [{**original.metadata, "trained_params": json.dumps({"x.weight": v})} for v in GARBAGE_JSON]
    record = json.loads(original.metadata["modules"])[0]
    variants += [with_module(original.metadata, **{key: value}) for key in record for value in GARBAGE_JSON]
    variants += [{k: v for k, v in original.metadata.items() if k != key} for key in original.metadata]
    variants += [with_module(original.metadata, **{key: DELETE}) for key in record]
    items = [item for v in GARBAGE_JSON for item in ([v, 0, 32], ["q", v, 32], ["q", 0, v], v)]
    variants += [with_module(original.metadata, slices=[item]) for item in items]
    accepted = 0
    for metadata in variants:
        rewrite(path, original, metadata=metadata)
        try:
            read_adapter(path)
        except lorakit.LorakitError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            continue
        accepted += 1
        json.dumps(inspect_adapter(path, svd=True), allow_nan=False)
        out = export_peft(path, tmp_path / "peft", overwrite=True)
        json.loads((out / "adapter_config.json").read_text(), parse_constant=pytest.fail)
    assert 0 < accepted < len(variants)  # free-text keys (base_model, targets, ...) take any string


def test_cli_refuses_a_crafted_adapter_with_one_line(saved, tmp_path):
    """inspect, export, eval and merge all read the file first: exit 2, one `error:` line, nothing written."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    _, path = saved
    crafted(path, read_adapter(path), dict(module=dict(alpha=float("nan"))))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    commands = [
        ["inspect", str(path), "--json"],
        ["export", str(path), "--format", "peft", "--out", str(tmp_path / "peft")],
        ["eval", str(path), "--data", str(data)],
        ["merge", str(path), "--out", str(tmp_path / "merged")],
    ]
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.splitlines() == [
            f"error: {path}: corrupt adapter metadata: {C_ATTN}alpha is nan, expected a finite number > 0"
        ]
        assert result.stdout == "" and "Traceback" not in result.output
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()


def test_tensor_names_from_the_file_are_shown_on_one_line(saved):
    _, path = saved
    original = read_adapter(path)
    rewrite(path, original, tensors={**original.tensors, "evil\nname\r": torch.zeros(1)})
    with pytest.raises(lorakit.LorakitError) as e:
        read_adapter(path)
    assert str(e.value) == rf"{path}: unexpected tensors 'evil\nname\r' not named in its metadata"
