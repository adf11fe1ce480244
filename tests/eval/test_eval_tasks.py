"""The task registry, LongBench JSONL loading and the standard setting's middle truncation."""

import json

import pytest

from kvrt.errors import KvrtError
from kvrt.api import truncate_middle
from kvrt.eval.tasks import SUITES, get_task, resolve
from kvrt.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_folder(tiny_model_dir("llama"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_middle_truncation_keeps_both_ends():
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert truncate_middle([1, 2], 5) == [1, 2]


def test_longbench_records_become_framed_truncated_samples(tokenizer, tmp_path):
    long_context = "word " * 2000
    write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {"input": "Who?", "context": long_context, "answers": ["Ada"], "length": 2000, "_id": "a1"},
        {"input": "Where?", "context": "short", "answers": ["Rome", "Roma"], "length": 1, "_id": "a2"},
    ])
    task = get_task("hotpotqa")
    samples = task.samples(tokenizer, None, limit=5, seed=0, max_length=512, data_dir=str(tmp_path))
    assert [s.id for s in samples] == ["a1", "a2"] and samples[1].answers == ["Rome", "Roma"]
    assert len(samples[0].prompt_ids) == 512 - task.max_new_tokens and samples[0].meta["truncated"]
    text = tokenizer.decode(samples[0].prompt_ids)
    assert "user\nAnswer the question based on the given passages." in text  # both ends survive the cut
    assert "Question: Who?\nAnswer:<|im_end|>" in text
    assert not samples[1].meta["truncated"]


def test_longbench_prompts_are_the_published_ones():
    from kvrt.eval.longbench import DATASETS, prompt_text

    record = {"context": "CTX", "input": "INP"}
    assert prompt_text(DATASETS["lcc"], record) == "Please complete the code given below. \nCTXNext line of code:\n"
    assert prompt_text(DATASETS["trec"], record) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\nCTX\nINP")
    assert "Answer the question asconcisely as you can" in prompt_text(DATASETS["narrativeqa"], record)  # kept as published
    assert prompt_text(DATASETS["passage_count"], record).endswith("The final answer is: ")


def test_first_line_rule_only_for_the_few_shot_datasets():
    assert get_task("trec").scored_text("\nLocation\nmore text") == "Location"
    assert get_task("hotpotqa").scored_text("a\nb") == "a\nb"


@pytest.mark.parametrize("line,needle", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"input": "x", "context": "y"}', "bad.jsonl:2: not a LongBench record (missing answers)"),
    ('{"input": "x", "context": "y", "answers": "z"}', "answers must be a list"),
])
def test_malformed_jsonl_names_file_and_line(tokenizer, tmp_path, line, needle):
    good = json.dumps({"input": "q", "context": "c", "answers": ["a"]})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    from kvrt.eval.longbench import read_jsonl

    with pytest.raises(KvrtError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_jsonl(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("call,needle", [
    (lambda: get_task("mmlu"), "unknown task 'mmlu'"),
    (lambda: resolve(None, "huge"), "unknown suite 'huge'"),
    (lambda: get_task("dureader"), "Chinese word segmentation"),
])
def test_unknown_names_are_clear_errors(call, needle):
    with pytest.raises(KvrtError, match=needle):
        call()


def test_the_lite_suite_covers_retrieval_tracing_and_aggregation():
    names = [t.name for t in resolve(None, "lite")]
    assert len(names) >= 6 and "vt" in names and {"fwe", "cwe"} & set(names)
    assert all(not t.chat for t in resolve(None, "lite"))
    assert set(SUITES["ruler"]) <= {t.name for t in resolve(",".join(SUITES["ruler"]), None)}
