"""Trying an adapter without writing code: `lorakit generate` (prompts in, continuations out) and `lorakit chat`.

The base is the one the adapter records (or `--model`); the adapter is checked against it as everywhere else.
A prompt goes through the tokenizer's chat template when the tokenizer has one (a chat model: the prompt is the
user's turn), as plain text otherwise; `--chat/--no-chat` decides instead. Decoding is greedy unless
`temperature` > 0 (sampling, with `top_p`) or `num_beams` > 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from .evaluate import GenerateOptions, generate


@dataclass
class Adapted:
    """A base with the adapter applied (or the base alone), ready to generate."""

    model: nn.Module
    tokenizer: Any
    base: str
    positions: int | None = None
    """The model's context length (None: unknown); prompt plus generated tokens must fit in it."""


def load_adapted(
    adapter: str | Path | None,
    model: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Adapted:
    """The base (`model`, else the adapter's recorded base) with `adapter` applied; no adapter: the base alone."""
    from ..lora.adapter import apply_adapter, read_adapter
    from ..models import (
        PACKAGED,
        base_name,
        check_task,
        context_length,
        load_base,
        load_config,
        load_tokenizer,
        recorded_base,
    )

    loaded = read_adapter(adapter) if adapter is not None else None
    if loaded is not None and "num_labels" in loaded.metadata:
        raise LorakitError(f"{adapter}: a classification adapter; it labels text (lorakit eval), it does not generate")
    source = model or (recorded_base(loaded.path, loaded.base_model) if loaded and loaded.base_model else None)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    config = load_config(source, trust_remote_code=trust_remote_code)
    check_task(config, "causal-lm", source or PACKAGED)
    base = load_base(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if loaded is not None:
        apply_adapter(base, loaded)  # checks the base fingerprint
    base.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return Adapted(base, tokenizer, base_name(source), context_length(config))


def load_stacked(
    adapters: list[str | Path],
    model: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Adapted:
    """The base (`model`, else the first adapter's recorded base) with every adapter on it at once: generate_texts
    then takes each prompt's adapter by its index in `adapters` (-1: the base alone)."""
    from ..lora.adapter import read_adapter
    from ..lora.multi import stack_adapters

    loaded = [read_adapter(a) for a in adapters]  # every file checked before the model loads
    for adapter in loaded:
        if "num_labels" in adapter.metadata:
            raise LorakitError(f"{adapter.path}: a classification adapter; it labels text (lorakit eval)")
    adapted = load_adapted(None, model or _recorded(loaded), trust_remote_code, allow_pickle)
    stack_adapters(adapted.model, loaded)  # checks every adapter's base fingerprint
    return adapted


def _recorded(loaded: list[Any]) -> str | None:
    from ..models import recorded_base

    return next((recorded_base(a.path, a.base_model) for a in loaded if a.base_model), None)


def uses_chat_template(tokenizer: Any, chat: bool | None) -> bool:
    """Whether prompts go through the chat template: `chat` when given, else whether the tokenizer has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise LorakitError("--chat: this tokenizer has no chat template; pass --no-chat to use plain prompts")
    return has if chat is None else chat


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """Token ids of a conversation ending in the user's turn: the chat template with the assistant's turn opened,
    or the last message as plain text (with the tokenizer's BOS when it adds one)."""
    if chat:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return list(tokenizer(messages[-1]["content"])["input_ids"])


def read_prompts(path: Path) -> list[str]:
    """Prompts of a text file, one a line; blank lines are skipped."""
    if not path.is_file():
        raise LorakitError(f"{path}: no such prompts file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LorakitError(f"{path}: not UTF-8 text; expected one prompt a line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise LorakitError(f"{path}: holds no prompt; expected one prompt a line")
    return prompts


def generate_texts(
    adapted: Adapted, prompts: list[str], options: GenerateOptions, chat: bool, adapters: list[int] | None = None
) -> list[str]:
    """The continuation of each prompt (batched as `options.batch_size` says); `adapters`, on a `load_stacked`
    model: each prompt's adapter index (-1: the base alone), one batch mixing adapters."""
    ids = [prompt_ids(adapted.tokenizer, [{"role": "user", "content": p}], chat) for p in prompts]
    empty = next((i for i, p in enumerate(ids) if not p), None)
    if empty is not None:
        raise LorakitError(f"prompt {empty + 1} ({prompts[empty]!r}) has no tokens; expected some text")
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    options = fitted(options, len(ids[longest]), adapted.positions)
    return generate(adapted.model, adapted.tokenizer, ids, options, adapters=adapters)


def fitted(options: GenerateOptions, prompt_tokens: int, positions: int | None) -> GenerateOptions:
    """`options` with max_new_tokens cut so that prompt and output fit the model's context (positions)."""
    if positions is None or prompt_tokens + options.max_new_tokens <= positions:
        return options
    if prompt_tokens >= positions:
        raise LorakitError(f"a prompt of {prompt_tokens} tokens fills the model's context of {positions} tokens")
    return replace(options, max_new_tokens=positions - prompt_tokens)


def chat_loop(adapted: Adapted, options: GenerateOptions, read: Callable[[], str], write: Callable[[str], None]) -> int:
    """A conversation: `read` gives the user's turns (EOFError or `/exit` ends it, `/reset` forgets the history),
    `write` shows each answer; returns the number of answers given."""
    messages: list[dict[str, str]] = []
    answers = 0
    for turn in _turns(read):
        if turn == "/reset":
            messages = []
            write("(history cleared)")
            continue
        messages.append({"role": "user", "content": turn})
        ids = prompt_ids(adapted.tokenizer, messages, chat=True)
        while adapted.positions is not None and len(ids) >= adapted.positions and len(messages) > 1:
            messages = messages[2:]  # the oldest exchange goes: the conversation outgrew the context
            ids = prompt_ids(adapted.tokenizer, messages, chat=True)
        answer = generate(adapted.model, adapted.tokenizer, [ids], fitted(options, len(ids), adapted.positions))[0]
        messages.append({"role": "assistant", "content": answer})
        write(answer)
        answers += 1
    return answers


def _turns(read: Callable[[], str]) -> Iterator[str]:
    while True:
        try:
            line = read()
        except EOFError:
            return
        if line.strip() == "/exit":
            return
        if line.strip():
            yield line


__all__ = [
    "Adapted",
    "load_adapted",
    "load_stacked",
    "fitted",
    "uses_chat_template",
    "prompt_ids",
    "read_prompts",
    "generate_texts",
    "chat_loop",
]
