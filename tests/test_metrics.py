import pytest
from sacrebleu.metrics import BLEU

from lorakit.errors import LorakitError
from lorakit.metrics import (
    TEXT_METRICS,
    bleu,
    classification_metrics,
    lcs_length,
    parse_metric_names,
    rouge_l,
    text_metrics,
    tokenize,
)


def sacre(predictions, streams, lowercase=True):
    return BLEU(lowercase=lowercase, tokenize="13a").corpus_score(predictions, streams).score


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


def test_bleu_smooths_a_missing_4gram_match_like_mteval():
    # 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> mteval smoothing: 1 / (2 * 1); equal lengths: BP = 1.
    expected = 100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert bleu(["the cat sat down"], [["the cat sat up"]]) == pytest.approx(expected)


# ----- ROUGE-L -----


def test_tokenize_splits_punctuation_and_lowercases():
    assert tokenize("The cat, sat.  On  it!") == ["the", "cat", ",", "sat", ".", "on", "it", "!"]


def test_lcs_length():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # e.g. "bcba"
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_equal_precision_and_recall():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = 5/6, so F = 5/6.
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6)


def test_rouge_l_precision_differs_from_recall():
    # LCS 3; P = 3/3 = 1, R = 3/6 = 0.5; F = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94.
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(100 * 1.22 / 1.94)


def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # Ref 1: LCS 2 -> P = 2/4, R = 2/2. Ref 2: LCS 4 -> P = 4/4, R = 4/8. Max P = 1 and max R = 1 -> F = 1.
    assert rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(100.0)


def test_rouge_l_is_the_mean_over_items_and_ignores_case_and_punctuation_spacing():
    preds = ["The cat sat.", "nothing alike"]
    refs = [["the cat sat ."], ["the cat sat on the mat"]]
    assert rouge_l(preds, refs) == pytest.approx(50.0)


def test_rouge_l_empty_prediction_scores_zero():
    assert rouge_l([""], [["the cat"]]) == 0.0


# ----- text_metrics and names -----


def test_text_metrics_runs_all_or_the_named_ones():
    preds, refs = ["the cat sat on the mat"], [["the cat sat on the mat"]]
    assert text_metrics(preds, refs) == pytest.approx({"bleu": 100.0, "rouge_l": 100.0})
    assert list(text_metrics(preds, refs, ["rouge_l"])) == ["rouge_l"]
    assert set(TEXT_METRICS) >= {"bleu", "rouge_l"}


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
    with pytest.raises(LorakitError, match="unknown metric 'meteor'; known: bleu, rouge_l"):
        text_metrics(["a"], [["a"]], ["bleu", "meteor"])


def test_parse_metric_names():
    assert parse_metric_names("bleu") == ["bleu"]
    assert parse_metric_names(" BLEU, rouge_l,bleu ,") == ["bleu", "rouge_l"]


@pytest.mark.parametrize(("spec", "message"), [("", "names no metric"), (" , ", "names no metric"), ("e2e", "'e2e'")])
def test_parse_metric_names_rejects(spec, message):
    with pytest.raises(LorakitError, match=message) as info:
        parse_metric_names(spec)
    assert "known: bleu, rouge_l" in str(info.value)


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
