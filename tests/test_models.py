"""Loading bases: hub models and datasets without a network, recorded base paths, model/task mismatches, long
rows, pickled weights, remote code, CPU threads and third-party warnings. Each bad case is one `error:` line."""

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny import VOCAB, learnable_rows, save_model, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer, write_jsonl
from typer.testing import CliRunner

import lorakit
import lorakit.evaluation.evaluate
import lorakit.hub
import lorakit.training.distributed
import lorakit.training.loop
from lorakit.cli import app
from lorakit.lora.adapter import read_adapter

runner = CliRunner()
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gpt2-medium-e2e.yaml"
NOT_CACHED = "lorakit-tests/not-cached-model"
NETWORK_DOWN = "https://huggingface.co cannot be reached (connection refused)"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """No test touches the network or the user's Hugging Face cache: an empty cache, and a hub that refuses."""
    import huggingface_hub.constants

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "hf-cache").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    import transformers.utils.hub

    # transformers < 5 keeps its own copy of the cache folder, read when imported
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(tmp_path / "hf-cache"), raising=False)
    monkeypatch.setattr(lorakit.hub, "unreachable_reason", lambda: NETWORK_DOWN)


def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the process would have it from its start (the libraries read it when imported);
    the hub is never asked."""
    import datasets.config
    import huggingface_hub.constants

    def no_probe():
        raise AssertionError("the hub was probed although HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # datasets < 2.20: no such name
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(lorakit.hub, "unreachable_reason", no_probe)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": save_model(tiny_gpt2(), root / "gpt2"),
        "llama": save_model(tiny_llama(), root / "llama"),
        "bert": save_model(tiny_bert(), root / "bert"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", learnable_rows(6, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_rows(4, seed=1)),
    }


@pytest.fixture(scope="module")
def gpt2_adapter(models, data, tmp_path_factory):
    """An adapter trained on the tiny GPT-2 folder."""
    out = tmp_path_factory.mktemp("runs") / "gpt2"
    result = runner.invoke(app, [*train_args(models["gpt2"], data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "adapter.safetensors"


def train_args(model, data, *extra) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data["train"]), "--batch-size", "2", "--max-steps", "2"]
    return [*args, "--lr", "1e-2", *extra]


def one_error(result, *needles: str) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback), holding each of `needles`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def hub_adapter(path: Path, base: str) -> Path:
    """An adapter of the tiny GPT-2 that records `base` as its base model."""
    model = tiny_gpt2()
    lorakit.add_lora(model, "q,v", rank=2, alpha=4)
    lorakit.save_adapter(model, path, base_model=base)
    return path


def nothing_in(folder: Path) -> bool:
    return not any(folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 1. Hub models and datasets without a network


def test_hub_model_offline_by_setting_is_one_line_at_once(monkeypatch, tmp_path, data):
    offline(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401  (the clock is for hub retries, not imports)

    started = time.perf_counter()
    result = runner.invoke(app, ["train", "--model", "gpt2-medium", "--rank", "4", "--targets", "q,v"])
    assert time.perf_counter() - started < 30  # the hub retries took 46-84 s; 30 s leaves room for a busy machine
    line = one_error(result, "gpt2-medium", "is not in the local Hugging Face cache", "HF_HUB_OFFLINE", "hf download")
    assert "tokenizer" not in line and line.count("gpt2-medium:") == 1  # said once, not wrapped in another error
    adapter = hub_adapter(tmp_path / "a.safetensors", "gpt2-medium")
    result = runner.invoke(app, ["merge", str(adapter), "--out", "merged"])
    one_error(result, "gpt2-medium", "is not in the local Hugging Face cache", "HF_HUB_OFFLINE", "--model")
    result = runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"])])
    one_error(result, "gpt2-medium", "is not in the local Hugging Face cache", "HF_HUB_OFFLINE", "--model")
    assert nothing_in(work)


def test_hub_model_with_the_network_down_names_the_network_error(monkeypatch, tmp_path, data):
    result = runner.invoke(app, ["train", "--model", NOT_CACHED, "--data", str(data["train"]), "--out", "x"])
    one_error(result, NOT_CACHED, "is not in the local Hugging Face cache", "connection refused")
    result = runner.invoke(app, ["train", "--model", NOT_CACHED, "--dry-run"])
    one_error(result, NOT_CACHED, "connection refused")
    # eval and merge of an adapter whose recorded base is a hub model
    adapter = hub_adapter(tmp_path / "a.safetensors", NOT_CACHED)
    result = runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"])])
    one_error(result, NOT_CACHED, "connection refused", "--model")
    one_error(runner.invoke(app, ["eval", "--model", NOT_CACHED, "--data", str(data["eval"])]), "connection refused")
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged")])
    one_error(result, NOT_CACHED, "connection refused", "--model")
    assert not (tmp_path / "merged").exists() and not Path("x").exists()


def test_recipe_offline_is_one_line(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    one_error(runner.invoke(app, ["train", str(RECIPE), "--dry-run"]), "gpt2-medium", "is not in the local")
    # a real run reads its (hub) data first
    one_error(runner.invoke(app, ["train", str(RECIPE)]), "tuetschek/e2e_nlg", "HF_HUB_OFFLINE")
    assert not (tmp_path / "runs").exists()


def test_hub_dataset_without_network_is_one_line(monkeypatch, tmp_path, models, data):
    started = time.perf_counter()
    args = ["train", "--model", str(models["gpt2"]), "--data", "someone/dataset", "--out", str(tmp_path / "run")]
    one_error(runner.invoke(app, args), "someone/dataset", "connection refused")
    args = ["eval", "--model", str(models["gpt2"]), "--data", "someone/dataset"]
    one_error(runner.invoke(app, args), "someone/dataset", "connection refused")
    assert time.perf_counter() - started < 30  # no minute of retries (30 s: room for a busy machine)
    offline(monkeypatch)
    args = ["train", "--model", str(models["gpt2"]), "--data", "someone/dataset", "--out", str(tmp_path / "run")]
    line = one_error(runner.invoke(app, args), "someone/dataset", "HF_HUB_OFFLINE", "hf download --repo-type dataset")
    assert line.startswith("error: someone/dataset: not a file or folder") and "hub dataset" in line
    assert not (tmp_path / "run").exists()


def test_cached_hub_model_loads_offline(monkeypatch, tmp_path, models, data):
    import huggingface_hub.constants

    snapshot = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--lorakit-tests--tiny" / "snapshots" / "abc"
    shutil.copytree(models["gpt2"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    offline(monkeypatch)
    result = runner.invoke(app, train_args("lorakit-tests/tiny", data, "--out", str(tmp_path / "run")))
    assert result.exit_code == 0, result.output
    assert read_adapter(tmp_path / "run" / "adapter.safetensors").base_model == "lorakit-tests/tiny"


# ---------------------------------------------------------------------------------------------------------------
# 2. The recorded base


def test_relative_model_is_recorded_absolute_and_a_lost_base_suggests_model(monkeypatch, tmp_path, models, data):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(models["gpt2"], work / "base")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, train_args("base", data, "--out", "run"))
    assert result.exit_code == 0, result.output
    adapter = work / "run" / "adapter.safetensors"
    assert read_adapter(adapter).base_model == str((work / "base").resolve())

    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["merge", str(adapter), "--out", "merged"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"]), "--json"])
    assert result.exit_code == 0, result.output

    (work / "base").rename(work / "moved")
    one_error(runner.invoke(app, ["merge", str(adapter), "--out", "merged2"]), str(work / "base"), "--model")
    one_error(runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"])]), "not here", "--model")
    assert not (elsewhere / "merged2").exists()
    result = runner.invoke(app, ["merge", str(adapter), "--out", "merged2", "--model", str(work / "moved")])
    assert result.exit_code == 0, result.output
    args = ["eval", str(adapter), "--data", str(data["eval"]), "--model", str(work / "moved"), "--json"]
    assert runner.invoke(app, args).exit_code == 0


def test_adapter_of_lorakit_0_1_with_a_relative_base(tmp_path, models):
    """Adapters of lorakit 0.1 recorded --model as typed; from another folder that path is not there."""
    adapter = hub_adapter(tmp_path / "a.safetensors", "./models/gpt2")
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged")])
    one_error(result, "./models/gpt2", "not here", "--model")
    # without ./ it reads as a hub id, which is not cached either
    adapter = hub_adapter(tmp_path / "a.safetensors", "models/gpt2")
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged")])
    one_error(result, "models/gpt2", "is not in the local Hugging Face cache", "--model")
    result = runner.invoke(
        app, ["merge", str(adapter), "--out", str(tmp_path / "merged"), "--model", str(models["gpt2"])]
    )
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# 3, 4. Tasks: a decoder classifier without a pad token id, a causal LM on an encoder


def no_pad_tokenizer():
    """The tiny tokenizer without a pad token, as GPT-2's own."""
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("pad", ["tokenizer-pad", "no-pad"])
def test_decoder_classifier_without_pad_token_id(tmp_path, pad):
    folder = save_model(tiny_gpt2(), tmp_path / "gpt2")
    if pad == "no-pad":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        no_pad_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    rows = [{"text": " ".join(f"w{i + k}" for k in range(2 + i % 5)), "label": i % 2} for i in range(8)]
    train_file, eval_file = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:5])
    out = tmp_path / "run"
    args = ["train", "--model", str(folder), "--task", "classification", "--data", str(train_file)]
    args += ["--eval-data", str(eval_file), "--batch-size", "2", "--max-steps", "2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1) and (out / "adapter.safetensors").is_file(), result.output
    args = ["eval", str(out / "adapter.safetensors"), "--task", "classification", "--data", str(eval_file)]
    result = runner.invoke(app, [*args, "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == 2


def test_causal_lm_on_an_encoder_is_refused(tmp_path, models, data):
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(models["bert"], data, "--out", str(out)))
    one_error(result, "bert", "encoder-only", "--task classification")
    one_error(runner.invoke(app, train_args(models["bert"], data, "--dry-run")), "bert", "--task classification")
    result = runner.invoke(app, ["eval", "--model", str(models["bert"]), "--data", str(data["eval"])])
    one_error(result, "bert", "--task classification")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. Rows longer than the model's context


def test_max_length_is_capped_at_the_models_positions(tmp_path, data):
    folder = save_model(tiny_gpt2(n_positions=16), tmp_path / "short")
    words = [f"w{4 + i % (VOCAB - 10)}" for i in range(60)]
    rows = [{"prompt": " ".join(words[i : i + 4]), "completion": " ".join(words[i + 4 :])} for i in range(6)]
    long = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", str(folder), "--data", str(long), "--eval-data", str(long), "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--max-steps", "2", "--max-length", "100", "--out", str(out)])
    assert result.exit_code in (0, 1) and (out / "adapter.safetensors").is_file(), result.output
    assert "note: --max-length 100 capped at 16" in result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["max_length"] == 100  # the value asked for
    result = runner.invoke(app, ["eval", str(out / "adapter.safetensors"), "--data", str(long), "--json"])
    assert result.exit_code == 0, result.output
    assert "note: --max-length 512 capped at 16, the model's context length" in result.stderr.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# 6. Wrong bases, remote code


def test_merge_onto_a_base_of_another_type_is_one_line(tmp_path, models, data, gpt2_adapter):
    for other, kind in (("llama", "llama"), ("bert", "bert")):
        result = runner.invoke(
            app, ["merge", str(gpt2_adapter), "--out", str(tmp_path / other), "--model", str(models[other])]
        )
        one_error(result, str(models[other]), kind, "--model")
        assert not (tmp_path / other).exists()
    result = runner.invoke(
        app, ["eval", str(gpt2_adapter), "--model", str(models["llama"]), "--data", str(data["eval"])]
    )
    one_error(result, str(gpt2_adapter))


def test_model_that_needs_remote_code_is_one_line(tmp_path, models, data):
    folder = tmp_path / "custom"
    shutil.copytree(models["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="lorakit-test-custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    one_error(runner.invoke(app, train_args(folder, data, "--out", str(out))), "--trust-remote-code")
    one_error(runner.invoke(app, train_args(folder, data, "--dry-run")), "--trust-remote-code")
    one_error(runner.invoke(app, ["eval", "--model", str(folder), "--data", str(data["eval"])]), "--trust-remote-code")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 7. Pickled weights


def test_pickle_only_base_is_refused_without_allow_pickle(tmp_path, data):
    model = tiny_gpt2()
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "run"
    one_error(runner.invoke(app, train_args(folder, data, "--out", str(out))), "pytorch_model.bin", "--allow-pickle")
    one_error(
        runner.invoke(app, ["eval", "--model", str(folder), "--data", str(data["eval"])]),
        "pytorch_model.bin",
        "--allow-pickle",
    )
    assert not out.exists()

    result = runner.invoke(app, train_args(folder, data, "--out", str(out), "--allow-pickle"))
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        # transformers refuses torch.load below torch 2.6 (a torch.load vulnerability): still one line
        one_error(result, "torch", "2.6")
        return
    assert result.exit_code == 0, result.output
    adapter = out / "adapter.safetensors"
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged")])
    one_error(result, "pytorch_model.bin", "--allow-pickle")
    assert not (tmp_path / "merged").exists()
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged"), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(adapter), "--data", str(data["eval"]), "--allow-pickle", "--json"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# 8. CPU threads and third-party warnings


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_option(monkeypatch, tmp_path, models, data, gpt2_adapter, restore_threads):
    seen = []
    build_model = lorakit.training.loop.build_model
    score_model = lorakit.evaluation.evaluate.score_model

    def spy_build(*args, **kwargs):
        seen.append(("train", torch.get_num_threads()))
        return build_model(*args, **kwargs)

    def spy_score(*args, **kwargs):
        seen.append(("eval", torch.get_num_threads()))
        return score_model(*args, **kwargs)

    monkeypatch.setattr(lorakit.training.loop, "build_model", spy_build)
    monkeypatch.setattr(lorakit.evaluation.evaluate, "score_model", spy_score)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(models["gpt2"], data, "--threads", "2", "--out", str(out)))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["threads"] == 2
    torch.set_num_threads(1)
    result = runner.invoke(app, ["eval", str(gpt2_adapter), "--data", str(data["eval"]), "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == [("train", 2), ("eval", 2), ("eval", 2)]


def test_launch_gives_each_process_its_threads(monkeypatch):
    calls = []

    def launched(nproc, args):
        calls.append({"OMP_NUM_THREADS": lorakit.training.distributed.os.environ["OMP_NUM_THREADS"], "args": args})

    monkeypatch.setattr(lorakit.training.distributed, "_elastic_launch", launched)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    lorakit.training.distributed.launch(2, ["train", "--nproc", "2", "--threads", "1"], threads=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the launcher set 1 for the processes it started
    lorakit.training.distributed.launch(2, ["train", "--nproc", "2"])
    monkeypatch.delenv("OMP_NUM_THREADS")
    lorakit.training.distributed.launch(2, ["train", "--nproc", "2"])
    monkeypatch.delenv("OMP_NUM_THREADS")  # the launcher's own setting goes at the end of the test too
    assert calls[0]["args"] == ["-m", "lorakit", "train", "--threads", "1"]
    # --threads wins; else the environment's setting; else the cores shared out (which also silences torchrun)
    assert [env["OMP_NUM_THREADS"] for env in calls[:2]] == ["1", "8"]
    assert int(calls[2]["OMP_NUM_THREADS"]) >= 1


def test_third_party_warnings_only_with_debug(monkeypatch, tmp_path, models, data, gpt2_adapter):
    def noisy(function):
        def wrapper(*args, **kwargs):
            warnings.warn("lorakit-test: this argument is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("lorakit-test: some library advice", UserWarning, stacklevel=1)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(lorakit.training.loop, "load_config", noisy(lorakit.training.loop.load_config))
    monkeypatch.setattr(lorakit.evaluation.evaluate, "score_model", noisy(lorakit.evaluation.evaluate.score_model))
    warned = ["lorakit-test: this argument is deprecated", "lorakit-test: some library advice"]
    for debug in (False, True):
        commands = (
            train_args(models["gpt2"], data, "--out", str(tmp_path / f"run-{debug}")),
            ["eval", str(gpt2_adapter), "--data", str(data["eval"]), "--json"],
        )
        for command in commands:
            with warnings.catch_warnings(record=True) as caught:  # what Python would print
                warnings.simplefilter("default")
                result = runner.invoke(app, [*(["--debug"] if debug else []), *command])
            assert result.exit_code == 0, result.output
            assert "lorakit-test" not in result.output
            shown = sorted({str(w.message) for w in caught if str(w.message).startswith("lorakit-test")})
            assert shown == (sorted(warned) if debug else []), command
