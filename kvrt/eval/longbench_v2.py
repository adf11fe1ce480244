"""LongBench v2 (Bai et al. 2024, arXiv 2412.15204; github.com/THUDM/LongBench): 503 multiple-choice
questions over long texts, read from the published `data.json` under `--data DIR`, else from HF
THUDM/LongBench-v2.

The standard setting is the repository's zero-shot one (pred.py with prompts/0shot.txt). The text
and the question with its four choices go in its template, through the chat template. The prompt
is cut in the middle to the context. The answer budget is 128 new tokens, and the letter is read
from "The correct answer is (X)". A sample scores 1 when the letter is the gold one. pred.py samples
at temperature 0.1; kvrt decodes greedily, as everywhere.

The chain-of-thought setting (`longbench_v2_cot`, pred.py --cot) asks twice: the text and question in
prompts/0shot_cot.txt, 1024 new tokens of reasoning; then prompts/0shot_cot_ans.txt, which leaves the
text out and holds the question with that reasoning, 128 new tokens for the answer, scored as above.
The templates are kept as published.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import json_value, read_file
from kvrt.eval.hub import HubFile

NAME, MAX_NEW_TOKENS = "longbench_v2", 128
COT_NAME, COT_NEW_TOKENS = "longbench_v2_cot", 1024  # the answer turn then takes MAX_NEW_TOKENS
HUB = HubFile("THUDM/LongBench-v2", "data.json")
FIELDS = ("_id", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
# prompts/0shot.txt, 0shot_cot.txt and 0shot_cot_ans.txt; $DOC$, $Q$, $C_A$-$C_D$ and $COT$ are filled in
TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n"
    "\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    "(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".')
COT_TEMPLATE = (
    "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n"
    "\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    "(C) $C_C$\n(D) $C_D$\n\nLet’s think step by step:")
COT_ANSWER_TEMPLATE = (
    "Please read the following text and answer the questions below.\n\n"
    "The text is too long and omitted here.\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    "(C) $C_C$\n(D) $C_D$\n\nLet’s think step by step: $COT$\n\n"
    "Based on the above, what is the single, most likely answer choice? "
    'Format your response as follows: "The correct answer is (insert answer here)".')


def read_items(path: Path) -> list[dict]:
    """The questions of a `data.json`; a file not in its format is one error."""
    items = json_value(read_file(path, "LongBench v2 file"), path)
    for number, item in enumerate(items if isinstance(items, list) else [None], start=1):
        missing = [k for k in FIELDS if not isinstance(item, dict) or k not in item]
        if missing:
            raise KvrtError(f"{path}: item {number} is not a LongBench v2 question (missing {', '.join(missing)})")
    return items


def prompt_text(item: dict, template: str = TEMPLATE) -> str:
    """The template filled in as pred.py fills it (every field stripped; the text only where it has $DOC$)."""
    fields = {"$DOC$": item["context"], "$Q$": item["question"], **{f"$C_{c}$": item[f"choice_{c}"] for c in "ABCD"}}
    for key, value in fields.items():
        template = template.replace(key, value.strip())
    return template


def chosen(prediction: str) -> str | None:
    """The letter a reply gives as "The correct answer is (X)" (or without the brackets), markdown stars aside."""
    text = prediction.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    return match.group(1) if match else None


def choice_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    return float(chosen(prediction) == gold)
