"""Benchmarks by name (kvrt/eval/benchmarks.py) and Kamradt's needle sweep with its heatmap."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kvrt.cli import cli
from kvrt.errors import KvrtError
from kvrt.eval.benchmarks import BENCHMARKS, benchmark_tasks, parse_lengths
from kvrt.eval.metrics import score_sample
from kvrt.eval.synthetic import TASKS, make_sample
from kvrt.eval.tasks import get_task
from kvrt.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_folder(tiny_model_dir("llama"))


def test_lengths_take_k_as_1024_tokens():
    assert parse_lengths("512, 1k,2k,1.5k") == [512, 1024, 2048, 1536]
    for bad in ("12kb", "", "0", "-1k"):
        with pytest.raises(KvrtError, match="--lengths"):
            parse_lengths(bad)


def test_benchmarks_name_known_tasks_each_once():
    assert benchmark_tasks("niah,ruler,niah")[0] == "niah" and len(set(benchmark_tasks("ruler,lite"))) == len(
        benchmark_tasks("ruler,lite"))
    for benchmark in BENCHMARKS.values():
        assert benchmark.source and benchmark.data and benchmark.settings
        for task in benchmark.tasks:
            get_task(task)  # raises for an unknown one
    assert "niah" not in BENCHMARKS["ruler"].tasks


def test_the_needle_sweep_spreads_its_samples_over_depths_0_to_100(tokenizer):
    count, texts = 5, []
    for index in range(count):
        sample = make_sample(TASKS["niah"], tokenizer, 1500, index, seed=0, chat=True, count=count)
        assert len(sample.prompt_ids) == 1500 and sample.meta["depth"] == index / (count - 1)
        text = tokenizer.decode(sample.prompt_ids)
        texts.append(text)
        haystack_end = text.rindex(TASKS["niah"].QUESTION)  # the question follows the haystack
        where = text.index(TASKS["niah"].NEEDLE) / haystack_end
        assert abs(where - sample.meta["depth"]) < 0.1
    assert len(set(texts)) == count


def test_needle_recall_is_the_share_of_the_answers_words():
    gold = TASKS["niah"].ANSWER
    assert score_sample("needle_recall", "Eat a sandwich and sit in Dolores Park on a sunny day.", [gold]) == 1.0
    assert score_sample("needle_recall", "Sit in Dolores Park.", [gold]) == pytest.approx(4 / 10)
    assert score_sample("needle_recall", "I don't know.", [gold]) == 0.0


def test_a_niah_benchmark_run_draws_its_depth_by_length_heatmap(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["eval", "--model", str(folder), "--backend", "torch", "--benchmark", "niah",
                                      "--lengths", "300,0.5k", "--limit", "3", "--cache", "full",
                                      "--cache", "streaming:budget=128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    depths = {json.loads(line)["meta"]["depth"] for path in (out / "predictions").rglob("*.jsonl")
              for line in path.read_text().splitlines()}
    assert depths == {0.0, 0.5, 1.0}
    assert (out / "niah_grid_full.png").stat().st_size > 0 and (out / "niah_grid_streaming_budget_128.png").exists()
    assert "niah" in (out / "report.md").read_text()


def test_a_report_of_several_benchmarks_scores_each(tmp_path):
    from kvrt.eval.report import by_benchmark

    cells = [{"cache": "full", "task": "niah", "length": "512", "n": 2, "score": 50.0},
             {"cache": "full", "task": "vt", "length": "512", "n": 1, "score": 100.0},
             {"cache": "full", "task": "cwe", "length": "512", "n": 3, "score": 0.0}]
    lines = by_benchmark({"cells": cells}, ["full"], lambda v: f"{v:.1f}")
    assert "| niah | 50.0 |" in lines and "| ruler | 25.0 |" in lines  # (100 + 0 + 0 + 0) / 4 samples


@pytest.mark.parametrize("name", ["counting_stars_searching", "counting_stars_reasoning"])
def test_counting_stars_spreads_its_stars_evenly_and_asks_for_them_all(tokenizer, name):
    from kvrt.eval.tasks import GENERATED

    sample = make_sample(GENERATED[name], tokenizer, 1536, 0, seed=0, chat=True)
    text = tokenizer.decode(sample.prompt_ids)
    m = len(sample.answers)  # one star per 128 tokens, fewer where long sentences would crowd the prompt
    assert len(sample.prompt_ids) == 1536 and (m == 12 if name.endswith("searching") else 2 <= m < 12)
    end = text.rindex("On this moonlit and misty night")
    places = [text.index(f"counted {a} ★" if name.endswith("searching") else f"this time {a} ★") / end
              for a in sample.answers]
    assert all(abs(p - (i + 1) / m) < 0.08 for i, p in enumerate(places)), places
    if name.endswith("reasoning"):
        assert all(abs(int(w) - int(a)) == 1 for w, a in zip(sample.meta["wrong"], sample.answers))


def test_star_counts_follow_the_length_and_the_sentences_size():
    from kvrt.eval.counting_stars import star_count

    assert star_count(1024, 10) == 8 and star_count(2048, 40) == 12 and star_count(128_000, 10) == 32
    assert star_count(300, 150) == 2


def test_counting_stars_scores_as_the_benchmarks_scorer():
    answers, meta = ["15", "117", "42", "69"], {"wrong": ["16", "116", "43", "70"]}
    assert score_sample("stars_searching", '{"little_penguin": [15, 117, 42, 69]}', answers) == 1.0
    assert score_sample("stars_searching", '```json\n{"little_penguin": [15, 15, 42]}\n```', answers) == 0.5
    assert score_sample("stars_searching", "15 and then 69", answers) == 0.5  # no list: every number
    # a list longer than the stars is cut to them first
    assert score_sample("stars_searching", '{"little_penguin": [1, 2, 3, 4, 15]}', answers) == 0.0
    reply = '{"little_penguin": [15, 116, 117, 43]}'  # right only, right+wrong, wrong only, neither
    assert score_sample("stars_reasoning", reply, answers, meta) == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)


def write_counting_stars_files(folder, sizes=(60, 120)):
    """The published English files' format (gen_test_data.ipynb): a record per context size whose question is
    the essay text with its star sentences, four newlines, then the question; the right counts listed."""
    from kvrt.eval.counting_stars import FILES, QUESTION

    right, wrong = [15, 117, 42, 69], [16, 116, 43, 70]
    words = ("It was a quiet evening and the essays went on about startups and taste. " * 40).split(" ")
    folder.mkdir(exist_ok=True)
    for name, path in FILES.items():
        reasoning = name.endswith("reasoning")
        what = ("correct number", "correctly counted") if reasoning else ("number", "counted")
        question = "\n\n\n\n" + QUESTION.format(what=what[0], counted=what[1])
        lines = []
        for size in sizes:
            text = words[:size]
            for i in reversed(range(len(right))):  # the i-th star after (i + 1) / 4 of the words
                star = (f"\nThe little penguin counted {wrong[i]} ★, but found that a mistake had been made, so the "
                        f"counting was done again, and this time {right[i]} ★ was counted correctly.\n" if reasoning
                        else f"\nThe little penguin counted {right[i]} ★\n")
                cut = (i + 1) * size // 4
                text = text[:cut] + [star] + text[cut:]
            lines.append(json.dumps({"question": " ".join(text) + question, "context_size": size,
                                     "retrieval_question": question, "reference_counting_results": right,
                                     "parameters": {"temperature": 0.0}}))
        (folder / path).write_text("\n".join(lines) + "\n")
    return folder


def test_counting_stars_published_files_become_samples(tokenizer, tmp_path):
    from kvrt.eval.tasks import get_task

    data = write_counting_stars_files(tmp_path / "data")
    task = get_task("counting_stars_en_reasoning")
    assert task.chat and task.metric == "stars_reasoning" and task.max_new_tokens == 128
    samples = task.samples(tokenizer, None, 5, 0, 4096, data_dir=str(data))
    assert [s.answers for s in samples] == [["15", "117", "42", "69"]] * 2
    assert samples[0].meta["wrong"] == ["16", "116", "43", "70"] and samples[1].meta["context_words"] == 120
    text = tokenizer.decode(samples[0].prompt_ids)
    assert "this time 117 ★ was counted correctly" in text and "correctly counted number of ★" in text
    assert score_sample(task.metric, '{"little_penguin": [15, 117, 42, 70]}', samples[0].answers,
                        samples[0].meta) == pytest.approx((1 + 1 + 1 + 0.25) / 4)
    cut = task.samples(tokenizer, None, 1, 0, 300, data_dir=str(data))[0]  # cut in the middle: the question stays
    assert cut.meta["truncated"] and "Only output the results in JSON format" in tokenizer.decode(cut.prompt_ids)


def test_counting_stars_published_files_are_checked_and_skipped_without_data(tmp_path):
    from kvrt.eval.counting_stars import FILES, read_file_records
    from kvrt.eval.runner import Settings, cells

    said = []
    chosen = Settings(model="m", caches=["full"], tasks=["counting_stars_searching", "counting_stars_en_searching"],
                      lengths=[512], limit=1)
    assert [c.task.name for c in cells(chosen, 1024, said.append)] == ["counting_stars_searching"]
    assert said == [f"skipped counting_stars_en_searching (DIR/{FILES['counting_stars_en_searching']}): they read "
                    "the benchmark's files, and no --data DIR was given"]
    data = write_counting_stars_files(tmp_path / "data")
    with_data = Settings(model="m", caches=["full"], tasks=chosen.tasks, lengths=[512], limit=1, data_dir=str(data))
    assert [c.task.name for c in cells(with_data, 1024, said.append)] == ["counting_stars_searching",
                                                                           "counting_stars_en_searching"]
    elsewhere = Settings(model="m", caches=["full"], tasks=chosen.tasks, lengths=[512], limit=1,
                         data_dir=str(tmp_path))
    assert [c.task.name for c in cells(elsewhere, 1024, said.append)] == ["counting_stars_searching"]
    assert said[-1].endswith(f"they read the benchmark's files, and {tmp_path} does not hold them")
    with pytest.raises(KvrtError, match="counting_stars_en_reasoning reads --data DIR/Counting_Stars_EN_multi"):
        read_file_records(str(tmp_path), "counting_stars_en_reasoning")
    path = data / FILES["counting_stars_en_reasoning"]
    path.write_text(path.read_text().replace("but found that a mistake", "and then", 1))
    with pytest.raises(KvrtError, match=r":1: 4 counts but 3 star sentences with a wrong count"):
        read_file_records(str(data), "counting_stars_en_reasoning")
    path.write_text('{"question": "q", "context_size": 1}\n')
    with pytest.raises(KvrtError, match=r":1: not a Counting-Stars record \(missing reference_counting_results\)"):
        read_file_records(str(data), "counting_stars_en_reasoning")


def test_a_run_of_the_published_counting_stars_files_draws_their_stars(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    data = write_counting_stars_files(tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir("llama")), "--backend", "torch",
                                      "--tasks", "counting_stars_en_searching,counting_stars_en_reasoning",
                                      "--data", str(data), "--limit", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for path in (out / "predictions" / "full").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(records) == 4 and all(r["answers"] == ["15", "117", "42", "69"] for r in records)
    assert (out / "counting_stars_full.png").stat().st_size > 0


def test_counting_stars_report_draws_each_star_by_depth_and_length(tmp_path):
    pytest.importorskip("matplotlib")
    from kvrt.eval.counting_stars import star_records
    from kvrt.eval.report import plots

    record = {"cache": "full", "task": "counting_stars_reasoning", "length": 1024, "answers": ["15", "117", "42", "69"],
              "prediction": '{"little_penguin": [15, 116, 117, 43]}', "meta": {"wrong": ["16", "116", "43", "70"]}}
    stars = star_records(record)
    assert [s["meta"]["depth"] for s in stars] == [0.25, 0.5, 0.75, 1.0]
    assert [s["score"] for s in stars] == [1.0, 0.5, 0.25, 0.0] and {s["length"] for s in stars} == {1024}
    searching = {**record, "task": "counting_stars_searching", "length": 2048}
    assert [s["score"] for s in star_records(searching)] == [1.0, 1.0, 0.0, 0.0]
    written = plots({"settings": {"caches": ["full"]}, "overall": {"full": 40.0}}, [record, searching], tmp_path)
    assert "counting_stars_full.png" in written and (tmp_path / "counting_stars_full.png").stat().st_size > 0


def test_a_run_folder_from_before_server_existed_still_reports_and_resumes(tmp_path):
    """settings.json files written before --server have no "server": they ran locally."""
    from kvrt.eval.report import load_settings
    from kvrt.eval.runner import Settings, settings_problem

    settings = Settings(model="m", caches=["full"], tasks=["passkey"], lengths=[512], limit=1)
    old = {k: v for k, v in settings.as_dict().items() if k != "server"}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    assert load_settings(tmp_path)["server"] is None
    assert settings_problem(tmp_path / "settings.json", settings.as_dict()) is None
    elsewhere = Settings(**{**settings.__dict__, "server": "http://127.0.0.1:8080"}).as_dict()
    assert settings_problem(tmp_path / "settings.json", elsewhere) is not None


def replay(facts: list[str]) -> tuple[dict, dict, list]:
    """An independent reading of a bAbI-style story: where people are, where objects are, the gifts."""
    import re

    person_at, object_at, holder, trail, gifts = {}, {}, {}, {}, []
    for fact in facts:
        if m := re.fullmatch(r"(\w+) (?:went to|journeyed to|travelled to|moved to|went back to) the (\w+)\.", fact):
            person_at[m[1]] = m[2]
        elif m := re.fullmatch(r"(\w+) (?:picked up|grabbed|got|took) the (\w+) there\.", fact):
            holder[m[2]] = m[1]
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", fact):
            holder.pop(m[2])
        elif m := re.fullmatch(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.", fact):
            holder[m[2]] = m[3]
            gifts.append((m[1], m[2], m[3]))
        for thing, person in holder.items():
            if person in person_at:
                object_at[thing] = person_at[person]
                if trail.get(thing, [None])[-1] != object_at[thing]:
                    trail.setdefault(thing, []).append(object_at[thing])
    return person_at, object_at, trail, gifts


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa4", "qa5"])
def test_babilong_stories_answer_what_their_facts_say(task):
    import random
    import re

    from kvrt.eval.babilong import story

    for seed in range(200):
        facts, question, answer = story(task, random.Random(seed))
        person_at, object_at, trail, gifts = replay(facts)
        if task == "qa1":
            assert answer == person_at[re.fullmatch(r"Where is (\w+)\?", question)[1]]
        elif task == "qa2":
            assert answer == object_at[re.fullmatch(r"Where is the (\w+)\?", question)[1]]
        elif task == "qa3":
            thing, now = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
            assert trail[thing][-1] == now and trail[thing].count(now) == 1 and answer == trail[thing][-2]
        elif task == "qa4":
            said = {(m[1], m[2], m[3]) for m in (re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", f) for f in facts)}
            opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
            said |= {(c, opposite[d], a) for a, d, c in said}  # a relation read the other way round
            if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
                assert [a for a, d, c in said if (d, c) == (m[1], m[2])] == [answer]
            else:
                m = re.fullmatch(r"What is the (\w+) (\w+) of\?", question)
                assert [c for a, d, c in said if (a, d) == (m[1], m[2])] == [answer]
        else:
            giver, thing, taker = gifts[-1]  # questions ask about the last gift
            asks = {f"Who gave the {thing}?": giver, f"Who received the {thing}?": taker,
                    f"What did {giver} give to {taker}?": thing, f"Who did {giver} give the {thing} to?": taker}
            assert asks[question] == answer


def test_a_babilong_prompt_is_the_published_one_around_the_facts(tokenizer):
    from kvrt.eval.babilong_prompts import PROMPTS
    from kvrt.eval.tasks import GENERATED

    sample = make_sample(GENERATED["babilong_qa2"], tokenizer, 1800, 0, seed=0, chat=True)
    text = tokenizer.decode(sample.prompt_ids)
    assert len(sample.prompt_ids) == 1800
    for part in ("instruction", "examples", "post_prompt"):
        assert PROMPTS["qa2"][part] in text
    context = text[text.index("<context>\n") : text.index("</context>\n\nQuestion: Where is the ")]
    assert sample.meta["question"] in text and len(context) > 1000


def test_babilong_scores_its_way():
    meta = {"task": "qa1", "question": "Where is Mary?"}
    assert score_sample("babilong", "The most recent location of Mary is kitchen.", ["kitchen"], meta) == 1.0
    assert score_sample("babilong", "Kitchen or garden.", ["kitchen"], meta) == 0.0  # two places named
    assert score_sample("babilong", "Mary is in the garden. Earlier: kitchen.", ["kitchen"], meta) == 0.0
    asked = {"task": "qa3", "question": "Where was the apple before the kitchen?"}
    assert score_sample("babilong", "Before the kitchen the apple was in the office.", ["office"], asked) == 1.0


def test_the_standard_suite_holds_a_few_tasks_of_each_generated_benchmark():
    from kvrt.eval.tasks import SUITE_LENGTHS, SUITES, resolve

    names = [t.name for t in resolve(None, "standard")]
    owners = {b.name for b in BENCHMARKS.values() if set(b.tasks) & set(names) and b.name != "lite"}
    assert owners == {"ruler", "niah", "counting_stars", "babilong"} and SUITE_LENGTHS["standard"] == [1024, 2048]
    assert len(names) == len(set(names)) == len(SUITES["standard"])


BABI_QA1 = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 John travelled to the office.
2 Mary journeyed to the kitchen.
3 Where is John? \toffice\t1
"""


