"""InfiniteBench (Zhang et al. 2024, "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens", arXiv
2402.13718; github.com/OpenBMB/InfiniteBench): eight of its English tasks, read from the published JSONL files
under `--data DIR` (DIR/<name>.jsonl as scripts/download_dataset.sh names them), else from HF
xinrongzhang2022/InfiniteBench.
kvrt names each `infinitebench_<name>`: Retrieve.PassKey (passkey), Retrieve.Number (number_string), Retrieve.KV
(kv_retrieval), En.Sum (longbook_sum_eng), En.MC (longbook_choice_eng), En.QA (longbook_qa_eng), Math.Find
(math_find), Code.Debug (code_debug).

The standard setting is the one the repository runs open models in (src/eval_yarn_mistral.py, eval_yi_200k.py,
eval_chatglm.py): its `yarn_mistral_templates` (kvrt/eval/infinitebench_prompts.py) filled as create_prompt does
and given as plain text, without the chat template, most ending in an answer prefix ("The pass key is"); the
answer budget of DATA_NAME_TO_MAX_NEW_TOKENS; the prompt cut in the middle to the model's length (kvrt:
--max-length less the answer's room, where the scripts cut to 128K tokens and leave generation outside it);
greedy decoding. Not GPT-4's chat templates: the repository sent those to the API with no token limit, and the
budgets were set for the answer-prefixed ones. A chat reply has no room in 6 tokens for a passkey or in 3 for
Math.Find, and Code.Debug's GPT-4 template asks the model to repeat the options' code before its 5-token answer.

Scoring follows src/compute_scores.py, task by task (kvrt/eval/metrics.py maps the names):
- infbench_first_int (passkey, number_string): the reply's first run of digits is the gold string.
- infbench_kv (kv_retrieval): the gold is one of the reply's words, split at whitespace and \\n : " ' . , ? ! { }.
- qa_f1 (longbook_qa_eng): LongBench's token F1 after normalization, the max over the golds.
- rouge_lsum (longbook_sum_eng): the `rouge` of HF Evaluate (rouge_score's rougeLsum, no stemmer), the max over
  the golds.
- infbench_choice (longbook_choice_eng) and infbench_debug (code_debug): the golds are the option's text and its
  letter, as get_answer makes them, read from the reply by get_score_one_longbook_choice_eng and
  get_score_one_code_debug, quirks included: a Code.Debug reply that is just the letter ("B") scores 0, for it
  wants "B." or "B:" first or an "answer is:"-like prefix.
- infbench_math (math_find): the reply's first number (\\d+\\.\\d+ or \\d+) equals the gold, as an int for an int
  gold, as a float for a float one; where compute_scores.py raises (a decimal first number for an int gold),
  kvrt scores 0.
Where compute_scores.py takes only a list's first gold (passkey, number_string, math_find) or compares a list
gold as a whole (kv_retrieval), kvrt scores the best gold of the list; the published files hold one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import jsonl_objects
from kvrt.eval.hub import HubFile
from kvrt.eval.infinitebench_prompts import TEMPLATES

PREFIX, CHAT, LETTERS = "infinitebench_", False, "ABCD"
FIELDS = ("context", "input", "answer")
CHOICE = ("longbook_choice_eng", "code_debug")  # four options, scored against the option's text and letter
MATH_TARGET = re.compile(r"The .+ of")  # "The largest number of the list is: " -> "the largest number"


@dataclass(frozen=True)
class Spec:
    name: str  # the data name: DIR/<name>.jsonl and its template's key
    title: str  # the paper's name for it
    max_new_tokens: int  # DATA_NAME_TO_MAX_NEW_TOKENS
    metric: str


SPECS = [
    Spec("passkey", "Retrieve.PassKey", 6, "infbench_first_int"),
    Spec("number_string", "Retrieve.Number", 12, "infbench_first_int"),
    Spec("kv_retrieval", "Retrieve.KV", 50, "infbench_kv"),
    Spec("longbook_qa_eng", "En.QA", 40, "qa_f1"),
    Spec("longbook_choice_eng", "En.MC", 40, "infbench_choice"),
    Spec("longbook_sum_eng", "En.Sum", 1200, "rouge_lsum"),
    Spec("code_debug", "Code.Debug", 5, "infbench_debug"),
    Spec("math_find", "Math.Find", 3, "infbench_math"),
]
TASKS = {PREFIX + s.name: s for s in SPECS}


def hub_file(name: str) -> HubFile:
    """Where the hub keeps a task's file (HF xinrongzhang2022/InfiniteBench, as scripts/download_dataset.sh fetches)."""
    return HubFile("xinrongzhang2022/InfiniteBench", f"{name}.jsonl")


