"""LongBench-format tasks from local JSONL files (THUDM/LongBench's schema: `input, context,
answers, all_classes, length, dataset, _id`), one file per dataset: `DIR/<dataset>.jsonl`, or
the hub's data.zip.

Each dataset keeps LongBench's published prompt (kvrt.eval.longbench_prompts), metric, generation
budget, chat-template rule and first-line rule: the benchmark's standard setting (pred.py, eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import jsonl_objects
from kvrt.eval.hub import HubFile
from kvrt.eval.longbench_prompts import PROMPTS

FIELDS = ("input", "context", "answers")


@dataclass(frozen=True)
class Dataset:
    name: str
    metric: str
    max_new_tokens: int
    chat: bool = True  # LongBench leaves the template off for few-shot and code completion
    first_line: bool = False  # trec, triviaqa, samsum, lsht: only the first line is scored


DATASETS = {d.name: d for d in [
    Dataset("narrativeqa", "qa_f1", 128),
    Dataset("qasper", "qa_f1", 128),
    Dataset("multifieldqa_en", "qa_f1", 64),
    Dataset("hotpotqa", "qa_f1", 32),
    Dataset("2wikimqa", "qa_f1", 32),
    Dataset("musique", "qa_f1", 32),
    Dataset("gov_report", "rouge", 512),
    Dataset("qmsum", "rouge", 512),
    Dataset("multi_news", "rouge", 512),
    Dataset("trec", "classification", 64, chat=False, first_line=True),
    Dataset("triviaqa", "qa_f1", 32, chat=False, first_line=True),
    Dataset("samsum", "rouge", 128, chat=False, first_line=True),
    Dataset("passage_count", "count", 32),
    Dataset("passage_retrieval_en", "retrieval", 32),
    Dataset("lcc", "code_sim", 64, chat=False),
    Dataset("repobench-p", "code_sim", 64, chat=False),
]}
CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")  # need jieba-based metrics


def hub_file(name: str) -> HubFile:
    """Where the hub keeps a dataset's file: inside the data.zip of HF THUDM/LongBench."""
    return HubFile("THUDM/LongBench", "data.zip", f"data/{name}.jsonl")


def dataset(name: str) -> Dataset:
    if name in CHINESE:
        raise KvrtError(f"LongBench '{name}' is scored with Chinese word segmentation, which kvrt does not ship yet")
    if name not in DATASETS:
        raise KvrtError(f"unknown LongBench dataset '{name}'; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a LongBench JSONL file; a bad line is one error naming file and line."""
    records = []
    for number, record in jsonl_objects(path, "LongBench file"):
        missing = [k for k in FIELDS if k not in record]
        if missing or not isinstance(record.get("answers"), list):
            what = f"missing {', '.join(missing)}" if missing else "answers must be a list"
            raise KvrtError(f"{path}:{number}: not a LongBench record ({what})")
        records.append(record)
    return records


def prompt_text(ds: Dataset, record: dict) -> str:
    return PROMPTS[ds.name].format(context=record["context"], input=record["input"])


def first_line(ds: Dataset, prediction: str) -> str:
    """What is scored: the first line for the few-shot datasets, else the whole prediction."""
    return prediction.lstrip("\n").split("\n")[0] if ds.first_line else prediction
