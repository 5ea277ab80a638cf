"""PTB tokenization as the coco-caption code (and so the E2E script) prepares text for METEOR, ROUGE-L, CIDEr.

The official path runs the Stanford PTB tokenizer (Java, shipped in pycocoevalcap) with `-lowerCase`,
then drops the tokens in `PTB_PUNCTUATION`. Without Java or pycocoevalcap, `ptb_tokenize` falls back to
`ptb_tokenize_python`, a regex approximation that agrees with the Java tokenizer on E2E-style English
(clitics, currency, brackets, numbers) and warns that it was used.
"""

from __future__ import annotations

import functools
import re
import warnings

from .coco import MetricUnavailable, MetricWarning, ptb_tokenize_java

# The tokens coco-caption removes after tokenizing. The bracket names are upper case here but the tokenizer
# lowercases them (-lrb-), so brackets are kept: the official scores keep them, and so do we.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Characters the Java tokenizer rewrites, as it writes them out (lowercased); brackets go in last, as
# their names would otherwise look like hyphenated words to the splitting rules.
_BRACKETS = str.maketrans(
    {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
)
_REWRITES = str.maketrans(
    {
        "£": " # ", "€": " $ ", "$": " $ ", "*": " * ",
        "“": " `` ", "”": " '' ", '"': " '' ", "‘": "'", "’": "'", "…": " ... ", "—": " -- ", "–": " -- ",
    }
)  # fmt: skip
_SPLITS = [
    (re.compile(r"(?<!\w)'|'(?!\w)"), " ' "),  # quotes and trailing apostrophes (customers'), before clitics
    (re.compile(r"\b(ca|wo)(n't)\b"), r"\1 \2"),  # can't -> ca n't, won't -> wo n't
    (re.compile(r"\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1 \2"),  # it's -> it 's, don't -> do n't
    (re.compile(r"\.\.\.|--|[!?]+|;"), r" \g<0> "),
    (re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),  # not inside numbers: 1,000 and 10:30 stay
    (re.compile(r"(?<=\d)\.(?=[a-z])|(?<![\w.])\.(?=[a-z])"), " . "),  # 5.in, .in -> . in (riverside.it stays)
    (re.compile(r"(?<=\w)-(?=\s|$)|(?<=\s)-(?=\w)"), " - "),  # a hyphen at a word's edge (£20-£25)
]
_ABBREVIATION = re.compile(r"(\w\.)+\w\.?|(mr|mrs|ms|dr|st|jr|etc|inc|ltd|co|vs|approx)\.")


def ptb_tokenize(texts: list[str]) -> list[list[str]]:
    """Tokenize and lowercase as coco-caption does, punctuation removed: the Java tokenizer when it can
    run, else `ptb_tokenize_python` with a MetricWarning. Results are cached: several metrics of one run
    tokenize the same texts, and the Java start-up is paid once."""
    return [list(tokens) for tokens in _ptb_tokenize_cached(tuple(texts))]


@functools.lru_cache(maxsize=4)
def _ptb_tokenize_cached(texts: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    try:
        lines = ptb_tokenize_java(list(texts))
    except MetricUnavailable as reason:
        warnings.warn(
            f"PTB tokenizer unavailable ({reason}); using lorakit's Python approximation of it, so scores on "
            "PTB tokens (ROUGE-L, CIDEr) may differ slightly from the official E2E ones",
            MetricWarning,
            stacklevel=2,
        )
        return tuple(tuple(ptb_tokenize_python(text)) for text in texts)
    return tuple(tuple(token for token in line.split() if token not in PTB_PUNCTUATION) for line in lines)


def ptb_tokenize_python(text: str) -> list[str]:
    """Approximate the Stanford PTB tokenizer (`-lowerCase`) and drop `PTB_PUNCTUATION`, in Python.

    "It's £20-£25 (cheap)." -> it 's # 20 # 25 -lrb- cheap -rrb-
    """
    text = text.lower().translate(_REWRITES)
    for pattern, replacement in _SPLITS:
        text = pattern.sub(replacement, text)
    text = text.translate(_BRACKETS)
    tokens = [token for word in text.split() for token in split_final_period(word)]
    return [token for token in tokens if token not in PTB_PUNCTUATION]


def split_final_period(word: str) -> list[str]:
    """Split a word-final period off ("mill." -> mill .) unless the word is an abbreviation ("e.g.", "st.")."""
    if word.endswith(".") and word.rstrip(".") and not _ABBREVIATION.fullmatch(word):
        return [word[:-1], "."]
    return [word]


def ptb_tokenize_items(
    predictions: list[str], references: list[list[str]]
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """`ptb_tokenize` predictions and their references in one call (one Java start-up).

    Returns:
        (tokens of each prediction, tokens of each reference of each item).
    """
    tokens = ptb_tokenize([*predictions, *(ref for refs in references for ref in refs)])
    predicted, rest = tokens[: len(predictions)], iter(tokens[len(predictions) :])
    return predicted, [[next(rest) for _ in refs] for refs in references]
