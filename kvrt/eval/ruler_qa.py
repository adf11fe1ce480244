"""RULER's qa_1 and qa_2 (Hsieh et al. 2024, arXiv 2404.06654; github.com/NVIDIA/RULER,
scripts/data/synthetic/qa.py): a question over many documents, one or two of which answer it.

The documents come from the files RULER downloads, under `--data DIR` by RULER's names:
- qa_1 reads SQuAD 2.0's dev set (`squad.json`, dev-v2.0.json): answerable questions only, a
  question's paragraph as its document, the other paragraphs of its article first among the
  distractors;
- qa_2 reads HotpotQA's dev set in the distractor setting (`hotpotqa.json`,
  hotpot_dev_distractor_v1.json): each context paragraph "title\\nsentences" a document.
Distractors are added until the prompt would pass the length; the documents are shuffled and
numbered "Document i:" in RULER's template, plain text ending in " Answer:"; 32 new tokens;
string_match_part (any gold answer in the reply). The question a sample asks is drawn by the seed
(RULER takes them in file order).
"""

from __future__ import annotations

import functools
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.files import json_value, read_file
from kvrt.eval.sample import Sample
from kvrt.eval.synthetic import Task

INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output "
               "any other words.")
FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
SOURCES = {"squad": "dev-v2.0.json from rajpurkar.github.io/SQuAD-explorer",
           "hotpotqa": "hotpot_dev_distractor_v1.json from hotpotqa.github.io"}


def read_squad(data) -> tuple[list[dict], list[str]]:
    """(questions, documents): each question with its answers, its document and its article's others."""
    docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
    index = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in data["data"]:
        siblings = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible"):
                    own = index[p["context"]]
                    questions.append({"query": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                                      "docs": [own], "related": [i for i in siblings if i != own]})
    return questions, docs


def read_hotpotqa(data) -> tuple[list[dict], list[str]]:
    """(questions, documents): each question with its answer and its context paragraphs as documents."""
    docs = sorted({f"{title}\n{''.join(sentences)}" for item in data for title, sentences in item["context"]})
    index = {doc: i for i, doc in enumerate(docs)}
    questions = [{"query": item["question"], "answers": [item["answer"]], "related": [],
                  "docs": [index[f"{title}\n{''.join(sentences)}"] for title, sentences in item["context"]]}
                 for item in data]
    return questions, docs


@functools.lru_cache(maxsize=4)
def dataset(data_dir: str, name: str) -> tuple[list[dict], list[str]]:
    path = Path(data_dir) / FILES[name]
    if not path.exists():
        raise KvrtError(f"RULER's {'qa_1' if name == 'squad' else 'qa_2'} reads --data DIR/{FILES[name]} "
                        f"({SOURCES[name]}, as RULER's download_qa_dataset.sh saves it)")
    data = json_value(read_file(path, "QA file"), path)
    try:
        questions, docs = (read_squad if name == "squad" else read_hotpotqa)(data)
    except (KeyError, TypeError) as exc:
        raise KvrtError(f"{path}: not {name}'s format ({type(exc).__name__}: {exc})") from None
    if not questions:
        raise KvrtError(f"{path} holds no answerable question")
    return questions, docs


class RulerQA(Task):
    metric, max_new_tokens = "string_match_part", 32
    needs_data = True  # a run without --data skips it (kvrt.eval.runner.cells)

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.data_file = FILES[source]

    def sample(self, builder, rng, seed, haystack):
        raise KvrtError(f"{self.name} reads --data DIR/{FILES[self.source]} ({SOURCES[self.source]})")

    def sample_from(self, builder, rng, seed, haystack, data_dir, position):
        if data_dir is None:
            return self.sample(builder, rng, seed, haystack)
        questions, docs = dataset(str(data_dir), self.source)
        question = questions[rng.randrange(len(questions))]
        related = rng.sample(question["related"], len(question["related"]))
        taken = set(question["docs"]) | set(related)
        others = [i for i in rng.sample(range(len(docs)), len(docs)) if i not in taken]
        head = builder.head(f"{INSTRUCTION}\n\nThe following are given documents.\n\n")
        tail = builder.tail(f"\n{INSTRUCTION}\n\nQuestion: {question['query']}", "Answer:")
        room = builder.length - len(head) - len(tail)
        chosen, used = list(question["docs"]), 0
        for i in chosen + related + others:  # the gold first, then the article's others, then any
            cost = len(builder.ids(f"Document 99:\n{docs[i]}\n\n", lead=""))
            if used + cost > room:
                break
            used += cost
            if i not in chosen:
                chosen.append(i)
        rng.shuffle(chosen)
        while True:
            context = "\n\n".join(f"Document {n}:\n{docs[i]}" for n, i in enumerate(chosen, start=1))
            ids = head + builder.ids(context, lead="") + tail
            spare = [i for i in chosen if i not in question["docs"]]
            if len(ids) <= builder.length or not spare:
                break
            chosen.remove(spare[-1])  # the estimate ran over: one distractor less
        if len(ids) > builder.length:
            raise KvrtError(f"{self.name}: {builder.length} tokens cannot hold the question and its documents")
        return Sample("", ids, question["answers"], {"documents": len(chosen)})


TASKS = {t.name: t for t in [RulerQA("qa_1", "squad"), RulerQA("qa_2", "hotpotqa")]}
