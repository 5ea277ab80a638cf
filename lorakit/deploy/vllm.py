"""Will vLLM serve this PEFT folder? Its LoRA loader's rules, as data, and a check of an exported folder.

The rules were read from vLLM's source (`SOURCE`), not guessed:
- `vllm/config/lora.py`: `--max-lora-rank` takes only the values of `MaxLoRARanks`, default 16.
- `vllm/lora/peft_helper.py`: `validate_legal` refuses `modules_to_save` (newer releases let
  classification models keep `classifier` / `score`), `use_dora`, a bias other than "none", and a rank `r` (newer
  releases: also any `rank_pattern` value) above `--max-lora-rank`.
- `vllm/lora/lora_model.py` + `vllm/lora/utils.py`: every tensor's module, by the last component of its
  name, must be one the model supports: the suffix of each of its LoRA-capable linear layers, where a packed
  layer (`packed_modules_mapping`: `qkv_proj` <- q/k/v_proj, `gate_up_proj` <- gate/up_proj) stands for the
  names it packs.
- `vllm/model_executor/models/gpt2.py`: `GPT2LMHeadModel(nn.Module, SupportsPP)` does not implement
  SupportsLoRA, so `vllm serve` with `--enable-lora` refuses a GPT-2 base at startup ("GPT2LMHeadModel does
  not support LoRA yet"), whatever the adapter holds; the `c_attn` q/v slices never reach vLLM's loader.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import PACKAGED, PACKAGED_HUB_ID, packaged_folder

SOURCE = (
    "vLLM main (github.com/vllm-project/vllm, files as of 2026-12: vllm/config/lora.py, vllm/lora/peft_helper.py, "
    "vllm/lora/lora_model.py, vllm/lora/utils.py, vllm/model_executor/models/{llama,qwen2,qwen3,gpt2}.py)"
)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # MaxLoRARanks
DEFAULT_MAX_LORA_RANK = 16
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# The module names (last path component) vLLM's loader accepts per Hugging Face class: the Llama-style decoders'
# linear layers qkv_proj, o_proj, gate_up_proj and down_proj, the packed ones by the names they pack.
# (Mistral checkpoints run on vLLM's Llama implementation.)
_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
}
# Classes whose vLLM implementation takes no LoRA at all, and what happens.
NO_LORA = {
    "GPT2LMHeadModel": (
        "vLLM's GPT-2 (GPT2LMHeadModel) takes no LoRA: `vllm serve` with --enable-lora stops at startup "
        "('GPT2LMHeadModel does not support LoRA yet'), so no GPT-2 adapter (c_attn q/v slices or any other) "
        "can be served; merge it (`lorakit merge`) and serve the merged folder without --enable-lora"
    ),
}


@dataclass
class VllmCheck:
    """What vLLM would do with a PEFT folder: `problems` empty means it loads (for a known class)."""

    base_class: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_rank: int = 0
    known: bool = True

    @property
    def max_lora_rank(self) -> int | None:
        """The smallest `--max-lora-rank` value vLLM accepts that holds the adapter's largest rank."""
        return next((v for v in MAX_LORA_RANKS if v >= self.max_rank), None)


def check_folder(folder: str | Path, base_class: str) -> VllmCheck:
    """Check an exported PEFT folder against vLLM's LoRA loader rules for a base of class `base_class`."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    check = VllmCheck(base_class)
    ranks = [config.get("r") or 8, *(config.get("rank_pattern") or {}).values()]
    check.max_rank = max(int(r) for r in ranks)
    if check.max_lora_rank is None:
        check.problems.append(f"rank {check.max_rank} is above vLLM's largest --max-lora-rank, {MAX_LORA_RANKS[-1]}")
    if config.get("modules_to_save"):
        check.problems.append(
            f"modules_to_save {config['modules_to_save']} (a trained head): vLLM only serves adapters without one"
        )
    if config.get("use_dora"):
        check.problems.append("use_dora: vLLM does not support DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        check.problems.append("a trained bias: vLLM supports bias 'none' only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        check.notes.append(
            "the adapter has per-module ranks or alphas (rank_pattern / alpha_pattern); vLLM releases whose "
            "PEFTHelper has no rank_pattern field apply the global r and lora_alpha to every module"
        )
    if base_class in NO_LORA:
        check.problems.append(NO_LORA[base_class])
    elif base_class not in MODULES:
        check.known = False
        check.notes.append(
            f"lorakit has no vLLM module rules for {base_class or 'this base'}; module names not checked"
        )
    else:
        for module in sorted(_modules(folder)):
            if module.rsplit(".", 1)[-1] not in MODULES[base_class]:
                check.problems.append(
                    f"{module}: vLLM's {base_class} takes LoRA only on {', '.join(MODULES[base_class])}"
                )
    return check


def _modules(folder: Path) -> set[str]:
    """The adapted module paths of a PEFT folder, from its tensor names."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    prefix = "base_model.model."
    return {n.removeprefix(prefix).rsplit(".lora_", 1)[0] for n in names if ".lora_" in n}


def _recorded(folder: Path, key: str) -> str:
    """A `lorakit_*` key lorakit's export records in the weights file's metadata ("" for other folders)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get(key, "")


def serve_command(base: str, name: str, folder: str | Path, max_lora_rank: int) -> str:
    """The `vllm serve` command line that serves `folder` as adapter `name` on `base`."""
    lora = f"{name}={Path(folder).resolve()}"
    return (
        f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(lora)} "
        f"--max-lora-rank {max_lora_rank}"
    )


def report_lines(folder: str | Path, base_class: str | None = None) -> list[str]:
    """What `lorakit export --format peft` prints about vLLM: fits (with the serve command) or what does not.
    `base_class` defaults to the class lorakit's export recorded in the folder."""
    folder = Path(folder)
    config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
    check = check_folder(folder, _recorded(folder, "lorakit_base_class") if base_class is None else base_class)
    if check.problems:
        lines = ["vLLM: will not load this adapter:"] + [_wrapped("  - ", p) for p in check.problems]
    else:
        verdict = "fits its LoRA loader" if check.known else "module names not checked"
        rank = check.max_lora_rank or DEFAULT_MAX_LORA_RANK
        lines = [
            f"vLLM: {verdict} (rank {check.max_rank}: pass --max-lora-rank {rank}); serve it with",
            "  " + serve_command(config.get("base_model_name_or_path") or "BASE", folder.name, folder, rank),
        ]
    if not check.problems and _recorded(folder, "lorakit_base_model") == PACKAGED:
        check.notes.append(
            f"{PACKAGED_HUB_ID} is the full-precision model; lorakit trained on its Q4_1 GGUF dequantized, the "
            f"folder {packaged_folder()}: serve that folder for lorakit's exact base"
        )
    return lines + [_wrapped("  note: ", n) for n in check.notes]


def _wrapped(first: str, text: str, width: int = 100) -> str:
    """`text` after `first`, wrapped at `width` columns with the continuation lines indented."""
    import textwrap

    return textwrap.fill(text, width, initial_indent=first, subsequent_indent=" " * 4, break_on_hyphens=False)


__all__ = ["SOURCE", "MAX_LORA_RANKS", "MODULES", "NO_LORA", "VllmCheck", "check_folder", "report_lines"]
