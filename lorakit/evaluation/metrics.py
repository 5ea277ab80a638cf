"""Scores for generated text and for classification.

Text metrics follow the E2E set-up: one prediction per unique prompt, scored against all of that
prompt's references (their number may differ between prompts), computed as the official E2E script
(tuetschek/e2e-metrics, run with `-p` as the LoRA paper does) computes them. Each metric is one function
`(predictions, references) -> float` registered in `TEXT_METRICS`; `text_metrics` checks the inputs
once and runs the metrics asked for. BLEU, METEOR and ROUGE-L are on the papers' x100 scale; NIST and
CIDEr on their own. A metric whose tools are missing (METEOR needs Java and `lorakit[e2e]`) raises
`MetricUnavailable`, which `text_metrics` turns into None and a `MetricWarning` saying why.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

from ..errors import LorakitError
from .coco import MetricUnavailable, MetricWarning
from .e2e_metrics import cider, meteor, nist
from .ptb import ptb_tokenize_items

TextMetric = Callable[[list[str], list[list[str]]], float]

ROUGE_BETA = 1.2  # the coco-caption value: recall weighs 1.44 times as much as precision
# The E2E script's BLEU (its Python port of mteval) does not smooth: a zero n-gram match count only
# becomes 1e-15 so that the logarithm is defined, which leaves BLEU at practically 0.
BLEU_ZERO_MATCHES = 1e-15


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU with sacrebleu, set up as the E2E script's BLEU (`measure_scores.py -p`, as in the paper).

    Lowercased, 13a tokenization (mteval-v13a's), clipped counts against all of an item's references,
    the brevity penalty from the closest reference length (the shorter one on ties), and no smoothing:
    a zero match count becomes `BLEU_ZERO_MATCHES` (sacrebleu's "floor" method), as in the script's Python
    port of mteval. (The Perl mteval-v13a, the script's default without `-p`, smooths instead: sacrebleu's
    "exp"; the two agree whenever every n-gram order has a match.) One deliberate difference: a prediction
    shorter than n tokens has 0 n-grams here (as in sacrebleu and the Perl script), where the port counts
    len - n + 1 < 0 and the empty prediction as one token; the scores agree otherwise.

    References may differ in number per item: sacrebleu wants equal-length reference streams, so shorter
    lists are padded with None, which sacrebleu drops per segment ('' would be a real, empty reference).

    Args:
        predictions: one string per item.
        references: one non-empty list of reference strings per item.

    Returns:
        BLEU in [0, 100].
    """
    from sacrebleu.metrics import BLEU  # imported only when BLEU is asked for (slow to import)

    scorer = BLEU(lowercase=True, tokenize="13a", smooth_method="floor", smooth_value=BLEU_ZERO_MATCHES)
    return float(scorer.corpus_score(predictions, reference_streams(references)).score)


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-item references into sacrebleu's streams (stream k = the k-th reference of every
    item), padding items with fewer references with None."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """ROUGE-L as the coco-caption code (used by the E2E challenge) computes it.

    Per item: the longest common subsequence (LCS) of prediction and each reference gives precision
    LCS/len(prediction) and recall LCS/len(reference); the best precision and the best recall over the
    references (each maximised on its own) combine into F = (1 + b^2) P R / (R + b^2 P) with b = 1.2.
    The corpus score is the mean over items.

    Tokens come from `ptb_tokenize` as in coco-caption: the Stanford PTB tokenizer (Java), lowercased,
    punctuation dropped; without Java or pycocoevalcap, a Python approximation of it (with a MetricWarning).

    Args:
        predictions: one string per item.
        references: one non-empty list of reference strings per item.

    Returns:
        ROUGE-L in [0, 100].
    """
    preds, refs = ptb_tokenize_items(predictions, references)
    scores = [rouge_l_item(pred, item_refs) for pred, item_refs in zip(preds, refs)]
    return 100.0 * sum(scores) / len(scores)


def rouge_l_item(prediction: list[str], references: list[list[str]]) -> float:
    """ROUGE-L F-score in [0, 1] of one tokenized prediction against its tokenized references."""
    if not prediction:
        return 0.0
    lcs = [lcs_length(prediction, ref) for ref in references]
    precision = max(n / len(prediction) for n in lcs)
    recall = max(n / len(ref) for n, ref in zip(lcs, references))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + ROUGE_BETA**2) * precision * recall / (recall + ROUGE_BETA**2 * precision)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, two rows)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


TEXT_METRICS: dict[str, TextMetric] = {
    "bleu": bleu,
    "nist": nist,
    "meteor": meteor,
    "rouge_l": rouge_l,
    "cider": cider,
}
# Names that stand for several metrics in `--metrics`.
METRIC_GROUPS: dict[str, list[str]] = {
    "e2e": ["bleu", "nist", "meteor", "rouge_l", "cider"],
}


def parse_metric_names(spec: str) -> list[str]:
    """Parse a comma-separated list of metric names ("bleu,rouge_l"), as given to `--metrics`.

    A group name from `METRIC_GROUPS` stands for its metrics: "e2e" -> bleu, nist, meteor, rouge_l, cider.

    Returns:
        The names in the order given, groups expanded, without duplicates.

    Raises:
        LorakitError: the list is empty or names a metric not in `TEXT_METRICS` nor `METRIC_GROUPS`.
    """
    given = [name.strip().lower() for name in spec.split(",") if name.strip()]
    if not given:
        raise LorakitError(f"--metrics {spec!r} names no metric; known: {known_metric_names()}")
    check_metric_names([name for name in given if name not in METRIC_GROUPS])
    return list(dict.fromkeys(member for name in given for member in METRIC_GROUPS.get(name, [name])))


def check_metric_names(names: list[str]) -> None:
    """Raise a LorakitError naming the first unknown metric and the known ones."""
    for name in names:
        if name not in TEXT_METRICS:
            raise LorakitError(f"unknown metric {name!r}; known: {known_metric_names()}")


def known_metric_names() -> str:
    """The metric and group names `--metrics` accepts, for messages: "bleu, nist, ..., e2e"."""
    return ", ".join([*TEXT_METRICS, *METRIC_GROUPS])


def text_metrics(
    predictions: list[str], references: list[list[str]], names: list[str] | None = None
) -> dict[str, float | None]:
    """Score predictions against their references with the named metrics.

    Args:
        predictions: one generated string per item (an empty string is a valid, poor, prediction).
        references: for each item, its one or more reference strings.
        names: metrics from `TEXT_METRICS`; None runs them all.

    Returns:
        {metric name: score}, in the order of `names`; None for a metric that cannot run here, with a
        `MetricWarning` ("meteor unavailable: java not found on PATH ...") saying why.

    Raises:
        LorakitError: an unknown metric, or inputs that cannot be scored (see `check_text_inputs`).
    """
    names = list(TEXT_METRICS) if names is None else names
    check_metric_names(names)
    check_text_inputs(predictions, references)
    return {name: run_metric(name, predictions, references) for name in names}


def run_metric(name: str, predictions: list[str], references: list[list[str]]) -> float | None:
    """One metric's score, or None with a MetricWarning when it is unavailable here."""
    try:
        return TEXT_METRICS[name](predictions, references)
    except MetricUnavailable as reason:
        warnings.warn(f"{name} unavailable: {reason}", MetricWarning, stacklevel=3)
        return None


