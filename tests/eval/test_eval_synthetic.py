"""Synthetic tasks: exact prompt lengths, answers recoverable from the text, determinism by seed."""

import re
from collections import Counter

import pytest

from kvrt.errors import KvrtError
from kvrt.eval.synthetic import TASKS, make_sample
from kvrt.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_folder(tiny_model_dir("llama"))


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [900, 2000])
def test_every_task_hits_the_length_and_its_answers_are_in_the_text(tokenizer, name, chat, length):
    sample = make_sample(TASKS[name], tokenizer, length, index=3, seed=7, chat=chat)
    assert len(sample.prompt_ids) == length
    text = tokenizer.decode(sample.prompt_ids)
    assert sample.answers and all(answer in text for answer in sample.answers)
    assert sample.id == f"{name}-{length}-3"


def test_samples_are_deterministic_by_seed_and_index(tokenizer):
    task = TASKS["niah_multikey"]
    a, b = (make_sample(task, tokenizer, 1200, 0, seed=1, chat=False) for _ in range(2))
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert make_sample(task, tokenizer, 1200, 1, seed=1, chat=False).prompt_ids != a.prompt_ids
    assert make_sample(task, tokenizer, 1200, 0, seed=2, chat=False).prompt_ids != a.prompt_ids


def test_a_needle_sits_near_its_depth(tokenizer):
    for index in range(5):
        sample = make_sample(TASKS["passkey"], tokenizer, 3000, index, seed=0, chat=False)
        text = tokenizer.decode(sample.prompt_ids)
        where = text.index(f"The pass key is {sample.answers[0]}") / len(text)
        assert abs(where - sample.meta["depth"]) < 0.1


def test_variable_tracking_answers_resolve_the_chain(tokenizer):
    sample = make_sample(TASKS["vt"], tokenizer, 1500, 0, seed=0, chat=False)
    text = tokenizer.decode(sample.prompt_ids)
    direct = dict(re.findall(r"VAR (\w+) = (\d+)\.", text))
    links = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", text))
    resolved = set(direct)
    while any(src in resolved and dst not in resolved for dst, src in links.items()):
        resolved |= {dst for dst, src in links.items() if src in resolved}
    assert resolved == set(sample.answers) and len(resolved) == 5


@pytest.mark.parametrize("name,top", [("cwe", 10), ("fwe", 3)])
def test_word_tasks_answer_the_truly_most_frequent_words(tokenizer, name, top):
    sample = make_sample(TASKS[name], tokenizer, 2500, 0, seed=0, chat=False)
    text = tokenizer.decode(sample.prompt_ids)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", text))
    ranked = [w for w, _ in counts.most_common()]
    assert set(ranked[:top]) == set(sample.answers)
    assert counts[ranked[top - 1]] > counts[ranked[top]]  # no tie at the cut


def test_a_length_too_short_for_the_task_is_a_clear_error(tokenizer):
    with pytest.raises(KvrtError, match="cannot hold"):
        make_sample(TASKS["niah_multiquery"], tokenizer, 60, 0, seed=0, chat=False)


def test_user_haystack_files_fill_the_text(tokenizer, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("Zebras graze quietly. Otters float on their backs! Do herons sleep standing?\n" * 5)
    sample = make_sample(TASKS["niah_single_2"], tokenizer, 800, 0, seed=0, chat=False, haystack=[str(story)])
    text = tokenizer.decode(sample.prompt_ids)
    assert "Otters float" in text and "the baker" not in text
    with pytest.raises(KvrtError, match="not found"):
        make_sample(TASKS["niah_single_2"], tokenizer, 800, 0, seed=0, chat=False, haystack=[str(tmp_path / "x")])


@pytest.mark.parametrize("name", ["niah_multikey_2", "niah_multikey_3"])
def test_a_haystack_of_needles_holds_the_asked_key_once_among_distractors(tokenizer, name):
    sample = make_sample(TASKS[name], tokenizer, 2000, 0, seed=0, chat=False)
    text = tokenizer.decode(sample.prompt_ids)
    asked = re.search(r"What is the special magic \w+ for (\S+) mentioned", text)[1]
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text)
    assert len(needles) > 10 and [k for k, _ in needles].count(asked) == 1
    assert dict(needles)[asked] == sample.answers[0]
