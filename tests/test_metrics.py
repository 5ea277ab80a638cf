import pytest
from sacrebleu.metrics import BLEU

from lorakit.errors import LorakitError
from lorakit.evaluation import metrics
from lorakit.evaluation.metrics import (
    TEXT_METRICS,
    bleu,
    classification_metrics,
    lcs_length,
    parse_metric_names,
    rouge_l,
    rouge_l_item,
    text_metrics,
)


def sacre(predictions, streams, lowercase=True):
    # Unsmoothed: equal to the E2E script's BLEU whenever every n-gram order has a match, as in these tests.
    return BLEU(lowercase=lowercase, tokenize="13a", smooth_method="none").corpus_score(predictions, streams).score


# ----- BLEU -----


def test_bleu_identical_is_100():
    preds = ["the cat sat on the mat .", "a dog runs in the park"]
    assert bleu(preds, [[p] for p in preds]) == pytest.approx(100.0)


def test_bleu_matches_sacrebleu_multi_reference():
    preds = ["the cat sat on the mat today", "a dog runs in the park quickly"]
    refs = [
        ["the cat is on the mat today", "there is a cat on the mat"],
        ["a dog runs in a park", "the dog is running in the park quickly"],
    ]
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert bleu(preds, refs) == pytest.approx(sacre(preds, streams))


def test_bleu_variable_reference_counts_pad_with_none():
    # A short first prediction makes the padding visible: an '' reference (length 0) would be the
    # closest reference length and switch the brevity penalty off.
    preds = ["the cat", "a dog runs in the park quickly"]
    refs = [
        ["the cat is on the mat today"],
        ["a dog runs in a park", "the dog is running in the park quickly", "dogs run in parks"],
    ]
    by_hand = [
        ["the cat is on the mat today", "a dog runs in a park"],
        [None, "the dog is running in the park quickly"],
        [None, "dogs run in parks"],
    ]
    padded_empty = [[r if r is not None else "" for r in stream] for stream in by_hand]
    assert bleu(preds, refs) == pytest.approx(sacre(preds, by_hand))
    assert bleu(preds, refs) < sacre(preds, padded_empty)


def test_bleu_reference_order_does_not_matter():
    preds = ["the cat", "a dog runs in the park quickly"]
    refs = [["the cat is on the mat today"], ["a dog runs in a park", "the dog is running in the park quickly"]]
    swapped = [refs[0], refs[1][::-1]]
    assert bleu(preds, refs) == pytest.approx(bleu(preds, swapped))


def test_bleu_is_lowercased():
    preds = ["The Cat Sat On The Mat"]
    refs = [["the cat sat on the mat"]]
    assert bleu(preds, refs) == pytest.approx(100.0)
    assert sacre(preds, [["the cat sat on the mat"]], lowercase=False) < 100.0


def test_bleu_does_not_smooth_a_missing_4gram_match_like_the_e2e_script():
    # 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> the script's port of mteval floors 0 matches at
    # 1e-15 (the Perl mteval would smooth to 1/2 and give ~45); equal lengths: BP = 1.
    expected = 100 * (3 / 4 * 2 / 3 * 1 / 2 * 1e-15) ** 0.25
    assert bleu(["the cat sat down"], [["the cat sat up"]]) == pytest.approx(expected)
    assert bleu(["the cat sat down"], [["the cat sat up"]]) < 0.02


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # 4 tokens; references of 6 and 3 tokens: the closest length is 3 (|4 - 3| < |4 - 6|), below 4, so BP = 1.
    assert bleu(["a b c d"], [["a b c d e f", "a b c"]]) == pytest.approx(
        sacre(["a b c d"], [["a b c d e f"], ["a b c"]])
    )
    assert bleu(["a b c d"], [["a b c d e f", "a b c"]]) == pytest.approx(100.0)


# ----- ROUGE-L -----


def test_lcs_length():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # e.g. "bcba"
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_equal_precision_and_recall():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = 5/6, so F = 5/6.
    assert rouge_l_item("the cat sat on the mat".split(), ["the cat is on the mat".split()]) == pytest.approx(5 / 6)


def test_rouge_l_precision_differs_from_recall():
    # LCS 3; P = 3/3 = 1, R = 3/6 = 0.5; F = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94.
    assert rouge_l_item("the cat sat".split(), ["the cat sat on the mat".split()]) == pytest.approx(1.22 / 1.94)


def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # Ref 1: LCS 2 -> P = 2/4, R = 2/2. Ref 2: LCS 4 -> P = 4/4, R = 4/8. Max P = 1 and max R = 1 -> F = 1.
    assert rouge_l_item(list("abcd"), [list("ab"), list("abcdefgh")]) == pytest.approx(1.0)


def test_rouge_l_is_the_mean_over_items_on_ptb_tokens_without_case_or_punctuation():
    preds = ["The cat sat.", "nothing alike", "The cat sat on the mat"]
    refs = [["the cat, sat !"], ["the cat sat on the mat"], ["the cat is on the mat"]]
    assert rouge_l(preds, refs) == pytest.approx(100 * (1 + 0 + 5 / 6) / 3)


