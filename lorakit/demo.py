"""The embedded demo task: a small data-to-text dataset that lorakit generates itself.

Meaning representations of made-up restaurants (in the style of the E2E NLG challenge, but written from
scratch here) and one-sentence descriptions built from a handful of templates. The base model has never seen
this exact format, so a few minutes of LoRA training visibly lower the loss and change the generations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .files import write_atomic

NAMES = [
    "The Copper Kettle",
    "Blue Heron",
    "The Old Mill",
    "Saffron House",
    "The Lantern",
    "Green Fig",
    "Harbour Lights",
    "The Golden Pear",
    "Olive Grove",
    "The Red Fox",
    "Maple Corner",
    "The Tin Cup",
    "Silver Birch",
    "The Anchor",
    "Juniper Hall",
    "The Crooked Spoon",
    "Little Lemon",
    "The Nutmeg",
    "Riverbank Grill",
    "The Walnut Tree",
]
FOODS = ["Italian", "French", "Japanese", "Indian", "Chinese", "English", "Mexican", "Thai", "Greek", "Spanish"]
AREAS = ["city centre", "riverside", "old town", "harbour"]
PRICES = ["cheap", "moderate", "expensive"]
RATINGS = ["1 out of 5", "3 out of 5", "5 out of 5"]
PROMPT = "Describe the restaurant in one sentence.\n{mr}\nDescription:"


def meaning(rng: random.Random) -> dict[str, str]:
    """A random restaurant: name, food, area, price and optionally rating and family-friendliness."""
    slots = {
        "name": rng.choice(NAMES),
        "food": rng.choice(FOODS),
        "area": rng.choice(AREAS),
        "price": rng.choice(PRICES),
    }
    if rng.random() < 0.6:
        slots["rating"] = rng.choice(RATINGS)
    if rng.random() < 0.5:
        slots["family"] = rng.choice(["yes", "no"])
    return slots


def describe(slots: dict[str, str], rng: random.Random) -> str:
    """One sentence that states every slot."""
    price = {"cheap": "cheap", "moderate": "moderately priced", "expensive": "expensive"}[slots["price"]]
    opening = rng.choice(
        [
            f"{slots['name']} is a {price} {slots['food']} restaurant in the {slots['area']}",
            f"In the {slots['area']}, {slots['name']} serves {price} {slots['food']} food",
            f"{slots['name']} offers {slots['food']} food at {slots['price']} prices in the {slots['area']}",
        ]
    )
    extras = []
    if "rating" in slots:
        extras.append(f"is rated {slots['rating']}")
    if "family" in slots:
        extras.append("is family friendly" if slots["family"] == "yes" else "is not family friendly")
    if not extras:
        return opening + "."
    return f"{opening}; it {' and '.join(extras)}."


def mr_string(slots: dict[str, str]) -> str:
    """E2E-style meaning representation: `name[...], food[...], ...`."""
    return ", ".join(f"{k}[{v}]" for k, v in slots.items())


def rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` prompt/completion rows, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        slots = meaning(rng)
        out.append({"prompt": PROMPT.format(mr=mr_string(slots)), "completion": " " + describe(slots, rng)})
    return out


def write_demo_data(folder: Path, n_train: int = 480, n_eval: int = 48) -> tuple[Path, Path]:
    """Write `demo-train.jsonl` and `demo-eval.jsonl` into `folder` (disjoint seeds); returns both paths."""
    paths = []
    for name, n, seed in (("demo-train.jsonl", n_train, 1), ("demo-eval.jsonl", n_eval, 2)):
        path = Path(folder) / name
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows(n, seed)))
        paths.append(path)
    return paths[0], paths[1]


def before_after_examples(adapter: Path, eval_path: Path, n: int = 2, max_new_tokens: int = 48) -> list[dict[str, str]]:
    """Greedy generations of the base and of the trained adapter for the first `n` demo eval prompts."""
    from .devices import best_device
    from .evaluation.evaluate import GenerateOptions, generate, prompt_groups
    from .lora.adapter import load_adapter
    from .models import load_base, load_tokenizer
    from .training.data import DataSpec, encode, read_rows

    spec = DataSpec(source=str(eval_path), limit=n)
    tokenizer = load_tokenizer(None)
    rows = read_rows(spec)
    groups = prompt_groups(rows, encode(rows, tokenizer, 512, spec), spec.completion_field, tokenizer)
    model = load_base(None, device=best_device())  # the GPU when there is one
    options = GenerateOptions(max_new_tokens=max_new_tokens, stop="\n")
    before = generate(model, tokenizer, [g.prompt_ids for g in groups], options)
    load_adapter(model, adapter)
    after = generate(model, tokenizer, [g.prompt_ids for g in groups], options)
    return [
        {
            "prompt": g.prompt.splitlines()[1] if "\n" in g.prompt else g.prompt,
            "reference": g.references[0],
            "before": b,
            "after": a,
        }
        for g, b, a in zip(groups, before, after)
    ]
