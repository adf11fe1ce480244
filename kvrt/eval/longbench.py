"""LongBench-format tasks from local JSONL files (THUDM/LongBench's schema: `input, context,
answers, all_classes, length, dataset, _id`), one file per dataset: `DIR/<dataset>.jsonl`.

Each dataset keeps LongBench's metric, generation budget and first-line rule (facts of the
benchmark); the prompt wording is kvrt's own per task family, so scores are comparable
across kvrt's cache specs, not digit-for-digit with published LongBench tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import json_line, read_file

FIELDS = ("input", "context", "answers")

# family -> prompt wording ({context}, {input})
PROMPTS = {
    "single_qa": "Read the text below and answer the question as briefly as you can.\n\n{context}\n\n"
                 "Question: {input}\nAnswer:",
    "multi_qa": "The passages below may each hold part of the answer. Answer the question briefly, "
                "with no explanation.\n\n{context}\n\nQuestion: {input}\nAnswer:",
    "summary": "{context}\n\n{input}\nSummary:",
    "few_shot": "{context}\n{input}",
    "count": "{context}\n\nHow many different paragraphs are there above, once repeats are removed? "
             "Answer with one number.\nAnswer:",
    "retrieval": "{context}\n\nWhich paragraph above does this summary come from?\n{input}\n"
                 "Answer in the form \"Paragraph N\".\nAnswer:",
    "code": "Complete the next line of code.\n{context}{input}",
}


@dataclass(frozen=True)
class Dataset:
    name: str
    family: str
    metric: str
    max_new_tokens: int
    chat: bool = True  # LongBench leaves the template off for few-shot and code completion
    first_line: bool = False  # trec, triviaqa, samsum, lsht: only the first line is scored


DATASETS = {d.name: d for d in [
    Dataset("narrativeqa", "single_qa", "qa_f1", 128),
    Dataset("qasper", "single_qa", "qa_f1", 128),
    Dataset("multifieldqa_en", "single_qa", "qa_f1", 64),
    Dataset("hotpotqa", "multi_qa", "qa_f1", 32),
    Dataset("2wikimqa", "multi_qa", "qa_f1", 32),
    Dataset("musique", "multi_qa", "qa_f1", 32),
    Dataset("gov_report", "summary", "rouge", 512),
    Dataset("qmsum", "summary", "rouge", 512),
    Dataset("multi_news", "summary", "rouge", 512),
    Dataset("trec", "few_shot", "classification", 64, chat=False, first_line=True),
    Dataset("triviaqa", "few_shot", "qa_f1", 32, chat=False, first_line=True),
    Dataset("samsum", "few_shot", "rouge", 128, chat=False, first_line=True),
    Dataset("passage_count", "count", "count", 32),
    Dataset("passage_retrieval_en", "retrieval", "retrieval", 32),
    Dataset("lcc", "code", "code_sim", 64, chat=False),
    Dataset("repobench-p", "code", "code_sim", 64, chat=False),
]}
CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")  # need jieba-based metrics


def dataset(name: str) -> Dataset:
    if name in CHINESE:
        raise KvrtError(f"LongBench '{name}' is scored with Chinese word segmentation, which kvrt does not ship yet")
    if name not in DATASETS:
        raise KvrtError(f"unknown LongBench dataset '{name}'; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a LongBench JSONL file; a bad line is one error naming file and line."""
    records = []
    for number, line in enumerate(read_file(path, "LongBench file").split(b"\n"), start=1):
        if not line.strip():
            continue
        record = json_line(line, path, number)
        missing = [k for k in FIELDS if k not in record]
        if missing or not isinstance(record.get("answers"), list):
            what = f"missing {', '.join(missing)}" if missing else "answers must be a list"
            raise KvrtError(f"{path}:{number}: not a LongBench record ({what})")
        records.append(record)
    return records


def prompt_text(ds: Dataset, record: dict) -> str:
    return PROMPTS[ds.family].format(context=record["context"], input=record["input"])


def first_line(ds: Dataset, prediction: str) -> str:
    """What is scored: the first line for the few-shot datasets, else the whole prediction."""
    return prediction.lstrip("\n").split("\n")[0] if ds.first_line else prediction