def test_babilong_reads_babi_stories_from_its_own_files(tokenizer, tmp_path):
    """With --data, the stories are bAbI's (en-10k train, as BABILong's create_tasks.py reads them): each
    question with its story's facts before it, earlier questions left out."""
    from kvrt.eval.babilong import read_babi
    from kvrt.eval.tasks import GENERATED

    folder = tmp_path / "tasks_1-20_v1-2" / "en-10k"
    folder.mkdir(parents=True)
    (folder / "qa1_single-supporting-fact_train.txt").write_text(BABI_QA1)
    stories = read_babi(folder / "qa1_single-supporting-fact_train.txt")
    assert stories == [(["Mary moved to the bathroom.", "John went to the hallway."], "Where is Mary?", "bathroom"),
                       (["Mary moved to the bathroom.", "John went to the hallway.", "Daniel went back to the hallway.",
                         "Sandra moved to the garden."], "Where is Daniel?", "hallway"),
                       (["John travelled to the office.", "Mary journeyed to the kitchen."], "Where is John?", "office")]
    seen = set()
    for index in range(6):
        sample = make_sample(GENERATED["babilong_qa1"], tokenizer, 1500, index, seed=0, chat=True, data_dir=tmp_path)
        facts, question, answer = next(s for s in stories if s[1] == sample.meta["question"])
        text = tokenizer.decode(sample.prompt_ids)
        assert sample.answers == [answer] and all(f in text for f in facts)
        assert [text.index(f) for f in facts] == sorted(text.index(f) for f in facts)  # in order
        seen.add(question)
    assert len(seen) > 1
    (folder / "qa1_single-supporting-fact_train.txt").write_text("Mary moved.\n")
    with pytest.raises(KvrtError, match=r"qa1_single-supporting-fact_train.txt:1: not a bAbI line"):
        read_babi(folder / "qa1_single-supporting-fact_train.txt")


