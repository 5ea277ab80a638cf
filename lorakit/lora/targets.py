"""Which modules to adapt: `q,v`-style aliases per architecture, suffixes, `re:REGEX`, layer subsets.

An alias maps to a module-name suffix and, for fused projections, an output slice. GPT-2's `c_attn`
stacks q, k and v on its output axis: `q` is the first third, `v` the last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import LorakitError
from .layer import Slice, base_shape, is_linear_like

ALIASES = ("q", "k", "v", "o", "mlp", "all-linear")


@dataclass(frozen=True)
class Alias:
    """A module-path suffix (a regex over whole path components), and for fused q/k/v: which of
    `parts` equal output chunks to take. Modules of one block with the same `reads` take the same input tensor
    (q, k and v; a gated MLP's gate and up projections)."""

    suffix: str
    part: int | None = None
    parts: int = 1
    reads: str | None = None


_GPT2 = {
    "q": [Alias(r"attn\.c_attn", 0, 3)],
    "k": [Alias(r"attn\.c_attn", 1, 3)],
    "v": [Alias(r"attn\.c_attn", 2, 3)],
    "o": [Alias(r"attn\.c_proj")],
    "mlp": [Alias(r"mlp\.c_fc"), Alias(r"mlp\.c_proj")],
}
_LLAMA = {  # a gated MLP: down(act(gate(x)) * up(x))
    "q": [Alias(r"self_attn\.q_proj", reads="qkv")],
    "k": [Alias(r"self_attn\.k_proj", reads="qkv")],
    "v": [Alias(r"self_attn\.v_proj", reads="qkv")],
    "o": [Alias(r"self_attn\.o_proj")],
    "mlp": [Alias(r"mlp\.gate_proj", reads="mlp"), Alias(r"mlp\.up_proj", reads="mlp"), Alias(r"mlp\.down_proj")],
}
_BERT = {
    "q": [Alias(r"attention\.self\.query", reads="qkv")],
    "k": [Alias(r"attention\.self\.key", reads="qkv")],
    "v": [Alias(r"attention\.self\.value", reads="qkv")],
    "o": [Alias(r"attention\.output\.dense")],
    # `output.dense` alone would also match attention.output.dense: anchor on the layer index.
    "mlp": [Alias(r"intermediate\.dense"), Alias(r"layer\.\d+\.output\.dense")],
}
_DISTILBERT = {
    "q": [Alias(r"attention\.q_lin", reads="qkv")],
    "k": [Alias(r"attention\.k_lin", reads="qkv")],
    "v": [Alias(r"attention\.v_lin", reads="qkv")],
    "o": [Alias(r"attention\.out_lin")],
    "mlp": [Alias(r"ffn\.lin1"), Alias(r"ffn\.lin2")],
}
LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")
ARCHITECTURES: dict[str, dict[str, list[Alias]]] = {
    "gpt2": _GPT2,
    **{model_type: _LLAMA for model_type in LLAMA_LIKE},
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _DISTILBERT,
}


def alias_table(model_type: str | None) -> dict[str, list[Alias]]:
    """The aliases of a model type, or of the family it extends (`qwen2_moe` -> qwen2, `gemma3` -> gemma)."""
    model_type = model_type or ""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    family = max((t for t in ARCHITECTURES if model_type.startswith(t)), key=len, default=None)
    return ARCHITECTURES[family] if family else {}


def has_gated_mlp(model_type: str | None) -> bool:
    """A Llama-style MLP, down(act(gate(x)) * up(x)), rather than down(act(up(x)))."""
    return alias_table(model_type) is _LLAMA


def input_group(path: str, model_type: str | None) -> str:
    """A key shared by the adapted modules of one block that read the same input tensor (`...self_attn.qkv` for
    q, k and v); the module's own path otherwise. Unknown model types are matched against every table."""
    tables = (
        [alias_table(model_type)]
        if alias_table(model_type)
        else list({id(t): t for t in ARCHITECTURES.values()}.values())
    )
    for table in tables:
        for aliases in table.values():
            for alias in aliases:
                if alias.reads and _suffix_matches(path, alias.suffix):
                    block = path[: len(path) - len(re.search(rf"(?:{alias.suffix})$", path)[0])]
                    return block + alias.reads
    return path


_SLICE_NAMES = ("q", "k", "v")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """A module to adapt: its path in the model and the output slices (None: the whole output)."""

    path: str
    slices: tuple[Slice, ...] | None = None


def split_targets(spec: str | list[str]) -> list[str]:
    """`"q,v"` -> ["q", "v"]; a spec starting with `re:` is one regex (it may contain commas)."""
    if isinstance(spec, (list, tuple)):
        return [str(t).strip() for t in spec if str(t).strip()]
    spec = spec.strip()
    if spec.startswith("re:"):
        return [spec]
    return [t.strip() for t in spec.split(",") if t.strip()]


def layer_index(path: str) -> int | None:
    """The transformer block index in a module path (`transformer.h.3.attn.c_attn` -> 3)."""
    m = _LAYER_INDEX.search(f".{path}.")
    return int(m.group(1)) if m else None


def _suffix_matches(path: str, suffix: str) -> bool:
    return re.search(rf"(^|\.)(?:{suffix})$", path) is not None


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    excluded = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            excluded.add(name)
    return {n: m for n, m in model.named_modules() if is_linear_like(m) and n and n not in excluded}


def _tied_elsewhere(model: nn.Module, path: str, module: nn.Module) -> str | None:
    """Name of another parameter sharing this module's weight (tied embeddings), if any."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is module.weight and not name.startswith(f"{path}."):
            return name
    return None


def resolve_targets(model: nn.Module, targets: str | list[str], layers: list[int] | None = None) -> list[Target]:
    """Resolve a targets spec against a model.

    Args:
        model: a transformers model (its `config.model_type` picks the alias table) or any nn.Module.
        targets: comma-separated aliases (`q,v`, `mlp`, `all-linear`), module-name suffixes, or `re:REGEX`
            (full match against module paths).
        layers: only modules in these transformer blocks (None: all).

    Returns:
        Targets in model order; aliases on one fused module are combined into one target with several slices.
    """
    tokens = split_targets(targets)
    if not tokens:
        raise LorakitError("no targets given; expected e.g. 'q,v', 'all-linear', a module suffix or 're:REGEX'")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = alias_table(model_type)
    candidates = _linear_modules(model)
    all_named = {n: m for n, m in model.named_modules() if is_linear_like(m) and n}
    chosen: dict[str, set[int] | None] = {}  # path -> slice parts (None: whole module)
    parts_of: dict[str, int] = {}
    for token in tokens:
        matches = _token_matches(token, table, candidates, all_named, model_type)
        if not matches:
            raise LorakitError(f"no module matched {token!r}; linear modules here: {_short_names(all_named)}")
        for path, alias in matches:
            if alias is None or alias.part is None:
                chosen[path] = None
            elif path not in chosen or chosen[path] is not None:
                chosen.setdefault(path, set()).add(alias.part)
                parts_of[path] = alias.parts
    wanted = None if layers is None else set(layers)
    result = [
        _target(model, path, module, chosen[path], parts_of.get(path, 1))
        for path, module in all_named.items()  # model order
        if path in chosen and (wanted is None or layer_index(path) in wanted)
    ]
    if not result:
        raise LorakitError(f"no module in layers {layers} matched {','.join(tokens)!r}")
    return result


def _token_matches(
    token: str,
    table: dict[str, list[Alias]],
    candidates: dict[str, nn.Module],
    all_named: dict[str, nn.Module],
    model_type: str | None,
) -> list[tuple[str, Alias | None]]:
    """The module paths one targets token names, each with its alias (None: the whole module)."""
    if token.startswith("re:"):
        try:
            pattern = re.compile(token[3:])
        except re.error as e:
            raise LorakitError(f"invalid regex in targets {token!r}: {e}") from None
        return [(path, None) for path in all_named if pattern.fullmatch(path)]
    if token == "all-linear":  # inside the transformer blocks: no heads, no pooler
        return [(path, None) for path in candidates if layer_index(path) is not None]
    if token in table:
        return [(p, alias) for alias in table[token] for p in candidates if _suffix_matches(p, alias.suffix)]
    if token in ALIASES:
        raise LorakitError(
            f"target alias {token!r} is not defined for model type {model_type!r}; "
            f"name modules by suffix instead (linear modules here: {_short_names(all_named)})"
        )
    return [(path, None) for path in all_named if path == token or path.endswith("." + token)]


def _target(model: nn.Module, path: str, module: nn.Module, parts: set[int] | None, n: int) -> Target:
    """The target for one chosen module: whole, or the chosen `parts` of its `n` equal output slices."""
    tied = _tied_elsewhere(model, path, module)
    if tied is not None:
        raise LorakitError(f"{path} shares its weight with {tied} (tied embeddings); adapting it would change both")
    if parts is None:
        return Target(path, None)
    _, out_features = base_shape(module)
    if out_features % n:
        raise LorakitError(f"{path}: output size {out_features} does not split into {n} equal parts")
    size = out_features // n
    names = [_SLICE_NAMES[p] if n == 3 else f"part{p}" for p in range(n)]
    return Target(path, tuple(Slice(names[p], p * size, (p + 1) * size) for p in sorted(parts)))


def fused_slices(model: nn.Module, path: str) -> tuple[Slice, ...] | None:
    """All output slices of the fused projection at `path` (GPT-2 `c_attn`: q, k, v), as the `q`/`k`/`v` aliases
    cut them; None when the module is not a fused one of its architecture."""
    table = alias_table(getattr(getattr(model, "config", None), "model_type", None))
    parts = {a.parts for aliases in table.values() for a in aliases if a.parts > 1 and _suffix_matches(path, a.suffix)}
    if len(parts) != 1:
        return None
    n = parts.pop()
    return _target(model, path, model.get_submodule(path), set(range(n)), n).slices


def _short_names(modules: dict[str, nn.Module]) -> str:
    """Distinct module paths with block indices collapsed, e.g. `transformer.h.*.attn.c_attn`."""
    seen: list[str] = []
    for path in modules:
        short = re.sub(r"\.\d+\.", ".*.", path)
        if short not in seen:
            seen.append(short)
    return ", ".join(seen)
