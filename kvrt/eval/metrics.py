"""Scoring: LongBench's published metrics (THUDM/LongBench) and RULER's string matches.

Every metric maps (prediction, one gold answer, the sample) to a score in [0, 1]; a sample
scores the maximum over its gold answers (`score_sample`). Task scores are means × 100.

- Normalization (qa_f1): lowercase, drop punctuation, drop the articles a/an/the, collapse
  whitespace.
- qa_f1: F1 of the bag of normalized tokens.
- rouge: ROUGE-L F1 over whitespace tokens, from the longest common subsequence
  (P = LCS/|pred|, R = LCS/|gold|): the sentence-level definition, not the `rouge`
  package's summary-level variant, which counts distinct words.
- rouge_lsum (InfiniteBench's En.Sum): rouge_score's rougeLsum as HF Evaluate's `rouge` runs it (no
  stemmer): texts split into sentences at newlines, tokens the runs of [a-z0-9] in the lowercased text;
  each gold sentence's union LCS with the reply's sentences (rouge_score's backtrack picks each LCS),
  a token counted at most as often as both texts hold it; F1 of hits/|reply| and hits/|gold|.
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
- infbench_first_int, infbench_kv, infbench_choice, infbench_debug, infbench_math: InfiniteBench's
  scorers for its retrieval, multiple-choice, Code.Debug and Math.Find tasks (kvrt/eval/infinitebench.py).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from difflib import SequenceMatcher
from typing import Callable

from kvrt.eval import babilong, counting_stars, infinitebench, longbench_v2

ARTICLES = re.compile(r"\b(a|an|the)\b")
NUMBERS = re.compile(r"\d+")
ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


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


def lcs_indices(ref: list[str], can: list[str]) -> set[int]:
    """The positions in `ref` of the longest common subsequence that rouge_score's backtrack reads out (the
    full table, since which LCS it picks changes the union)."""
    table = [[0] * (len(can) + 1)]
    for x in ref:
        above, row = table[-1], [0]
        for j, y in enumerate(can, start=1):
            row.append(above[j - 1] + 1 if x == y else max(above[j], row[j - 1]))
        table.append(row)
    i, j, picked = len(ref), len(can), set()
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            picked.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return picked


def rouge_sentences(text: str) -> list[list[str]]:
    return [ROUGE_TOKEN.findall(line.lower()) for line in text.split("\n") if line]


def rouge_lsum(prediction: str, gold: str, sample: dict | None = None) -> float:
    """Summary-level ROUGE-L F1 (rougeLsum), as rouge_score computes it (see the module docstring)."""
    refs, cans = rouge_sentences(gold), rouge_sentences(prediction)
    m, n = sum(map(len, refs)), sum(map(len, cans))
    if not m or not n:
        return 0.0
    left_ref, left_can = Counter(t for s in refs for t in s), Counter(t for s in cans for t in s)
    hits = 0
    for ref in refs:
        for i in sorted(set().union(*(lcs_indices(ref, can) for can in cans))):
            token = ref[i]
            if left_ref[token] > 0 and left_can[token] > 0:  # each token counted once, as ROUGE 1.5.5
                hits += 1
                left_ref[token] -= 1
                left_can[token] -= 1
    precision, recall = hits / n, hits / m
    return 2 * precision * recall / (precision + recall) if hits else 0.0


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
    "babilong": babilong.babilong_score, "choice": longbench_v2.choice_score, "rouge_lsum": rouge_lsum,
    "infbench_first_int": infinitebench.first_int_score, "infbench_kv": infinitebench.kv_score,
    "infbench_math": infinitebench.math_score,
}
WHOLE: dict[str, Callable[[str, list[str], dict | None], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part,
    "stars_searching": counting_stars.searching_score, "stars_reasoning": counting_stars.reasoning_score,
    "infbench_choice": infinitebench.choice_score, "infbench_debug": infinitebench.debug_score,
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