def test_babilong_without_its_files_under_data_says_where_to_put_them(tokenizer, tmp_path):
    from kvrt.eval.tasks import GENERATED

    with pytest.raises(KvrtError, match="put tasks_1-20_v1-2/en-10k/qa2_two-supporting-facts_train.txt there"):
        make_sample(GENERATED["babilong_qa2"], tokenizer, 1500, 0, seed=0, chat=True, data_dir=tmp_path)


SQUAD = {"version": "v2.0", "data": [
    {"title": "Rivers", "paragraphs": [
        {"context": "The Loire is the longest river in France, flowing for 1,006 kilometres.",
         "qas": [{"question": "Which is the longest river in France?", "id": "a1", "is_impossible": False,
                  "answers": [{"text": "The Loire", "answer_start": 0}]},
                 {"question": "Which river is the shortest?", "id": "a2", "is_impossible": True, "answers": [],
                  "plausible_answers": []}]},
        {"context": "The Seine flows through Paris before it reaches the English Channel.",
         "qas": [{"question": "Which river flows through Paris?", "id": "a3", "is_impossible": False,
                  "answers": [{"text": "The Seine", "answer_start": 0}, {"text": "Seine", "answer_start": 4}]}]}]},
    {"title": "Mountains", "paragraphs": [
        {"context": f"Mountain fact number {i}: the ridge is covered in snow for much of the year.", "qas": []}
        for i in range(40)]},
]}
HOTPOTQA = [{"_id": "h1", "question": "Which city hosts the museum that holds the Mona Lisa?", "answer": "Paris",
             "type": "bridge", "level": "easy", "supporting_facts": [["Louvre", 0]],
             "context": [["Louvre", ["The Louvre is a museum in Paris. ", "It holds the Mona Lisa."]],
                         ["Prado", ["The Prado is a museum in Madrid."]]]},
            {"_id": "h2", "question": "Where is the Prado?", "answer": "Madrid", "type": "bridge", "level": "easy",
             "supporting_facts": [["Prado", 0]],
             "context": [["Prado", ["The Prado is a museum in Madrid."]], ["Filler", ["Nothing to see. "]]]}] + [
            {"_id": f"f{q}", "question": f"Filler question {q}?", "answer": "none", "type": "bridge", "level": "easy",
             "supporting_facts": [], "context": [[f"Filler {q}-{i}", [f"Filler paragraph {q}-{i} says little. "]]
                                                 for i in range(10)]} for q in range(4)]