def read_items(path: Path, name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` records of task `name`'s file (all without one), each with an "id"; a record that is not
    the task's is one error naming the file and line."""
    items: list[dict] = []
    # blank lines are skipped, as compute_scores.py does; a line past the limit is never parsed
    for number, item in islice(jsonl_objects(path, "InfiniteBench file"), limit):
        problem = record_problem(name, item)
        if problem:
            raise KvrtError(f"{path}:{number}: not an InfiniteBench {name} record ({problem})")
        item.setdefault("id", len(items))
        items.append(item)
    return items


def record_problem(name: str, item: dict) -> str | None:
    """What keeps `item` from being a record of task `name`, or None."""
    missing = [k for k in FIELDS + (("options",) if name in CHOICE else ()) if k not in item]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(item["context"], str) or not isinstance(item["input"], str):
        return "context and input must be text"
    if name in CHOICE:
        return None if option_gold(item) else "its answer is not one of four options"
    if name == "math_find":
        if not MATH_TARGET.search(item["input"]):
            return "its input names no 'The ... of' number to find"
        return None if all(number_value(g) is not None for g in golds(name, item)) else "its answer is not a number"
    return None if golds(name, item) else "no answer"


def option_gold(item: dict) -> list[str] | None:
    """[the option's text, its letter], as get_answer makes it from an answer that is the text (or [text], or
    already [text, letter]); None when the answer is none of four options."""
    answer, options = item["answer"], item["options"]
    if not isinstance(options, list) or len(options) < 4 or not all(isinstance(o, str) for o in options[:4]):
        return None
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in tuple(LETTERS):
        return [str(answer[0]), answer[1]]
    text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    return [text, LETTERS[options.index(text)]] if text in options[:4] else None


def golds(name: str, item: dict) -> list[str]:
    """The gold answers as text: the option's text and letter for En.MC and Code.Debug, else the answer (a
    value or a list of them); a number keeps its form ("88", "45.5"), which tells Math.Find int from float."""
    if name in CHOICE:
        return option_gold(item) or []
    answer = item["answer"]
    return [str(a) for a in (answer if isinstance(answer, list) else [answer])]


def math_find_prefix(question: str) -> str:
    """create_prompt's first line for Math.Find: "What is <the target> in the following list?", the target cut
    from the input's "The ... of" (lowercased, " of" dropped; greedy, as published, up to the last " of")."""
    target = MATH_TARGET.search(question)
    if target is None:
        raise KvrtError(f"Math.Find input names no 'The ... of' number to find: {question[:80]!r}")
    return f"What is {target.group(0).lower()[:-3]} in the following list?"


def prompt_text(name: str, item: dict) -> str:
    """The task's template filled as create_prompt fills it (the input is the books' {question})."""
    fields = {"context": item["context"], "input": item["input"], "question": item["input"]}
    if name in CHOICE:
        fields |= {f"OPTION_{letter}": option for letter, option in zip(LETTERS, item["options"])}
    if name == "math_find":
        fields["prefix"] = math_find_prefix(item["input"])
    return TEMPLATES[name].format(**fields)


def meta(name: str, item: dict) -> dict:
    """What a record keeps beside the golds: the options the letters stand for."""
    return {"options": item["options"][:4]} if name in CHOICE else {}


# --- scoring: src/compute_scores.py's get_score_one_* per task


def squeeze(text: str, separators) -> str:
    """`text` with each separator made a space and runs of spaces made one, as the scorers clean replies."""
    for separator in separators:
        text = text.replace(separator, " ")
    return re.sub(" {2,}", " ", text)


def first_int_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    """Retrieve.PassKey, Retrieve.Number: the reply's first run of ASCII digits is the gold."""
    found = re.search(r"[0-9]+", prediction)
    return float(found is not None and found.group(0) == gold)


def kv_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    """Retrieve.KV: the gold value is one of the reply's words."""
    return float(gold in squeeze(prediction, ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]).split())


def choice_score(prediction: str, golds: list[str], sample: dict | None = None) -> float:
    """En.MC (golds: the option's text and letter): a reply starting with a letter is that letter; else the reply
    is the text or letter itself, or follows an answer prefix, or else its first word that is a substring of
    "ABCD" ("AB" too, as published: it then matches no gold) is the letter."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in LETTERS:
        return float(pred[0] in golds)
    if pred in golds:
        return 1.0
    pred = squeeze(pred, ["\n", '"', "'", ".", ",", "?", "!", "{", "}"])
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        if prefix in pred:
            after = pred[pred.index(prefix) + len(prefix) + 1:]  # past the prefix and the space after it
            return float(bool(after) and any(after.startswith(g) for g in golds))
    word = next((w for w in pred.split() if w in LETTERS), None)
    return float(word is not None and word in golds)


def debug_score(prediction: str, golds: list[str], sample: dict | None = None) -> float:
    """Code.Debug (golds: the function's name and its letter): the reply starts "B." or "B:", or after its first
    answer prefix comes the letter or the name."""
    name, letter = golds[0], golds[1]
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = squeeze(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"])
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        if prefix in pred:
            after = pred[pred.index(prefix) + len(prefix) + 1:]
            return float(bool(after) and (after.startswith(letter) or after.startswith(name)))
    return 0.0


def number_value(text: str) -> int | float | None:
    """A gold's number: an int unless it is written with a point."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def math_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    """Math.Find: the reply's first number equals the gold, compared as the gold's kind (int or float)."""
    found = re.search(r"[0-9]+\.[0-9]+|[0-9]+", prediction)
    value = number_value(gold)
    if found is None or value is None:
        return 0.0
    if isinstance(value, int):
        return float("." not in found.group(0) and int(found.group(0)) == value)
    return float(float(found.group(0)) == value)