def test_rouge_l_empty_prediction_scores_zero():
    assert rouge_l_item([], [["the", "cat"]]) == 0.0
    assert rouge_l(["", "..."], [["the cat"], ["a dog"]]) == 0.0


# ----- text_metrics and names -----


def test_text_metrics_runs_all_or_the_named_ones(monkeypatch):
    preds, refs = ["the cat sat on the mat"], [["the cat sat on the mat"]]
    assert text_metrics(preds, refs, ["bleu", "rouge_l"]) == pytest.approx({"bleu": 100.0, "rouge_l": 100.0})
    assert list(text_metrics(preds, refs, ["rouge_l"])) == ["rouge_l"]
    assert list(TEXT_METRICS) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    for k, name in enumerate(TEXT_METRICS):  # stand-ins: the real METEOR takes ~10 s to start
        monkeypatch.setitem(TEXT_METRICS, name, lambda p, r, k=k: float(k))
    assert text_metrics(preds, refs) == {"bleu": 0.0, "nist": 1.0, "meteor": 2.0, "rouge_l": 3.0, "cider": 4.0}


def test_text_metrics_reports_an_unavailable_metric_as_none_with_a_warning(monkeypatch):
    def missing(predictions, references):
        raise metrics.MetricUnavailable("java not found on PATH")

    monkeypatch.setitem(TEXT_METRICS, "meteor", missing)
    with pytest.warns(metrics.MetricWarning, match="^meteor unavailable: java not found on PATH$"):
        scores = text_metrics(["the cat sat on the mat"], [["the cat sat on the mat"]], ["meteor", "bleu"])
    assert scores["meteor"] is None and scores["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([], [], "no predictions"),
        (["a b"], [["a b"], ["c"]], "1 predictions but 2 reference lists"),
        (["a b", "c"], [["a b"], []], "item 2: no references"),
        (["a b"], [["a b", "  "]], "item 1: reference 2 is '  '"),
        (["a b"], [["a b", None]], "item 1: reference 2 is None"),
        ([None], [["a b"]], "item 1: prediction is NoneType"),
        (["a b"], ["a b"], "item 1: references are str"),
    ],
)
def test_text_metrics_rejects_bad_input(predictions, references, message):
    with pytest.raises(LorakitError, match=message):
        text_metrics(predictions, references)


def test_text_metrics_rejects_unknown_metric():
    with pytest.raises(LorakitError, match="unknown metric 'spice'; known: bleu, nist, meteor, rouge_l, cider, e2e"):
        text_metrics(["a"], [["a"]], ["bleu", "spice"])


def test_parse_metric_names():
    assert parse_metric_names("bleu") == ["bleu"]
    assert parse_metric_names(" BLEU, rouge_l,bleu ,") == ["bleu", "rouge_l"]
    assert parse_metric_names("e2e") == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert parse_metric_names("cider,e2e") == ["cider", "bleu", "nist", "meteor", "rouge_l"]


@pytest.mark.parametrize(
    ("spec", "message"), [("", "names no metric"), (" , ", "names no metric"), ("e2e,bleurt", "'bleurt'")]
)
def test_parse_metric_names_rejects(spec, message):
    with pytest.raises(LorakitError, match=message) as info:
        parse_metric_names(spec)
    assert "known: bleu, nist, meteor, rouge_l, cider, e2e" in str(info.value)


# ----- classification -----


def test_classification_binary_accuracy_and_f1():
    # TP = 2 (items 1, 4), FP = 1 (item 3), FN = 1 (item 5): P = R = 2/3 -> F1 = 2/3; 3 of 5 correct.
    result = classification_metrics([1, 0, 1, 1, 0], [1, 0, 0, 1, 1], num_labels=2)
    assert result == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


def test_classification_f1_without_true_positives_is_zero():
    assert classification_metrics([0, 0], [0, 1], num_labels=2) == pytest.approx({"accuracy": 0.5, "f1": 0.0})


def test_classification_multiclass_has_accuracy_only():
    assert classification_metrics([0, 2, 1, 2], [0, 2, 2, 2], num_labels=3) == pytest.approx({"accuracy": 0.75})


@pytest.mark.parametrize(
    ("predictions", "labels", "num_labels", "message"),
    [
        ([], [], 2, "no labels"),
        ([0, 1], [0], 2, "2 predictions but 1 labels"),
        ([0], [0], 1, "num_labels is 1"),
        ([0, 2], [0, 1], 2, "item 2: prediction 2 is not a class index in 0..1"),
        ([0, 1], [-1, 1], 2, "item 1: label -1 is not a class index"),
        ([0.0], [0], 2, "item 1: prediction 0.0"),
    ],
)
def test_classification_rejects_bad_input(predictions, labels, num_labels, message):
    with pytest.raises(LorakitError, match=message):
        classification_metrics(predictions, labels, num_labels)
