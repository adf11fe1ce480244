"""LongBench v2 (Bai et al. 2024, arXiv 2412.15204; github.com/THUDM/LongBench): 503 multiple-choice
questions over long texts, read from the published `data.json` (HF THUDM/LongBench-v2) under
`--data DIR`.

The standard setting is the repository's zero-shot one (pred.py with prompts/0shot.txt). The text
and the question with its four choices go in its template, through the chat template. The prompt
is cut in the middle to the context. The answer budget is 128 new tokens, and the letter is read
from "The correct answer is (X)". A sample scores 1 when the letter is the gold one. pred.py samples
at temperature 0.1; kvrt decodes greedily, as everywhere. The chain-of-thought setting is not run
yet: it is two generations per question, first the reasoning, then the answer given the reasoning.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import json_value, read_file

NAME, MAX_NEW_TOKENS = "longbench_v2", 128
FIELDS = ("_id", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
TEMPLATE = ("Please read the following text and answer the question below.\n\n<text>\n{text}\n</text>\n\n"
            "What is the correct answer to this question: {question}\nChoices:\n(A) {a}\n(B) {b}\n(C) {c}\n(D) {d}\n\n"
            'Format your response as follows: "The correct answer is (insert answer here)".')


def read_items(data_dir: str) -> list[dict]:
    """The questions of `data.json` under `data_dir`; a file not in its format is one error."""
    path = Path(data_dir) / "data.json"
    if not path.exists():
        raise KvrtError(f"{NAME} reads --data DIR/data.json (LongBench v2's file, from HF THUDM/LongBench-v2)")
    items = json_value(read_file(path, "LongBench v2 file"), path)
    for number, item in enumerate(items if isinstance(items, list) else [None], start=1):
        missing = [k for k in FIELDS if not isinstance(item, dict) or k not in item]
        if missing:
            raise KvrtError(f"{path}: item {number} is not a LongBench v2 question (missing {', '.join(missing)})")
    return items


def prompt_text(item: dict) -> str:
    return TEMPLATE.format(text=item["context"].strip(), question=item["question"].strip(),
                           a=item["choice_A"].strip(), b=item["choice_B"].strip(), c=item["choice_C"].strip(),
                           d=item["choice_D"].strip())


def chosen(prediction: str) -> str | None:
    """The letter a reply gives as "The correct answer is (X)" (or without the brackets), markdown stars aside."""
    text = prediction.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    return match.group(1) if match else None


def choice_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    return float(chosen(prediction) == gold)
