"""Counting-Stars (Song et al. 2024, arXiv 2403.11802; github.com/nick7nlp/Counting-Stars): m
sentences of a little penguin counting stars spread evenly through a haystack, the i-th at depth
i/m; the model lists every count, in JSON. Two tasks, after the English version:

- searching (multi-evidence acquisition): "The little penguin counted N ★"; a star scores 1 when
  its count is in the reply's list.
- reasoning: each sentence first gives a wrong count (N ± 1), then says it was recounted and
  gives the right one; a star scores 1 for the right count alone, 0.5 with the wrong one too,
  0.25 for the wrong one alone.

A sample scores the mean over its stars; the reply's list is cut to m entries and deduplicated
first, as the benchmark's scorer does. The published files put 32 stars in up to 128k tokens;
kvrt generates them at any length: one star per 128 tokens, 32 at most, and never more than fill a
quarter of the prompt (reasoning's sentences are long), 2 at least; counts drawn at random (1-128)
by the seed.

The published English files (test_data/, made by gen_test_data.ipynb) run as two more tasks,
counting_stars_en_searching and counting_stars_en_reasoning, from --data DIR under their published
names: one record per context size (3,200 to 102,400 words, 32 stars), its "question" the whole
prompt (the text with its stars, then the question), "reference_counting_results" the right counts.
A reasoning record's wrong counts are read back from its star sentences, in order. Its prompt goes
through the chat template, cut in the middle to --max-length, as LOOM-Scope cuts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import jsonl_objects
from kvrt.eval.haystack import sentence_stream
from kvrt.eval.sample import Sample
from kvrt.eval.synthetic import Task

QUESTION = ("On this moonlit and misty night, the little penguin is looking up at the sky and concentrating on "
            "counting ★. Please help the little penguin collect the {what} of ★, for example: "
            '{{"little_penguin": [x, x, x,...]}}. The summation is not required, and the numbers in [x, x, x,...] '
            "represent the {counted} number of ★ by the little penguin. Only output the results in JSON format "
            "without any explanation.")


def star_count(length: int, star_tokens: int) -> int:
    """Stars in a prompt of `length` tokens whose star sentences take about `star_tokens` each."""
    return max(2, min(32, length // 128, length // (4 * star_tokens)))


class CountingStars(Task):
    max_new_tokens = 128

    def __init__(self, name: str, reasoning: bool):
        self.name, self.reasoning = name, reasoning
        self.metric = "stars_reasoning" if reasoning else "stars_searching"

    def star(self, right: int, wrong: int) -> str:
        if self.reasoning:
            return (f"The little penguin counted {wrong} ★, but found that a mistake had been made, so the counting "
                    f"was done again, and this time {right} ★ was counted correctly.")
        return f"The little penguin counted {right} ★"

    def sample(self, builder, rng, seed, haystack):
        m = star_count(builder.length, len(builder.ids(self.star(100, 101))))
        right = rng.sample(range(1, 129), m)
        wrong = [n + rng.choice((-1, 1)) for n in right]
        stars = [self.star(r, w) for r, w in zip(right, wrong)]
        question = (QUESTION.format(what="correct number", counted="correctly counted") if self.reasoning
                    else QUESTION.format(what="number", counted="counted"))
        depths = [(i + 1) / m for i in range(m)]
        ids, _ = builder.build("", stars, depths, question, "", sentence_stream(seed, haystack))
        return Sample("", ids, [str(n) for n in right], {"wrong": [str(n) for n in wrong]})


def counted(prediction: str, stars: int) -> list[str]:
    """The counts a reply lists: its little_penguin list if it parses, else every number in it; cut to
    `stars` entries, then deduplicated (the benchmark's own rule)."""
    listed = None
    match = re.search(r"\[[^\[\]]*\]", prediction)
    if match:
        try:
            listed = [str(x) for x in json.loads(match.group(0))]
        except ValueError:
            listed = None
    if listed is None:
        listed = re.findall(r"\d+", prediction)
    return list(dict.fromkeys(listed[:stars]))


def star_scores(reasoning: bool, prediction: str, answers: list[str], wrong: list[str]) -> list[float]:
    """Each star's points, in depth order: searching finds its count or not; reasoning's partial credit."""
    found = set(counted(prediction, len(answers)))
    if not reasoning:
        return [float(a in found) for a in answers]
    points = {(True, False): 1.0, (True, True): 0.5, (False, True): 0.25, (False, False): 0.0}
    return [points[a in found, w in found] for a, w in zip(answers, wrong)]


def searching_score(prediction: str, answers: list[str], meta: dict | None = None) -> float:
    return sum(star_scores(False, prediction, answers, [])) / len(answers) if answers else 0.0


def reasoning_score(prediction: str, answers: list[str], meta: dict | None = None) -> float:
    scores = star_scores(True, prediction, answers, (meta or {}).get("wrong", []))
    return sum(scores) / len(answers) if answers else 0.0


def star_records(record: dict) -> list[dict]:
    """A sample's record as one per star (its length, depth i/m and points), for the star x length heatmap."""
    answers = record["answers"]
    scores = star_scores(record["task"].endswith("reasoning"), record["prediction"], answers,
                         record["meta"].get("wrong", []))
    return [{"length": record["length"], "score": score, "meta": {"depth": (i + 1) / len(answers)}}
            for i, score in enumerate(scores)]


TASKS = {t.name: t for t in [CountingStars("counting_stars_searching", reasoning=False),
                             CountingStars("counting_stars_reasoning", reasoning=True)]}


# the published files by task (test_data/ in the repository; not on the Hugging Face hub)
FILES = {"counting_stars_en_searching": "Counting_Stars_EN_multi-evidence-retrieval-searching_128000_32_32.jsonl",
         "counting_stars_en_reasoning": "Counting_Stars_EN_multi-evidence-retrieval-reasoning_128000_32_32.jsonl"}
FILE_FIELDS = ("question", "context_size", "reference_counting_results")
ALL_TASKS = (*TASKS, *FILES)  # generated and published: one heatmap of their stars
WRONG_COUNT = re.compile(r"counted (\d+) ★, but found that a mistake")


def read_file_records(data_dir: str | None, name: str) -> list[dict]:
    """The records of task `name`'s published file under `data_dir`; a missing file or a record not in its
    format is one error naming it."""
    if data_dir is None or not (Path(data_dir) / FILES[name]).exists():
        raise KvrtError(f"{name} reads --data DIR/{FILES[name]} (github.com/nick7nlp/Counting-Stars, test_data/)")
    path, records = Path(data_dir) / FILES[name], []
    for number, record in jsonl_objects(path, "Counting-Stars file"):
        counts = record.get("reference_counting_results")
        missing = [k for k in FILE_FIELDS if k not in record]
        if missing or not isinstance(record["question"], str) or not isinstance(counts, list) or not counts:
            what = f"missing {', '.join(missing)}" if missing else "a question and a list of counts"
            raise KvrtError(f"{path}:{number}: not a Counting-Stars record ({what})")
        wrong = WRONG_COUNT.findall(record["question"])
        if name.endswith("reasoning") and len(wrong) != len(counts):
            raise KvrtError(f"{path}:{number}: {len(counts)} counts but {len(wrong)} star sentences with a wrong count")
        records.append({**record, "wrong": wrong})
    return records
