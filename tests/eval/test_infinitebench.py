"""InfiniteBench (kvrt/eval/infinitebench.py): records in the published JSONL format, the repository's
open-model templates filled as create_prompt fills them, the golds get_answer makes, compute_scores.py's
scorers, one-line errors for a missing file or a bad record, and a tiny-model run writing scored records."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kvrt.cli import cli
from kvrt.errors import KvrtError
from kvrt.eval import infinitebench
from kvrt.eval.infinitebench import golds, math_find_prefix, prompt_text, read_items
from kvrt.eval.metrics import score_sample
from kvrt.eval.tasks import SUITES, get_task, resolve
from kvrt.models.tokenizer import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
MATH_INPUT = "You should answer with only one number, no other words. The largest number of the list is: "
BOOK = "Walking Georgie was the name of the path by the river. Mrs. Bronwyn knitted stockings by the fire. "


def records(noise: int = 3) -> dict[str, list[dict]]:
    """Two records per task in the published format (as construct_synthetic_dataset.py and the HF files hold
    them), with tiny contexts; `noise` lines around the passkey set its length."""
    key = "The pass key is {k}. Remember it. {k} is the pass key.\n"
    digits = "The sequence of digits is {k}. Remember it. {k} is the sequence of digits.\n"
    kv = {"84fe443f-dcff": "c14cb8ba-002b", "b81c0ca6-2893": "5ca8e9de-1001", "9f1e2d3c-4b5a": "0a1b2c3d-4e5f"}
    code = "def repack_carchive(path):\n    return open(path).read(\n\ndef _parser(args):\n    return args.split()\n"
    return {
        "passkey": [{"id": i, "context": NOISE * noise + key.format(k=k) + NOISE * noise,
                     "input": "What is the pass key?", "answer": [k], "options": []}
                    for i, k in enumerate(["71432", "69079"])],
        "number_string": [{"id": i, "context": NOISE + digits.format(k=k) + NOISE,
                           "input": "What is the sequence of digits?", "answer": [k], "options": []}
                          for i, k in enumerate(["3000077442", "4443311551"])],
        "kv_retrieval": [{"id": i, "context": "JSON data:\n" + json.dumps(kv),
                          "input": f"\nKey: \"{key}\"\nThe value associated with the specified key is: ",
                          "answer": kv[key], "options": []} for i, key in enumerate(list(kv)[:2])],
        "longbook_qa_eng": [{"id": 0, "context": BOOK * 3, "input": "What does Mrs. Bronwyn knit?",
                             "answer": ["stockings"], "options": []},
                            {"id": 1, "context": BOOK, "input": "What was the path called?",
                             "answer": ["Walking Georgie", "the river path"], "options": []}],
        "longbook_choice_eng": [{"id": 0, "context": BOOK, "input": "What was the path called?",
                                 "answer": ["Walking Georgie"], "options": ["Walking Georgie", "Hall Farm", "Snowfield",
                                                                           "The Mill"]},
                                {"id": 1, "context": BOOK, "input": "Where did she knit?", "answer": "Snowfield",
                                 "options": ["Hall Farm", "The Mill", "Snowfield", "By the fire"]}],
        "longbook_sum_eng": [{"id": i, "context": BOOK * 2, "input": "", "answer": ["Mrs. Bronwyn knits.\n\nThe path "
                              "is called Walking Georgie."], "options": []} for i in range(2)],
        "code_debug": [{"id": 0, "context": code, "input": "", "answer": "repack_carchive",
                        "options": ["_parser", "repack_carchive", "main", "Configer._set_option"]},
                       {"id": 1, "context": code, "input": "", "answer": ["Configer._set_option"],
                        "options": ["_parser", "main", "Configer._set_option", "repack_carchive"]}],
        "math_find": [{"id": 0, "context": "[3, 14, 88, 2, 15]", "input": MATH_INPUT, "answer": [88]},
                      {"id": 1, "context": "[3, 14, 88, 2]", "input": MATH_INPUT.replace("largest", "median"),
                       "answer": [8.5]}],
    }


def write_data(folder, tasks=None, noise: int = 3):
    folder.mkdir(exist_ok=True)
    for name, items in records(noise).items():
        if tasks is None or name in tasks:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_folder(tiny_model_dir("llama"))


def test_the_suite_names_the_eight_english_tasks_in_plain_text_with_the_published_budgets():
    assert SUITES["infinitebench"] == ["infinitebench_passkey", "infinitebench_number_string",
                                       "infinitebench_kv_retrieval", "infinitebench_longbook_qa_eng",
                                       "infinitebench_longbook_choice_eng", "infinitebench_longbook_sum_eng",
                                       "infinitebench_code_debug", "infinitebench_math_find"]
    tasks = {t.name: t for t in resolve(None, "infinitebench")}
    budgets = {name: t.max_new_tokens for name, t in tasks.items()}  # DATA_NAME_TO_MAX_NEW_TOKENS
    assert budgets == {"infinitebench_passkey": 6, "infinitebench_number_string": 12, "infinitebench_kv_retrieval": 50,
                       "infinitebench_longbook_qa_eng": 40, "infinitebench_longbook_choice_eng": 40,
                       "infinitebench_longbook_sum_eng": 1200, "infinitebench_code_debug": 5,
                       "infinitebench_math_find": 3}
    assert not any(t.chat or t.synthetic for t in tasks.values())
    assert tasks["infinitebench_longbook_qa_eng"].metric == "qa_f1"
    assert tasks["infinitebench_longbook_sum_eng"].metric == "rouge_lsum"
    with pytest.raises(KvrtError, match="infinitebench_math_find"):  # the unknown-task line lists them
        get_task("infinitebench_math_calc")


def test_prompts_fill_the_published_templates():
    data = records()
    passkey = data["passkey"][0]
    assert prompt_text("passkey", passkey) == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
        f"about the important information.\n\n{passkey['context']}\n\nWhat is the pass key?\n\nThe pass key is")
    mc = data["longbook_choice_eng"][0]
    assert prompt_text("longbook_choice_eng", mc) == (
        f"Read the book and answer the question.\n\n{BOOK}\n\nQuestion: What was the path called?\nA. Walking Georgie"
        "\nB. Hall Farm\nC. Snowfield\nD. The Mill\n\nThe letter of the correct answer is")
    debug = prompt_text("code_debug", data["code_debug"][0])
    assert debug.startswith("Following is a Python code where exactly one of the functions/methods has a deliberate "
                            "error that makes it crash.\n\ndef repack_carchive(path):")
    assert debug.endswith("Options:\nA. _parser\nB. repack_carchive\nC. main\nD. Configer._set_option\n\n"
                          "The correct option is:")
    qa = prompt_text("longbook_qa_eng", data["longbook_qa_eng"][0])
    assert qa.startswith("Read the book and answer the question. Be very concise in your answer.\n\n")
    assert qa.endswith("\n\nQuestion: What does Mrs. Bronwyn knit?\nAnswer:")
    kv = data["kv_retrieval"][0]
    assert prompt_text("kv_retrieval", kv) == (
        f"Extract the value corresponding to the specified key in the JSON object below.\n\n{kv['context']}\n\n"
        f"{kv['input']}")
    assert prompt_text("longbook_sum_eng", data["longbook_sum_eng"][0]).endswith(f"{BOOK * 2}\n\nSummary:")
    assert prompt_text("number_string", data["number_string"][0]).endswith("\n\nThe sequence of digits is")


def test_math_find_asks_for_the_target_named_in_its_input():
    # create_prompt's prefix: "The ... of" lowercased, " of" cut off; the match is greedy, to the last " of"
    assert math_find_prefix(MATH_INPUT) == "What is the largest number in the following list?"
    assert math_find_prefix("... no other words. The second smallest number of the list is: ") == (
        "What is the second smallest number in the following list?")
    assert math_find_prefix("The median of one of the lists") == "What is the median of one in the following list?"
    item = records()["math_find"][0]
    assert prompt_text("math_find", item) == ("What is the largest number in the following list?\n\n"
                                              f"[3, 14, 88, 2, 15]\n\n{MATH_INPUT}")
    with pytest.raises(KvrtError, match="names no 'The ... of' number"):
        math_find_prefix("Find the largest number.")


def test_golds_are_get_answers():
    data = records()
    assert golds("longbook_choice_eng", data["longbook_choice_eng"][0]) == ["Walking Georgie", "A"]
    assert golds("longbook_choice_eng", data["longbook_choice_eng"][1]) == ["Snowfield", "C"]  # a plain string
    assert golds("code_debug", data["code_debug"][0]) == ["repack_carchive", "B"]
    assert golds("code_debug", data["code_debug"][1]) == ["Configer._set_option", "C"]
    already = {**data["code_debug"][0], "answer": ["repack_carchive", "D"]}  # [text, letter] is taken as it is
    assert golds("code_debug", already) == ["repack_carchive", "D"]
    assert golds("math_find", data["math_find"][0]) == ["88"] and golds("math_find", data["math_find"][1]) == ["8.5"]
    assert golds("kv_retrieval", data["kv_retrieval"][0]) == ["c14cb8ba-002b"]
    assert golds("longbook_qa_eng", data["longbook_qa_eng"][1]) == ["Walking Georgie", "the river path"]


def test_retrieval_scores_read_the_first_number_or_a_whole_word():
    assert score_sample("infbench_first_int", " 71432.", ["71432"]) == 1.0
    assert score_sample("infbench_first_int", "The pass key is 71432. Remember it.", ["71432"]) == 1.0
    assert score_sample("infbench_first_int", "7143", ["71432"]) == 0.0  # cut short by the budget
    assert score_sample("infbench_first_int", "In 2 words: 71432", ["71432"]) == 0.0  # only the first number counts
    assert score_sample("infbench_first_int", "no digits", ["71432"]) == 0.0
    assert score_sample("infbench_first_int", "30000\n3000077442", ["3000077442"]) == 0.0
    assert score_sample("infbench_kv", 'The value is: "c14cb8ba-002b".', ["c14cb8ba-002b"]) == 1.0
    assert score_sample("infbench_kv", "{c14cb8ba-002b}", ["c14cb8ba-002b"]) == 1.0
    assert score_sample("infbench_kv", "c14cb8ba-002b7", ["c14cb8ba-002b"]) == 0.0  # a word, not a substring
    assert score_sample("infbench_kv", "c14cb8ba", ["c14cb8ba-002b"]) == 0.0


def test_qa_is_token_f1_over_the_golds():
    assert score_sample("qa_f1", "Stockings.", ["stockings"]) == 1.0
    assert score_sample("qa_f1", "red stockings", ["stockings"]) == pytest.approx(2 / 3)
    assert score_sample("qa_f1", "the river path", ["Walking Georgie", "the river path"]) == 1.0
    assert score_sample("qa_f1", "a hat", ["stockings"]) == 0.0


def test_the_choice_scorer_reads_the_letter_as_compute_scores_does():
    gold = ["Walking Georgie", "A"]
    assert score_sample("infbench_choice", " A", gold) == 1.0
    assert score_sample("infbench_choice", "A. Walking Georgie", gold) == 1.0
    assert score_sample("infbench_choice", "B. Hall Farm", gold) == 0.0
    assert score_sample("infbench_choice", "Walking Georgie", gold) == 1.0  # the option's text itself
    assert score_sample("infbench_choice", "The answer is: Walking Georgie.", gold) == 1.0
    assert score_sample("infbench_choice", "I think the answer is A, surely", gold) == 1.0
    assert score_sample("infbench_choice", "I think the answer is C", gold) == 0.0
    assert score_sample("infbench_choice", "It must be option A", gold) == 1.0  # the first lone letter
    assert score_sample("infbench_choice", "maybe AB or A", gold) == 0.0  # "AB" is in "ABCD": it decides, as published
    assert score_sample("infbench_choice", "", gold) == 0.0 and score_sample("infbench_choice", "None", gold) == 0.0


def test_the_code_debug_scorer_wants_a_marked_letter_or_an_answer_prefix():
    gold = ["repack_carchive", "B"]
    assert score_sample("infbench_debug", " B. repack_carchive", gold) == 1.0
    assert score_sample("infbench_debug", "B: it crashes", gold) == 1.0
    assert score_sample("infbench_debug", "The answer is: repack_carchive", gold) == 1.0
    assert score_sample("infbench_debug", "The correct option is: B", gold) == 1.0
    assert score_sample("infbench_debug", "The answer is: A", gold) == 0.0
    assert score_sample("infbench_debug", "A. _parser", gold) == 0.0
    assert score_sample("infbench_debug", "B", gold) == 0.0  # a bare letter is not read, as published


def test_math_find_compares_the_first_number_as_the_golds_kind():
    assert score_sample("infbench_math", "88", ["88"]) == 1.0
    assert score_sample("infbench_math", "It is 88, then 3", ["88"]) == 1.0
    assert score_sample("infbench_math", "8 8", ["88"]) == 0.0
    assert score_sample("infbench_math", "88.5", ["88"]) == 0.0  # a decimal for an int gold (the scorer raises)
    assert score_sample("infbench_math", "8.5", ["8.5"]) == 1.0
    assert score_sample("infbench_math", "8.50", ["8.5"]) == 1.0  # compared as floats
    assert score_sample("infbench_math", "8", ["8.5"]) == 0.0
    assert score_sample("infbench_math", "none", ["88"]) == 0.0


def test_rouge_lsum_is_summary_level_over_lines_with_rouges_tokens():
    gold = "the cat sat\non the mat"
    assert score_sample("rouge_lsum", gold, [gold]) == 1.0
    assert score_sample("rouge_lsum", "The CAT, sat!\nOn the mat.", [gold]) == 1.0  # lowercased, [a-z0-9] runs
    assert score_sample("rouge_lsum", "on the mat\nthe cat sat", [gold]) == 1.0  # each line against every line
    assert score_sample("rouge", "on the mat\nthe cat sat", [gold]) == 0.5  # the sentence-level rouge_l is not
    assert score_sample("rouge_lsum", "the dog ran", [gold]) == pytest.approx(2 * (1 / 3) * (1 / 6) / (1 / 3 + 1 / 6))
    assert score_sample("rouge_lsum", "", [gold]) == 0.0 and score_sample("rouge_lsum", "...", [gold]) == 0.0


def test_rouge_lsum_matches_rouge_score():
    import random

    from rouge_score import rouge_scorer  # a test dependency: the published scorer itself

    scorer, rng = rouge_scorer.RougeScorer(["rougeLsum"]), random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "The", "Mat,", "x1"]
    for _ in range(200):
        texts = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9)))
                           for _ in range(rng.randint(1, 4))) for _ in range(2)]
        expected = scorer.score(texts[0], texts[1])["rougeLsum"].fmeasure
        assert score_sample("rouge_lsum", texts[1], [texts[0]]) == pytest.approx(expected), texts


def test_samples_are_the_records_in_plain_text_cut_in_the_middle(tokenizer, tmp_path):
    data = write_data(tmp_path / "data", noise=60)
    task = get_task("infinitebench_passkey")
    samples = task.samples(tokenizer, None, 5, 0, 2048, data_dir=str(data))
    assert [s.id for s in samples] == ["0", "1"] and [s.answers for s in samples] == [["71432"], ["69079"]]
    text = tokenizer.decode(samples[0].prompt_ids)
    assert samples[0].meta["truncated"] and len(samples[0].prompt_ids) <= 2048 - task.max_new_tokens
    assert text.lstrip().startswith("There is an important info hidden") and "<|im_start|>" not in text  # no chat
    assert text.endswith("What is the pass key?\n\nThe pass key is")  # the end survives the cut
    mc = get_task("infinitebench_longbook_choice_eng").samples(tokenizer, None, 1, 0, 2048, data_dir=str(data))
    assert mc[0].answers == ["Walking Georgie", "A"] and mc[0].meta["options"][2] == "Snowfield"
    assert not mc[0].meta["truncated"]


def test_a_missing_file_or_a_bad_record_is_one_line(tmp_path, offline_hub):
    task = get_task("infinitebench_passkey")
    with pytest.raises(KvrtError) as info:
        task.samples(None, None, 1, 0, 512, data_dir=str(tmp_path))
    assert "\n" not in str(info.value)
    assert "infinitebench_passkey (Retrieve.PassKey) reads --data DIR/passkey.jsonl" in str(info.value)
    assert "huggingface.co/datasets/xinrongzhang2022/InfiniteBench/resolve/main/passkey.jsonl" in str(info.value)
    # without --data: the hub, here offline with nothing cached
    with pytest.raises(KvrtError, match="could not be fetched .*put it at DIR/kv_retrieval.jsonl and pass --data DIR"):
        get_task("infinitebench_kv_retrieval").samples(None, None, 1, 0, 512, data_dir=None)
    good = json.dumps(records()["passkey"][0])
    (tmp_path / "passkey.jsonl").write_text(good + "\n\n" + json.dumps({"id": 2, "input": "q", "answer": ["1"]}) + "\n")
    with pytest.raises(KvrtError, match=r"passkey.jsonl:3: not an InfiniteBench passkey record \(missing context\)$"):
        read_items(tmp_path / "passkey.jsonl", "passkey")
    assert len(read_items(tmp_path / "passkey.jsonl", "passkey", limit=1)) == 1  # a run reads only the records it needs
    (tmp_path / "passkey.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(KvrtError, match=r"passkey.jsonl:2: not valid JSON"):
        read_items(tmp_path / "passkey.jsonl", "passkey")
    wrong = {**records()["code_debug"][0], "answer": "not_an_option"}
    (tmp_path / "code_debug.jsonl").write_text(json.dumps(wrong) + "\n")
    with pytest.raises(KvrtError, match=r"code_debug.jsonl:1: .*its answer is not one of four options"):
        read_items(tmp_path / "code_debug.jsonl", "code_debug")
    (tmp_path / "math_find.jsonl").write_text(json.dumps({**records()["math_find"][0], "input": "Largest?"}) + "\n")
    with pytest.raises(KvrtError, match=r"math_find.jsonl:1: .*names no 'The ... of' number"):
        read_items(tmp_path / "math_find.jsonl", "math_find")
    (tmp_path / "math_find.jsonl").write_text(json.dumps({**records()["math_find"][0], "answer": ["many"]}) + "\n")
    with pytest.raises(KvrtError, match=r"math_find.jsonl:1: .*its answer is not a number"):
        read_items(tmp_path / "math_find.jsonl", "math_find")


def test_an_infinitebench_run_writes_scored_records(tiny_model_dir, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    data = write_data(tmp_path / "data", ["passkey", "longbook_choice_eng", "math_find"])
    out = tmp_path / "run"
    tasks = "infinitebench_passkey,infinitebench_longbook_choice_eng,infinitebench_math_find"
    result = CliRunner().invoke(cli, ["eval", "--model", str(folder), "--backend", "torch", "--tasks", tasks,
                                      "--data", str(data), "--limit", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name, answers in [("passkey", [["71432"], ["69079"]]), ("longbook_choice_eng", [["Walking Georgie", "A"],
                                                                                        ["Snowfield", "C"]])]:
        written = (out / "predictions" / "full" / f"infinitebench_{name}.jsonl").read_text()
        got = sorted((json.loads(line) for line in written.splitlines()), key=lambda r: r["id"])
        assert [r["id"] for r in got] == ["0", "1"] and [r["answers"] for r in got] == answers
        metric = infinitebench.TASKS[f"infinitebench_{name}"].metric
        assert all(r["score"] == score_sample(metric, r["prediction"], r["answers"]) for r in got)
        assert all(r["generation_tokens"] <= infinitebench.TASKS[f"infinitebench_{name}"].max_new_tokens for r in got)
    assert (out / "predictions" / "full" / "infinitebench_math_find.jsonl").exists()
