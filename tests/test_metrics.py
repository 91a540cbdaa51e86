"""VQA-v2 soft accuracy and normalisation on cases computed by hand from the official rules (vqaEval.py), exact match,
per-turn accuracy and the paired comparison of two methods."""

from __future__ import annotations

import random
import statistics

import pytest

from pipeline.metrics import (
    exact_match,
    normalize_vqa_answer,
    paired_avg_difference,
    per_turn_accuracy,
    process_digit_article,
    process_punctuation,
    score,
    vqa_accuracy,
    vqa_accuracy_2016,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # final period stripped, number word -> digit
        ("The  Cat!", "cat"),  # "!" not beside a space -> becomes a space; article dropped; lower case
        ("yes, it is", "yes it is"),  # "," beside a space -> deleted
        ("1,000", "1000"),  # digit-comma-digit -> every listed mark deleted
        ("a,b", "b"),  # "," replaced by a space, then the article "a" dropped
        ("t-shirt", "t shirt"),  # "-" inside a word -> space
        ("well - maybe", "well maybe"),  # "-" beside spaces -> deleted, then whitespace collapsed
        ("2.5", "2.5"),  # a period before a digit is kept
        ("3.", "3"),
        ("none", "0"),
        ("\tten\n", "10"),
        ("dont", "don't"),  # contraction restored
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the official table's key is "Im", but lower() runs first: never matches (official quirk)
        ("don't", "don't"),  # "'" is not in the official punctuation list
        ("an apple", "apple"),
        ("what's up?", "what's up"),
    ],
)
def test_normalize_hand_cases(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_count_quirk() -> None:
    # The official code passes re.UNICODE (== 32) as the count: at most 32 periods go.
    assert process_punctuation("." * 40) == "." * 8


def test_punctuation_decision_uses_input_text() -> None:
    # "(" is beside a space in the input -> deleted everywhere; ")" is not beside a space -> replaced by a space.
    assert process_punctuation("a (b)c") == "a b c"
    assert process_digit_article("The THREE Bears") == "3 bears"


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("two", ["2"] * 10, 1.0),
        ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9),  # k = 3: (3 * 2/3 + 7 * 1) / 10
        ("no", ["yes"] * 3 + ["no"] * 7, 1.0),
        ("maybe", ["yes"] * 3 + ["no"] * 7, 0.0),
        ("red", ["red"] + ["blue"] * 9, 0.3),  # k = 1: (1 * 0 + 9 * 1/3) / 10
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # k = 2: (2 * 1/3 + 8 * 2/3) / 10
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # k = 4: every leave-one-out set has >= 3 matches
        ("t shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),  # references disagree -> punctuation processed
        ("t-shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),
        ("two", ["two"] * 4 + ["three"] * 6, 0.0),  # references never get number-word processing (official)
        ("two", ["two"] * 3 + ["2"] * 7, 1.0),
        ("a dog", ["dog"] * 10, 1.0),
        ("the dog", ["the dog"] * 10, 0.0),  # identical references are not processed at all; prediction is
        ("dog", ["the dog"] * 10, 0.0),
    ],
)
def test_vqa_2016_hand_cases(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy_2016(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        # the cases: identical references -> nothing normalised on either side
        ("Orange", ["orange"] * 10, 0.0),
        ("orange", ["orange"] * 10, 1.0),
        # disagreeing references -> both sides get punctuation + digit/article: "a dog" -> "dog" (k = 4)
        ("dog", ["a dog"] * 3 + ["dog"] + ["cat"] * 6, 1.0),
        ("two", ["2"] * 10, 0.0),
        ("two", ["two"] * 4 + ["three"] * 6, 1.0),  # references now get number words too
        ("the dog", ["the dog"] * 10, 1.0),
        ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9),
        ("red", ["red"] + ["blue"] * 9, 0.3),
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),
        (" red\n", ["red"] * 10, 1.0),  # whitespace is stripped on both sides in every case
        ("Yes", ["yes\t"] + ["yes"] * 9, 0.0),  # the references agree once stripped: no case folding
        ("t shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),
    ],
)
def test_vqa_current_hand_cases(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_the_two_versions_differ_only_where_the_fix_changed_the_rules() -> None:
    assert vqa_accuracy_2016("Orange", ["orange"] * 10) == 1.0
    assert vqa_accuracy_2016("dog", ["a dog"] * 3 + ["dog"] + ["cat"] * 6) == pytest.approx(0.3)
    assert score("vqa_v2", "Orange", ["orange"] * 10) == 0.0  # the source's default is the current file
    assert score("vqa_v2", "Orange", ["orange"] * 10, metric="vqa_v2_2016") == 1.0
    with pytest.raises(ValueError, match="unknown metric 'vqa'.*vqa_v2_2016"):
        score("vqa_v2", "x", ["x"], metric="vqa")


def _official_loop_2021(prediction: str, answers: list[str]) -> float:
    """The current official per-question loop over answer dicts with ids: whitespace on every answer, then the
    two processing steps on both sides only when the answers disagree."""
    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i + 1}
           for i, a in enumerate(answers)]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_digit_article(process_punctuation(g["answer"]))
        res = process_digit_article(process_punctuation(res))
    accs = []
    for g in gts:
        others = [item for item in gts if item != g]
        accs.append(min(1.0, len([item for item in others if item["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def _official_loop(prediction: str, answers: list[str]) -> float:
    """The 2016 official per-question loop, written over answer dicts with ids as the official code does."""
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    res = normalize_vqa_answer(prediction)
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_punctuation(g["answer"])
    accs = []
    for g in gts:
        others = [item for item in gts if item != g]
        accs.append(min(1.0, len([item for item in others if item["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_matches_official_loop_on_random_cases() -> None:
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red", "t-shirt", "t shirt", "the cat", "cat", "1,000", "1000", " yes\n", "a cat"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + ["Yes.", "Two", "A cat!"])
        assert vqa_accuracy_2016(prediction, answers) == pytest.approx(_official_loop(prediction, answers))
        assert vqa_accuracy(prediction, answers) == pytest.approx(_official_loop_2021(prediction, answers))


def test_exact_match() -> None:
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("The red", ["red"]) == 1.0
    assert exact_match("two", ["2"]) == 1.0
    assert exact_match("2", ["two"]) == 1.0  # both sides normalised
    assert exact_match("blue", ["red", "green"]) == 0.0
    assert exact_match("green", ["red", "green"]) == 1.0
    assert exact_match("red car", ["red"]) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        exact_match("red", [])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("red", "red")  # a bare string is not a list of answers


def test_per_turn_accuracy() -> None:
    out = per_turn_accuracy([[1, 0, 1], [0, 0, 1]])
    assert out == pytest.approx({"Acc_1": 50.0, "Acc_2": 0.0, "Acc_3": 100.0, "Avg": 50.0})
    out = per_turn_accuracy([[1.0, 1.0], [0.0]])  # turn 2 is averaged over the one dialogue that has it
    assert out == pytest.approx({"Acc_1": 50.0, "Acc_2": 100.0, "Avg": 75.0})
    out = per_turn_accuracy([[0.9, 0.3, 0.6]])
    assert out == pytest.approx({"Acc_1": 90.0, "Acc_2": 30.0, "Acc_3": 60.0, "Avg": 60.0})
    with pytest.raises(ValueError, match="dialogue 0 turn 2"):
        per_turn_accuracy([[1.0, 1.5]])
    with pytest.raises(ValueError):
        per_turn_accuracy([])


def test_paired_avg_difference_by_hand() -> None:
    # unequal lengths: turn 2 is reached by x only. c = 100 * sum_t delta_t / (T * n_t) = (16.67, 0, 16.67)
    a = {"x": [1, 1], "y": [0], "z": [1]}
    b = {"x": [0, 1], "y": [0], "z": [0], "only_b": [1]}  # a dialogue one side lacks is left out
    diff, se, n = paired_avg_difference(a, b)
    assert n == 3
    common = ["x", "y", "z"]
    assert diff == pytest.approx(per_turn_accuracy([a[k] for k in common])["Avg"]
                                 - per_turn_accuracy([b[k] for k in common])["Avg"])  # 83.33 - 50
    assert se == pytest.approx(50 / 3)  # sqrt(3 * var(16.67, 0, 16.67)), var = 92.59
    assert paired_avg_difference({"x": [1, 0]}, {"x": [0, 0]}) == (50.0, None, 1)
    with pytest.raises(ValueError, match="no evaluated dialogue"):
        paired_avg_difference({"x": [1]}, {"y": [1]})
    with pytest.raises(ValueError, match="dialogue x: 2 against 1"):
        paired_avg_difference({"x": [1, 0]}, {"x": [1]})


def test_paired_avg_difference_equal_lengths_is_the_mean_difference_and_covers_the_truth() -> None:
    rng = random.Random(0)
    a = {str(i): [rng.random() for _ in range(3)] for i in range(50)}
    b = {k: [rng.random() for _ in range(3)] for k in a}
    d = [100 * (sum(a[k]) - sum(b[k])) / 3 for k in a]  # per-dialogue differences
    diff, se, n = paired_avg_difference(a, b)
    assert diff == pytest.approx(statistics.mean(d)) and se == pytest.approx(statistics.stdev(d) / 50 ** 0.5)

    # the 95 % interval covers the true difference in about 95 % of repeated experiments; the two methods'
    # answers are correlated per dialogue (an easy or hard dialogue for both), which pairing must use
    covered, trials = 0, 400
    for _ in range(trials):
        a, b = {}, {}
        for i in range(120):
            easy = rng.random() < 0.6
            a[str(i)] = [float(rng.random() < (0.9 if easy else 0.5)) for _ in range(3)]
            b[str(i)] = [float(rng.random() < (0.85 if easy else 0.4)) for _ in range(3)]
        diff, se, _ = paired_avg_difference(a, b)
        covered += abs(diff - 100 * (0.6 * 0.05 + 0.4 * 0.1)) <= 1.96 * se
    assert 0.92 <= covered / trials <= 0.98
