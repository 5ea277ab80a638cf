import math
import shutil
import sys

import pytest

from lorakit.evaluation import coco, ptb
from lorakit.evaluation.coco import MetricUnavailable, MetricWarning, meteor_java, ptb_tokenize_java
from lorakit.evaluation.e2e_metrics import (
    NIST_BETA,
    cider,
    clipped_matches,
    mteval_tokenize,
    nist,
    nist_brevity_penalty,
)
from lorakit.evaluation.metrics import TEXT_METRICS, parse_metric_names, rouge_l, text_metrics
from lorakit.evaluation.ptb import PTB_PUNCTUATION, ptb_tokenize, ptb_tokenize_items, ptb_tokenize_python

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")

# A small E2E-style corpus: references grouped per MR, their number varying.
PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Zizzi is a family-friendly pub in the city centre, it has a rating of 5 out of 5.",
    "Aromi's prices are high.",
]
REFERENCES = [
    ["The Eagle is a low-priced coffee shop near Burger King.", "Near Burger King, The Eagle coffee shop is cheap."],
    [
        "Zizzi, a kid friendly pub in the centre of the city, is rated 5 out of 5.",
        "Zizzi is a pub in the city centre. It is family-friendly and rated 5 out of 5.",
        "The Zizzi pub is family friendly, rated 5/5 and located in the city centre.",
    ],
    ["Aromi is expensive.", "Aromi has high prices (more than £30)."],
]
# The official pipeline on this corpus: pycocoevalcap 1.2's PTBTokenizer, then its Meteor, Rouge and Cider
# (as e2e-metrics' COCOEvalCap runs them); BLEU and NIST from the semantics of e2e-metrics' pymteval.
OFFICIAL = {"bleu": 49.5554609, "nist": 4.9660153, "meteor": 45.5429774, "rouge_l": 66.8158531, "cider": 3.1519435}


@pytest.fixture
def fresh_ptb_cache():
    ptb._ptb_tokenize_cached.cache_clear()
    yield
    ptb._ptb_tokenize_cached.cache_clear()


@pytest.fixture
def no_java(monkeypatch, fresh_ptb_cache):
    real_which = shutil.which
    monkeypatch.setattr(coco.shutil, "which", lambda name: None if name == "java" else real_which(name))


# ----- names -----


def test_e2e_names_the_five_metrics_of_the_challenge():
    assert parse_metric_names("e2e") == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert parse_metric_names("rouge_l, E2E ,bleu") == ["rouge_l", "bleu", "nist", "meteor", "cider"]
    assert set(parse_metric_names("e2e")) <= set(TEXT_METRICS)


# ----- NIST -----


def test_nist_on_a_tiny_corpus_by_hand():
    # References: "a b", "a c" (item 1) and "b a" (item 2): 6 tokens; a x3, b x2, c x1; ab, ac, ba x1 each.
    # info(a) = log2(6/3) = 1, info(b) = log2(6/2) = log2 3, info(a b) = log2(3/1), info(b a) = log2(2/1) = 1.
    # Predictions "a b" and "b a" match all their unigrams and bigrams:
    #   n = 1: (1 + log2 3 + log2 3 + 1) / 4 predicted unigrams;  n = 2: (log2 3 + 1) / 2 predicted bigrams;
    #   no 3- to 5-grams are predicted, so those orders add 0. Lengths: 4 vs 2 + 2 average -> no penalty.
    score = nist(["a b", "b a"], [["a b", "a c"], ["b a"]])
    assert score == pytest.approx(2 * (1 + math.log2(3)) / 2)


def test_nist_information_comes_from_the_whole_reference_corpus():
    # References "a b" and "a a" (of another item): 4 tokens; a x3, b x1; a b x1, a a x1.
    # info(a) = log2(4/3), info(b) = log2(4/1) = 2, info(a b) = log2(3/1). "x y" matches nothing but its
    # unigrams and bigram still count as predicted: n = 1: (log2(4/3) + 2) / 4;  n = 2: log2(3) / 2.
    score = nist(["a b", "x y"], [["a b"], ["a a"]])
    assert score == pytest.approx((math.log2(4 / 3) + 2) / 4 + math.log2(3) / 2)


