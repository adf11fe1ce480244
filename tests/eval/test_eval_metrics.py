"""Each metric on hand-computed examples (LongBench's published definitions, RULER's matches)."""

import pytest

from kvrt.errors import KvrtError
from kvrt.eval.metrics import (classification, code_sim, count, lcs_length, normalize_answer, qa_f1, retrieval,
                               rouge_l, score_sample, string_match_all, string_match_part)


def test_normalization_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Cat, a dog!  An apple.") == "cat dog apple"


def test_qa_f1_is_the_token_bag_f1():
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1
    assert qa_f1("the cat sat on the mat", "Cat on mat.") == pytest.approx(2 * 0.75 / 1.75)
    assert qa_f1("dog", "cat") == 0.0
    assert qa_f1("x b b", "b b c") == pytest.approx(2 / 3)  # counts, not sets: 2 common of 3 and 3


def test_rouge_l_is_the_lcs_f1():
    assert lcs_length("a b c d".split(), "a c d e f".split()) == 3
    assert rouge_l("a b c d", "a c d e f") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_l("", "a") == 0.0


def test_classification_drops_classes_inside_the_gold_and_splits_credit():
    sample = {"all_classes": ["Location", "Human being", "Human", "Entity"]}
    assert classification("Human being", "Human being", sample) == 1.0  # "Human" is inside the gold
    assert classification("Entity or Location", "Location", sample) == 0.5
    assert classification("Entity", "Location", sample) == 0.0


def test_retrieval_and_count_score_the_share_of_right_numbers():
    assert retrieval("Paragraph 7, or maybe 12", "Paragraph 7") == 0.5
    assert retrieval("no idea", "Paragraph 7") == 0.0
    assert count("There are 5 unique paragraphs out of 12", "5") == 0.5


def test_code_sim_reads_the_first_line_that_is_not_a_comment_or_fence():
    assert code_sim("\n```python\n# set x\nx = 1\n", "x = 1") == 1.0
    assert code_sim("y = 2", "x = 1") == pytest.approx(0.6)  # " = " matches: 2·3 / 10


def test_ruler_string_matches():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_part("The numbers are 123 and 456.", ["789", "456"]) == 1.0
    assert string_match_all("ALPHA", ["alpha"]) == 1.0


def test_a_sample_scores_its_best_gold_answer():
    assert score_sample("qa_f1", "Paris", ["London", "paris"]) == 1.0
    assert score_sample("string_match_all", "x 1 2", ["1", "2", "3"]) == pytest.approx(2 / 3)
    with pytest.raises(KvrtError, match="unknown metric 'bleu'"):
        score_sample("bleu", "x", ["y"])
