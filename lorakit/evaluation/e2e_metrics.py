"""NIST, METEOR and CIDEr as the official E2E NLG evaluation script (tuetschek/e2e-metrics) computes them.

The LoRA paper scores E2E with `measure_scores.py -p`: BLEU and NIST from the script's Python port of
mteval-v13a (lowercased, 13a tokenization), METEOR, ROUGE-L and CIDEr from the coco-caption code on
PTB-tokenized, lowercased text without punctuation. Each metric is `(predictions, references) -> float`;
one that cannot run here raises `MetricUnavailable` with the reason.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable

from .coco import INSTALL_HINT, METEOR_JAR, MetricUnavailable, coco_file, java_path, meteor_java
from .ptb import ptb_tokenize_items

NIST_ORDER = 5
# mteval's brevity factor: the penalty is 0.5 when the output is 2/3 of the reference length.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

Ngram = tuple[str, ...]


def nist(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus NIST with 5-grams, as the E2E script's mteval port computes it (not nltk's variant).

    Every n-gram gets an information weight from counts over all references of the corpus,
    info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) (the empty prefix counts all reference tokens).
    For each n, the weights of the prediction's n-grams that match a reference (clipped at the largest
    count in any one reference) are summed over the corpus and divided by the number of predicted n-grams;
    the five sums add up, times the brevity penalty `nist_brevity_penalty`. As for BLEU, a prediction shorter
    than n tokens has 0 n-grams (the port counts len - n + 1, which can be negative), and an order with no
    predicted n-grams at all adds 0 (where the port divides by zero).

    Returns:
        NIST (unbounded, typically 3 to 9 on E2E).
    """
    preds = [mteval_tokenize(pred) for pred in predictions]
    refs = [[mteval_tokenize(ref) for ref in item_refs] for item_refs in references]
    info = nist_information(refs)
    score = sum(nist_precision(preds, refs, info, n) for n in range(1, NIST_ORDER + 1))
    average_ref_len = sum(sum(len(ref) for ref in item_refs) / len(item_refs) for item_refs in refs)
    return nist_brevity_penalty(sum(len(pred) for pred in preds), average_ref_len) * score


def nist_information(references: list[list[list[str]]]) -> dict[Ngram, float]:
    """Information weight of every n-gram (n = 1..5) seen in the references, from corpus-wide counts."""
    counts: Counter[Ngram] = Counter()
    for ref in (ref for item_refs in references for ref in item_refs):
        counts[()] += len(ref)
        for n in range(1, NIST_ORDER + 1):
            counts.update(ngrams(ref, n))
    return {gram: math.log2(counts[gram[:-1]] / count) for gram, count in counts.items() if gram}


def nist_precision(
    predictions: list[list[str]], references: list[list[list[str]]], info: dict[Ngram, float], n: int
) -> float:
    """Information gained by matched n-grams over the corpus, per predicted n-gram (0 when there are none)."""
    gained = 0.0
    predicted = 0
    for pred, refs in zip(predictions, references):
        predicted += max(len(pred) - n + 1, 0)
        gained += sum(info[gram] * hits for gram, hits in clipped_matches(pred, refs, n).items())
    return gained / predicted if predicted else 0.0


def nist_brevity_penalty(prediction_len: int, reference_len: float) -> float:
    """exp(-beta * ln^2(ratio)) for ratio = prediction length / average reference length below 1, else 1."""
    ratio = prediction_len / reference_len if reference_len else 1.0
    if ratio >= 1:
        return 1.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2) if ratio > 0 else 0.0


def clipped_matches(prediction: list[str], references: list[list[str]], n: int) -> Counter[Ngram]:
    """The prediction's n-grams found in the references, each counted at most as often as in one reference."""
    most_in_a_reference: Counter[Ngram] = Counter()
    for ref in references:
        most_in_a_reference |= ngrams(ref, n)  # | keeps the larger count
    return ngrams(prediction, n) & most_in_a_reference  # & keeps the smaller count, drops zeros


def ngrams(tokens: list[str], n: int) -> Counter[Ngram]:
    """Counts of the n-grams of a token list."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def mteval_tokenize(text: str) -> list[str]:
    """Lowercase and tokenize as mteval-v13a does (sacrebleu's 13a tokenizer): "Hi, there." -> hi , there ."""
    return _tokenizer_13a()(text.lower()).split()


@functools.cache
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # imported when NIST is asked for

    return Tokenizer13a()


def meteor(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus METEOR 1.5 (English, `-norm`) from the Java jar pycocoevalcap ships, on PTB-tokenized text.

    The corpus score comes from the summed alignment statistics of all items (METEOR's own aggregate),
    as in the E2E script. Never replaced by nltk's METEOR, which gives different scores.

    Returns:
        METEOR in [0, 100].

    Raises:
        MetricUnavailable: Java or pycocoevalcap is missing, or the jar failed or timed out.
    """
    java_path(), coco_file(METEOR_JAR)  # fail before tokenizing when METEOR cannot run anyway
    preds, refs = ptb_tokenize_items(predictions, references)
    return 100.0 * meteor_java([" ".join(pred) for pred in preds], [[" ".join(r) for r in rs] for rs in refs])


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (n = 1..4, sigma = 6, clipped, x10) from pycocoevalcap's scorer, on PTB-tokenized text.

    Document frequencies come from the references of the scored corpus itself, as in the E2E script, so a
    corpus of one item scores 0 and scores are comparable only on the same reference set.

    Returns:
        CIDEr on coco-caption's scale (E2E systems score about 1.5 to 2.6).

    Raises:
        MetricUnavailable: pycocoevalcap is missing.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise MetricUnavailable(f"pycocoevalcap is not installed ({INSTALL_HINT})") from error
    preds, refs = ptb_tokenize_items(predictions, references)
    hypotheses = {item: [" ".join(pred)] for item, pred in enumerate(preds)}
    gold = {item: [" ".join(ref) for ref in item_refs] for item, item_refs in enumerate(refs)}
    score, _ = Cider().compute_score(gold, hypotheses)
    return float(score)