@pytest.mark.parametrize("task,file,data", [("qa_1", "squad.json", SQUAD), ("qa_2", "hotpotqa.json", HOTPOTQA)])
def test_ruler_qa_asks_over_documents_from_the_published_files(tokenizer, tmp_path, task, file, data):
    from kvrt.eval.tasks import GENERATED

    (tmp_path / file).write_text(json.dumps(data))
    for index in range(4):
        sample = make_sample(GENERATED[task], tokenizer, 1500, index, seed=0, chat=False, data_dir=tmp_path)
        text = tokenizer.decode(sample.prompt_ids)
        assert len(sample.prompt_ids) <= 1500 and text.rstrip().endswith("Answer:")
        assert text.count("Answer the question based on the given documents.") == 2
        numbers = [int(n) for n in __import__("re").findall(r"Document (\d+):\n", text)]
        assert numbers == list(range(1, sample.meta["documents"] + 1)) and sample.meta["documents"] > 3
        assert all(a in ("The Loire", "The Seine", "Seine", "Paris", "Madrid", "none") for a in sample.answers)
        gold = {"The Loire": "longest river", "The Seine": "through Paris", "Paris": "in Paris", "Madrid": "in Madrid",
                "none": "Filler paragraph"}
        assert gold[sample.answers[0]] in text  # the document that answers it is there
    assert "Which river is the shortest?" not in text  # unanswerable SQuAD questions are left out