def test_nist_clips_matches_at_the_largest_count_in_one_reference():
    assert clipped_matches(["a", "a", "a"], [["a", "b", "a"], ["a"]], 1) == {("a",): 2}
    assert clipped_matches(["a", "b"], [["b", "c"]], 2) == {}


def test_nist_brevity_penalty():
    assert nist_brevity_penalty(2, 3) == pytest.approx(0.5)  # beta is chosen so that 2/3 of the length gives 1/2
    assert nist_brevity_penalty(3, 3) == nist_brevity_penalty(5, 3) == 1.0
    assert nist_brevity_penalty(0, 3) == 0.0
    # "a b" against "a b c d": info(a) = info(b) = log2(4/1) = 2, info(a b) = log2(1/1) = 0 -> 2 before the penalty.
    assert nist(["a b"], [["a b c d"]]) == pytest.approx(2 * math.exp(-NIST_BETA * math.log(0.5) ** 2))


def test_nist_uses_lowercased_13a_tokens():
    assert (
        mteval_tokenize("The Eagle, near Café Rouge (£20-25).") == "the eagle , near café rouge ( £20 - 25 ) .".split()
    )
    assert nist(["The Cat, sat."], [["the cat , sat ."]]) == pytest.approx(
        nist(["the cat , sat ."], [["THE CAT, SAT."]])
    )


def test_nist_on_the_e2e_corpus_matches_the_official_port():
    assert nist(PREDICTIONS, REFERENCES) == pytest.approx(OFFICIAL["nist"], abs=1e-6)


def test_bleu_on_the_e2e_corpus_matches_the_official_port():
    assert text_metrics(PREDICTIONS, REFERENCES, ["bleu"])["bleu"] == pytest.approx(OFFICIAL["bleu"], abs=1e-6)


# ----- PTB tokenization -----


# Texts and their tokens from the Java tokenizer (lowercased, PTB_PUNCTUATION dropped).
PTB_CASES = [
    ("It's a £20-£25 place (cheap).", "it 's a # 20 # 25 place -lrb- cheap -rrb-"),
    ("Customers' rating: 5 out of 5, don't miss it!", "customers rating 5 out of 5 do n't miss it"),
    ("Can't, won't; cannot... \"Great\"", "ca n't wo n't can not great"),
    ("1,000 at 10:30 in the U.S. with Mr. Li's team.", "1,000 at 10:30 in the u.s. with mr. li 's team"),
    ("A family-friendly, 3-star pub - near the river", "a family-friendly 3-star pub near the river"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "tokens"), PTB_CASES)
def test_ptb_python_approximation(text, tokens):
    assert ptb_tokenize_python(text) == tokens.split()


@needs_java
def test_ptb_python_approximation_agrees_with_the_java_tokenizer_on_e2e_text():
    pytest.importorskip("pycocoevalcap")
    texts = [*PREDICTIONS, *(ref for refs in REFERENCES for ref in refs), *(text for text, _ in PTB_CASES)]
    texts += ["It isn't kid friendly & it's in Riverside; prices: £20-25, rated 1 out of 5!", "The Mill's ok..."]
    java = [[token for token in line.split() if token not in PTB_PUNCTUATION] for line in ptb_tokenize_java(texts)]
    assert [ptb_tokenize_python(text) for text in texts] == java


@needs_java
def test_ptb_java_matches_pycocoevalcaps_tokenizer():
    tokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    texts = ["The Eagle (a pub) isn't cheap.", "", "Line\nbreak: £30!", "...", "ok"]
    official = tokenizer.PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(texts)})
    assert [" ".join(tokens) for tokens in ptb_tokenize(texts)] == [official[i][0] for i in range(len(texts))]


def test_ptb_falls_back_to_python_with_a_warning(no_java):
    with pytest.warns(MetricWarning, match="java not found"):
        preds, refs = ptb_tokenize_items(["It's £20."], [["a (b)", "c"]])
    assert (preds, refs) == ([["it", "'s", "#", "20"]], [[["a", "-lrb-", "b", "-rrb-"], ["c"]]])


def test_ptb_tokenizer_failure_falls_back(monkeypatch, fresh_ptb_cache):
    def broken(texts):
        raise MetricUnavailable("the PTB tokenizer failed (exit 1): boom")

    monkeypatch.setattr(ptb, "ptb_tokenize_java", broken)
    with pytest.warns(MetricWarning, match="boom"):
        assert ptb_tokenize(["A b."]) == [["a", "b"]]


