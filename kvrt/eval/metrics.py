"""Scoring: LongBench's published metrics (THUDM/LongBench) and RULER's string matches.

Every metric maps (prediction, one gold answer, the sample) to a score in [0, 1]; a sample
scores the maximum over its gold answers (`score_sample`). Task scores are means × 100.

- Normalization (qa_f1): lowercase, drop punctuation, drop the articles a/an/the, collapse
  whitespace.
- qa_f1: F1 of the bag of normalized tokens.
- rouge: ROUGE-L F1 over whitespace tokens, from the longest common subsequence
  (P = LCS/|pred|, R = LCS/|gold|): the sentence-level definition, not the `rouge`
  package's summary-level variant, which counts distinct words.
- classification: the classes (`all_classes`) named in the prediction, less those that are a
  substring of the gold class without being it; 1/|named| if the gold class is among them.
- retrieval: of the numbers in the prediction, the share equal to the paragraph number in
  the gold answer ("Paragraph 7" → 7).
- count: of the numbers in the prediction, the share equal to the gold count.
- code_sim: similarity (0..1) of the first prediction line that is not a comment or fence
  (no ` # //) with the gold: difflib's ratio 2·matches/total, which fuzzywuzzy's ratio is
  (× 100, rounded) without python-Levenshtein.
- RULER: string_match_all = share of golds found in the prediction (case-insensitive);
  string_match_part = 1 if any is.
- needle_recall (Kamradt's needle, kvrt's stand-in for its GPT-4 grade): the share of the
  answer's normalized words, with repeats, found in the prediction.
- stars_searching, stars_reasoning: Counting-Stars' scores over the counts the reply lists
  (kvrt/eval/counting_stars.py).
- babilong: BABILong's rule (kvrt/eval/babilong.py): the reply's first sentence names the answer
  and no other of the task's labels.
- choice: LongBench v2's (kvrt/eval/longbench_v2.py): the letter in "The correct answer is (X)"
  is the gold one.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from difflib import SequenceMatcher
from typing import Callable

from kvrt.eval import babilong, counting_stars, longbench_v2

ARTICLES = re.compile(r"\b(a|an|the)\b")
NUMBERS = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, gold: str, sample: dict | None = None) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence of two token lists (one DP row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, gold: str, sample: dict | None = None) -> float:
    pred, ref = prediction.split(), gold.split()
    lcs = lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def needle_recall(prediction: str, gold: str, sample: dict | None = None) -> float:
    """The share of the needle's answer words (normalized, with repeats) found in the prediction."""
    pred, ref = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(gold).split())
    return sum((pred & ref).values()) / sum(ref.values()) if ref else 0.0


def classification(prediction: str, gold: str, sample: dict | None = None) -> float:
    classes = (sample or {}).get("all_classes") or []
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not (c in gold and c != gold)]
    return 1.0 / len(named) if gold in named else 0.0


def _share_equal(prediction: str, value: str) -> float:
    numbers = NUMBERS.findall(prediction)
    return sum(n == value for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, gold: str, sample: dict | None = None) -> float:
    found = re.findall(r"Paragraph (\d+)", gold)
    return _share_equal(prediction, found[0]) if found else 0.0


def count(prediction: str, gold: str, sample: dict | None = None) -> float:
    return _share_equal(prediction, str(gold).strip())


def code_sim(prediction: str, gold: str, sample: dict | None = None) -> float:
    lines = [line for line in prediction.lstrip("\n").split("\n")
             if not any(mark in line for mark in ("`", "#", "//"))]
    first = lines[0] if lines else ""
    return SequenceMatcher(None, first, gold).ratio()


def string_match_all(prediction: str, golds: list[str], sample: dict | None = None) -> float:
    text = prediction.lower()
    return sum(g.lower() in text for g in golds) / len(golds) if golds else 0.0


def string_match_part(prediction: str, golds: list[str], sample: dict | None = None) -> float:
    text = prediction.lower()
    return float(any(g.lower() in text for g in golds))


PER_ANSWER: dict[str, Callable[[str, str, dict | None], float]] = {
    "qa_f1": qa_f1, "rouge": rouge_l, "classification": classification,
    "retrieval": retrieval, "count": count, "code_sim": code_sim, "needle_recall": needle_recall,
    "babilong": babilong.babilong_score, "choice": longbench_v2.choice_score,
}
WHOLE: dict[str, Callable[[str, list[str], dict | None], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part,
    "stars_searching": counting_stars.searching_score, "stars_reasoning": counting_stars.reasoning_score,
}
METRICS = (*PER_ANSWER, *WHOLE)


def score_sample(metric: str, prediction: str, answers: list[str], sample: dict | None = None) -> float:
    """One sample's score in [0, 1]: the max over gold answers (LongBench), or RULER's match over all."""
    if metric in WHOLE:
        return WHOLE[metric](prediction, answers, sample)
    if metric not in PER_ANSWER:
        from kvrt.errors import KvrtError

        raise KvrtError(f"unknown metric '{metric}'; available: {', '.join(METRICS)}")
    return max((PER_ANSWER[metric](prediction, gold, sample) for gold in answers), default=0.0)