def test_ruler_without_its_qa_files_skips_qa_and_says_so(tiny_model_dir, tmp_path):
    from kvrt.eval.runner import Settings, cells

    said = []
    chosen = Settings(model="m", caches=["full"], tasks=["vt", "qa_1", "qa_2"], lengths=[512], limit=1)
    assert [c.task.name for c in cells(chosen, 1024, said.append)] == ["vt"]
    assert said == ["skipped qa_1 (DIR/squad.json), qa_2 (DIR/hotpotqa.json): they read the benchmark's files, "
                    "and no --data DIR was given"]
    only = Settings(model="m", caches=["full"], tasks=["qa_1"], lengths=[512], limit=1)
    with pytest.raises(KvrtError, match=r"qa_1 \(DIR/squad.json\) read the benchmark's files: pass --data DIR"):
        cells(only, 1024, said.append)
    (tmp_path / "squad.json").write_text('{"data": [{"title": "x"}]}')
    from kvrt.eval.tasks import GENERATED
    with pytest.raises(KvrtError, match="not squad's format"):
        make_sample(GENERATED["qa_1"], Tokenizer.from_folder(tiny_model_dir("llama")), 600, 0, seed=0, chat=False,
                    data_dir=tmp_path)


def longbench_v2_items(n: int = 3) -> list[dict]:
    return [{"_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Academic", "difficulty": "easy",
             "length": "short", "question": f"Which colour is item {i}?", "choice_A": "red", "choice_B": "green",
             "choice_C": "blue", "choice_D": "grey", "answer": "ABCD"[i % 4],
             "context": f"Item {i} is painted {['red', 'green', 'blue', 'grey'][i % 4]}. " * (20 + 400 * i)}
            for i in range(n)]