# ----- ROUGE-L and CIDEr against pycocoevalcap -----


def test_rouge_l_matches_pycocoevalcap_on_the_same_tokens():
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    preds, refs = ptb_tokenize_items(PREDICTIONS, REFERENCES)
    gold = {i: [" ".join(ref) for ref in item_refs] for i, item_refs in enumerate(refs)}
    hyps = {i: [" ".join(pred)] for i, pred in enumerate(preds)}
    expected, _ = rouge.Rouge().compute_score(gold, hyps)
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(100 * expected)


def test_cider_matches_pycocoevalcap_on_the_same_tokens():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    preds, refs = ptb_tokenize_items(PREDICTIONS, REFERENCES)
    gold = {i: [" ".join(ref) for ref in item_refs] for i, item_refs in enumerate(refs)}
    hyps = {i: [" ".join(pred)] for i, pred in enumerate(preds)}
    expected, _ = cider_module.Cider().compute_score(gold, hyps)
    assert cider(PREDICTIONS, REFERENCES) == pytest.approx(expected)


@needs_java
def test_rouge_l_and_cider_match_the_official_pipeline():
    pytest.importorskip("pycocoevalcap")
    scores = text_metrics(PREDICTIONS, REFERENCES, ["rouge_l", "cider"])
    assert scores == pytest.approx({"rouge_l": OFFICIAL["rouge_l"], "cider": OFFICIAL["cider"]}, abs=1e-6)


def test_cider_of_a_single_item_is_zero():
    pytest.importorskip("pycocoevalcap")
    # Document frequencies come from the scored corpus: with one item every n-gram has idf log(1/1) = 0.
    assert cider(["the cat sat"], [["the cat sat"]]) == 0.0


# ----- METEOR -----


@pytest.mark.slow
@needs_java
def test_meteor_matches_the_official_pipeline():
    pytest.importorskip("pycocoevalcap")
    # One Java start-up (~10 s: METEOR loads its paraphrase table).
    assert text_metrics(PREDICTIONS, REFERENCES, ["meteor"])["meteor"] == pytest.approx(OFFICIAL["meteor"], abs=1e-6)


@needs_java
def test_meteor_times_out_cleanly():
    pytest.importorskip("pycocoevalcap")
    with pytest.raises(MetricUnavailable, match="took more than"):
        meteor_java(["a b"], [["a b"]], timeout=0.2)


# ----- unavailable tools -----


def test_without_java_meteor_is_none_and_rouge_l_still_scores(no_java):
    with pytest.warns(MetricWarning) as caught:
        scores = text_metrics(
            ["The cat sat on the mat."], [["the cat sat on the mat ."]], ["meteor", "rouge_l", "bleu"]
        )
    assert scores["meteor"] is None
    assert scores["rouge_l"] == pytest.approx(100.0)
    assert scores["bleu"] == pytest.approx(100.0)
    messages = [str(warning.message) for warning in caught]
    assert any(message.startswith("meteor unavailable: java not found") for message in messages)


def test_without_pycocoevalcap_meteor_and_cider_are_none(monkeypatch, fresh_ptb_cache):
    monkeypatch.setattr(coco.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)  # makes the import fail
    with pytest.warns(MetricWarning, match=r"pycocoevalcap is not installed \(pip install 'lorakit\[e2e\]'\)"):
        scores = text_metrics(["the cat sat", "a dog"], [["the cat sat"], ["a dog ran"]], ["meteor", "cider", "nist"])
    assert scores["meteor"] is None and scores["cider"] is None
    assert scores["nist"] > 0


def test_a_java_that_cannot_run_makes_meteor_unavailable(monkeypatch, fresh_ptb_cache):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(coco.shutil, "which", lambda name: "/nonexistent/bin/java")
    with pytest.warns(MetricWarning) as caught:
        scores = text_metrics(["the cat sat"], [["the cat sat"]], ["meteor", "rouge_l"])
    assert scores == {"meteor": None, "rouge_l": pytest.approx(100.0)}
    assert any("could not run /nonexistent/bin/java" in str(warning.message) for warning in caught)