def check_text_inputs(predictions: list[str], references: list[list[str]]) -> None:
    """Raise a LorakitError unless there is at least one item, one prediction string per item, and one or
    more non-blank reference strings per item. Items are numbered from 1 in messages."""
    if not predictions:
        raise LorakitError("no predictions to score (expected at least one)")
    if len(predictions) != len(references):
        raise LorakitError(
            f"{len(predictions)} predictions but {len(references)} reference lists (expected one list per prediction)"
        )
    for item, (pred, refs) in enumerate(zip(predictions, references), start=1):
        if not isinstance(pred, str):
            raise LorakitError(f"item {item}: prediction is {type(pred).__name__}, expected a string")
        if isinstance(refs, str) or not isinstance(refs, list | tuple):
            raise LorakitError(f"item {item}: references are {type(refs).__name__}, expected a list of strings")
        if not refs:
            raise LorakitError(f"item {item}: no references (expected at least one)")
        for k, ref in enumerate(refs, start=1):
            if not isinstance(ref, str) or not ref.strip():
                raise LorakitError(f"item {item}: reference {k} is {ref!r}, expected a non-blank string")


def classification_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and, for two labels, F1 of the positive class (label 1), both fractions in [0, 1].

    F1 is 0 when the positive class is never predicted or never present (no true positives).

    Raises:
        LorakitError: no items, lengths differ, fewer than two labels, or a value outside [0, num_labels).
    """
    check_classification_inputs(predictions, labels, num_labels)
    pairs = list(zip(predictions, labels))
    result = {"accuracy": sum(p == y for p, y in pairs) / len(pairs)}
    if num_labels == 2:
        true_pos = sum(p == 1 and y == 1 for p, y in pairs)
        predicted_pos = sum(p == 1 for p, _ in pairs)
        actual_pos = sum(y == 1 for _, y in pairs)
        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + actual positives)
        result["f1"] = 2 * true_pos / (predicted_pos + actual_pos) if true_pos else 0.0
    return result


def check_classification_inputs(predictions: list[int], labels: list[int], num_labels: int) -> None:
    """Raise a LorakitError unless predictions and labels are equally long, non-empty, and in range."""
    if num_labels < 2:
        raise LorakitError(f"num_labels is {num_labels}, expected at least 2")
    if not labels:
        raise LorakitError("no labels to score (expected at least one)")
    if len(predictions) != len(labels):
        raise LorakitError(f"{len(predictions)} predictions but {len(labels)} labels (expected one per label)")
    for kind, values in (("prediction", predictions), ("label", labels)):
        for item, value in enumerate(values, start=1):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < num_labels:
                raise LorakitError(f"item {item}: {kind} {value!r} is not a class index in 0..{num_labels - 1}")