def test_longbench_v2_reads_its_data_json_and_fills_the_published_template(tokenizer, tmp_path):
    from kvrt.eval.tasks import get_task

    (tmp_path / "data.json").write_text(json.dumps(longbench_v2_items()))
    task = get_task("longbench_v2")
    samples = task.samples(tokenizer, None, 3, 0, 2048, data_dir=str(tmp_path))
    assert [s.id for s in samples] == ["v2-0", "v2-1", "v2-2"] and [s.answers for s in samples] == [["A"], ["B"], ["C"]]
    text = tokenizer.decode(samples[0].prompt_ids)
    assert "What is the correct answer to this question: Which colour is item 0?" in text
    assert "(C) blue\n(D) grey" in text and 'The correct answer is (insert answer here)' in text
    assert not samples[0].meta["truncated"] and samples[2].meta["truncated"]  # cut in the middle to the length
    assert len(samples[2].prompt_ids) <= 2048 - task.max_new_tokens
    assert "Format your response as follows" in tokenizer.decode(samples[2].prompt_ids)  # the end survives the cut


def test_longbench_v2_cot_answers_in_a_second_turn_from_its_reasoning(tokenizer, tmp_path):
    """pred.py --cot: the reasoning turn reads the text; the answer turn holds the question and the reasoning,
    not the text, and is what is scored. Batched samples get the same two turns."""
    from types import SimpleNamespace

    from kvrt.eval.runner import Cell, cell_records
    from kvrt.eval.tasks import get_task
    from kvrt.generation.stats import GenerationStats

    (tmp_path / "data.json").write_text(json.dumps(longbench_v2_items(2)))
    task = get_task("longbench_v2_cot")
    samples = task.samples(tokenizer, None, 2, 0, 4096, data_dir=str(tmp_path))
    asked = []

    def generate_ids(ids, *, max_tokens, cache, params):
        text = tokenizer.decode(ids)
        asked.append((text, max_tokens))
        reply = "The correct answer is (B)." if "$COT$" not in text and "omitted" in text else "Item 1 is green."
        return SimpleNamespace(text=reply, stats=GenerationStats(prompt_tokens=len(ids), generation_tokens=5))

    model = SimpleNamespace(tokenizer=tokenizer, context_length=4096, generate_ids=generate_ids,
                            generate_ids_batch=lambda prompts, max_batch, **kw: [generate_ids(p, **kw) for p in prompts])
    records = cell_records(model, Cell("full", task, None), samples)
    (first, budget1), (second, budget2) = asked[0], asked[2]
    assert budget1 == 1024 and "Item 0 is painted red." in first and "think step by step:<|im_end|>" in first
    assert budget2 == 128 and "The text is too long and omitted here." in second and "painted" not in second
    assert "Let’s think step by step: Item 1 is green.\n\nBased on the above" in second
    assert "Which colour is item 0?" in second
    assert [r["prediction"] for r in records] == ["The correct answer is (B)."] * 2
    assert [r["score"] for r in records] == [0.0, 1.0] and records[0]["reasoning"] == "Item 1 is green."
    assert records[0]["prompt_tokens"] == len(samples[0].prompt_ids) and records[0]["generation_tokens"] == 10


