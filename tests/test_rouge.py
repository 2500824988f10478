import json

import pytest

from experiments.rouge import RougeResult, score, sentence_lines


def test_identical_texts_score_100_everywhere():
    texts = ["The cat sat on the mat. It was happy.", "Prices rose sharply.\nMarkets fell."]
    result = score(texts, texts)
    for value in (result.rouge1, result.rouge2, result.rougeL, result.rougeLsum):
        assert value == pytest.approx(100.0)
    assert result.per_sample_rouge1 == pytest.approx([100.0, 100.0])
    assert result.n == 2


def test_disjoint_texts_score_0_everywhere():
    result = score(["alpha beta gamma"], ["delta epsilon zeta"])
    assert (result.rouge1, result.rouge2, result.rougeL, result.rougeLsum) == (0.0, 0.0, 0.0, 0.0)


def test_hand_computed_rouge1():
    # Unigrams: 2 of 3 match either way, so P = R = F = 2/3; bigrams: "the cat" of 2, so F = 1/2.
    result = score(["the cat sat"], ["the cat ran"])
    assert result.rouge1 == pytest.approx(200 / 3)
    assert round(result.rouge1, 2) == 66.67
    assert result.rouge2 == pytest.approx(50.0)


def test_score_is_the_mean_over_samples():
    result = score(["the cat sat", "a b c"], ["the cat ran", "a b c"])
    assert result.rouge1 == pytest.approx((200 / 3 + 100) / 2)


def test_sentence_lines_keeps_newlines_or_splits_on_final_punctuation():
    assert sentence_lines("One line.\n\n  Two line.  \n") == "One line.\nTwo line."
    assert sentence_lines("First one. Second! Third? yes") == "First one.\nSecond!\nThird?\nyes"
    assert sentence_lines("3.5 percent rose.") == "3.5 percent rose."


def test_rouge_lsum_uses_sentences():
    # Same sentences in the opposite order: one LCS over the whole text matches only one of them,
    # the summary-level LCS matches both.
    prediction = "dogs bark loudly. cats purr softly."
    reference = "cats purr softly. dogs bark loudly."
    result = score([prediction], [reference])
    assert result.rougeLsum == pytest.approx(100.0)
    assert result.rougeL < 100.0


def test_ci_of_one_identical_sample_has_zero_width():
    result = score(["same words"], ["same words"])
    assert result.rouge1_ci == (100.0, 100.0)


def test_ci_contains_point_estimate_and_widens_with_confidence():
    predictions = ["the cat sat", "a dog ran far", "birds fly south", "fish swim", "cows moo loudly today"]
    references = ["the cat ran", "a dog ran", "birds sing", "fish swim", "the cows are quiet"]
    narrow = score(predictions, references, confidence=0.5)
    wide = score(predictions, references, confidence=0.99)
    assert narrow.rouge1 == wide.rouge1
    for result in (narrow, wide):
        low, high = result.rouge1_ci
        assert low <= result.rouge1 <= high
    assert wide.rouge1_ci[0] <= narrow.rouge1_ci[0] and narrow.rouge1_ci[1] <= wide.rouge1_ci[1]
    assert wide.rouge1_ci[1] - wide.rouge1_ci[0] > narrow.rouge1_ci[1] - narrow.rouge1_ci[0]


def test_ci_narrows_with_more_samples():
    pairs = [("the cat sat", "the cat ran"), ("alpha", "beta"), ("x y", "x y")]
    few = score(*map(list, zip(*pairs)))
    many = score(*map(list, zip(*(pairs * 30))))
    assert many.rouge1 == pytest.approx(few.rouge1)
    assert many.rouge1_ci[1] - many.rouge1_ci[0] < few.rouge1_ci[1] - few.rouge1_ci[0]


def test_bootstrap_is_reproducible_with_a_seed():
    # Twenty samples sharing 0..9 of their 10 words with the reference: enough distinct values that two
    # seeds cannot land on the same percentiles.
    words = "a b c d e f g h i j".split()
    references = [" ".join(words)] * 20
    predictions = [" ".join(words[: k % 10] + ["z"] * (10 - k % 10)) for k in range(20)]
    assert score(predictions, references, seed=7) == score(predictions, references, seed=7)
    assert score(predictions, references, seed=7).rouge1_ci != score(predictions, references, seed=8).rouge1_ci


def test_to_dict_is_json_able():
    result = score(["the cat sat"], ["the cat ran"], confidence=0.9)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["confidence"] == 0.9
    assert data["rouge1_ci"] == list(result.rouge1_ci)
    assert data["n"] == 1
    assert set(data) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "per_sample_rouge1"}
    assert isinstance(result, RougeResult)


@pytest.mark.parametrize(
    "predictions, references, kwargs",
    [
        (["a"], ["a", "b"], {}),
        ([], [], {}),
        (["a"], ["a"], {"confidence": 1.0}),
        (["a"], ["a"], {"n_boot": 0}),
    ],
)
def test_programming_errors_raise_value_error(predictions, references, kwargs):
    with pytest.raises(ValueError):
        score(predictions, references, **kwargs)
