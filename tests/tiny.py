"""Tiny models built from configs in the test process: no network, ~0.1 s each."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

VOCAB = 96


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _encoder_config(num_labels: int, **overrides) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return cfg


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**_encoder_config(num_labels, **overrides))).eval()


def tiny_roberta(seed: int = 0, num_labels: int = 2, head: bool = True, **overrides):
    """A RoBERTa classifier: its head is two modules, classifier.dense and classifier.out_proj.

    head=False: the bare encoder (RobertaModel), as a pretrained checkpoint without a task head is saved.
    """
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    torch.manual_seed(seed)
    cfg = RobertaConfig(**_encoder_config(num_labels, pad_token_id=1, **overrides))
    return (RobertaForSequenceClassification if head else RobertaModel)(cfg).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_model(model, folder: Path) -> Path:
    """Save a model (and the tiny tokenizer) as a Hugging Face folder; returns the folder."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def probe_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=g)


def randomize_lora(model, seed: int = 1, std: float = 0.5) -> None:
    """Give every LoRA B a non-zero value so that the update matters."""
    import lorakit

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * std)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def learnable_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows over the tiny vocabulary; the completion is a function of the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.randrange(4, 80) for _ in range(rng.randrange(2, 6))]
        rows.append(
            {"prompt": " ".join(f"w{k}" for k in words), "completion": " ".join(f"w{k + 10}" for k in words[:3])}
        )
    return rows


def killed_in_step(step: int):
    """A context: lorakit.training.loop.lr_at raises KeyboardInterrupt when step `step` (1-based) starts, with no
    checkpoint of its own (what a kill leaves); the real lr_at is back afterwards."""
    import contextlib

    import lorakit.training.loop as loop

    @contextlib.contextmanager
    def patched():
        real = loop.lr_at

        def lr_at(s, *args):
            if s == step - 1:
                raise KeyboardInterrupt
            return real(s, *args)

        loop.lr_at = lr_at
        try:
            yield
        finally:
            loop.lr_at = real

    return patched()


def memorize_setup(root: Path, archs: dict) -> Path:
    """`root` with a tiny model folder per architecture (name -> builder) and data.jsonl: 8 rows to learn by heart."""
    for name, build in archs.items():
        save_model(build(), root / name)
    rows = [{"prompt": f"w{4 + i} w{20 + i}", "completion": f"w{40 + i} w{60 + i} w{70 + i}"} for i in range(8)]
    write_jsonl(root / "data.jsonl", rows)
    return root


def runs_with_and_without(root: Path, archs, flag: str, tag: str, options: list[str]) -> dict[tuple[str, bool], Path]:
    """(arch, with `flag`?) -> run folder: `lorakit train` through the CLI on `memorize_setup`'s folders, with `flag`
    (folder ARCH-TAG) and without it (ARCH-fp32), evaluated on the training rows."""
    import pytest
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(root / "cache"))
        for arch in archs:
            for flagged in (True, False):
                folder = root / f"{arch}-{tag if flagged else 'fp32'}"
                args = ["train", "--model", str(root / arch), "--data", str(root / "data.jsonl")]
                args += ["--eval-data", str(root / "data.jsonl"), "--out", str(folder), *options]
                result = CliRunner().invoke(app, args + ([flag] if flagged else []))
                assert result.exit_code == 0, result.output
                out[arch, flagged] = folder
    return out