def test_longbench_v2_scores_the_letter_it_reads():
    assert score_sample("choice", "The correct answer is (B).", ["B"]) == 1.0
    assert score_sample("choice", "**The correct answer is B**", ["B"]) == 1.0
    assert score_sample("choice", "The correct answer is (C).", ["B"]) == 0.0
    assert score_sample("choice", "B", ["B"]) == 0.0  # no sentence to read it from


def test_longbench_v2_without_its_file_is_one_line(tmp_path, offline_hub):
    from kvrt.eval.tasks import get_task

    task = get_task("longbench_v2")
    with pytest.raises(KvrtError, match="longbench_v2 reads --data DIR/data.json, which is missing"):
        task.samples(None, None, 1, 0, 512, data_dir=str(tmp_path))
    with pytest.raises(KvrtError, match="THUDM/LongBench-v2.* could not be fetched .*put it at DIR/data.json"):
        task.samples(None, None, 1, 0, 512, data_dir=None)
    (tmp_path / "data.json").write_text(json.dumps([{"_id": "x", "question": "q"}]))
    with pytest.raises(KvrtError, match="item 1 is not a LongBench v2 question"):
        task.samples(None, None, 1, 0, 512, data_dir=str(tmp_path))


def test_a_longbench_v2_run_writes_scored_records(tiny_model_dir, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.json").write_text(json.dumps(longbench_v2_items(2)))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["eval", "--model", str(folder), "--backend", "torch", "--benchmark",
                                      "longbench_v2", "--data", str(data), "--limit", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = (out / "predictions" / "full" / "longbench_v2.jsonl").read_text()
    records = [json.loads(line) for line in written.splitlines()]
    assert sorted(r["id"] for r in records) == ["v2-0", "v2-1"] and all(r["score"] in (0.0, 1.0) for r in records)
    assert records[0]["meta"]["difficulty"] == "easy"
    cot = [json.loads(line) for line in (out / "predictions" / "full" / "longbench_v2_cot.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in cot) == ["v2-0", "v2-1"] and all(r["reasoning"] for r in cot)
    assert all(r["score"] in (0.0, 1.0) and "answer_template" not in r["meta"] for r in cot)
