"""The task registry and kvrt eval's one standard setting.

A task makes its samples (synthetic ones at a token length, LongBench ones from local JSONL),
states its metric, generation budget and whether the chat template wraps the prompt, and
post-processes predictions before scoring. Decoding is greedy everywhere; the seed fixes the
synthetic samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval import babilong, counting_stars, longbench, longbench_v2, ruler_qa, synthetic
from kvrt.eval.sample import Sample, framed_prompt

GENERATED = {**synthetic.TASKS, **ruler_qa.TASKS, **counting_stars.TASKS, **babilong.TASKS}  # made at a length

# The chat template, per task, in one place: synthetic tasks end in an answer prefix that
# any model (base or instruct) completes; LongBench follows its own convention.
CHAT_TEMPLATE = {**{name: False for name in [*synthetic.TASKS, *ruler_qa.TASKS]},
                 # these ask a chat model
                 "niah": True, **{name: True for name in [*counting_stars.TASKS, *babilong.TASKS]},
                 **{name: ds.chat for name, ds in longbench.DATASETS.items()}, longbench_v2.NAME: True}
RULER = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]

SUITES = {
    # retrieval (passkey, single/multi-key/multi-value needles), multi-hop tracing, aggregation
    "lite": ["passkey", "niah_single_2", "niah_multikey", "niah_multivalue", "vt", "fwe"],
    "ruler": RULER,
    "longbench": list(longbench.DATASETS),
    # a few tasks of each generated benchmark at sizes a laptop runs, in the spirit of LOOM-Scope's
    # LOOMBench: retrieval, tracing, aggregation, the needle sweep, multi-evidence counting, bAbI reasoning
    "standard": ["niah_single_2", "niah_multikey", "vt", "fwe", "niah", "counting_stars_searching",
                 "counting_stars_reasoning", "babilong_qa1", "babilong_qa2", "babilong_qa4"],
}
LITE_LENGTHS = [512, 1024]
SUITE_LENGTHS = {"standard": [1024, 2048]}  # a suite's lengths when --lengths is not given (else LITE_LENGTHS)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    max_new_tokens: int
    synthetic: bool

    @property
    def chat(self) -> bool:
        return CHAT_TEMPLATE[self.name]

    def samples(self, tokenizer, length: int | None, limit: int, seed: int, max_length: int,
                haystack: list[str] | None = None, data_dir: str | None = None) -> list[Sample]:
        """The first `limit` samples: synthetic ones generated at `length` tokens, LongBench
        ones read from `data_dir` (and middle-truncated to `max_length` with the answer's room)."""
        if self.synthetic:
            task = GENERATED[self.name]
            return [synthetic.make_sample(task, tokenizer, length, i, seed, self.chat, haystack, limit, data_dir)
                    for i in range(limit)]
        if self.name == longbench_v2.NAME:
            return self.v2_samples(tokenizer, limit, max_length, data_dir)
        if data_dir is None:
            raise KvrtError(f"LongBench task '{self.name}' reads local files: pass --data DIR holding {self.name}.jsonl")
        ds = longbench.dataset(self.name)
        out = []
        for record in longbench.read_jsonl(Path(data_dir) / f"{self.name}.jsonl")[:limit]:
            ids, cut = framed_prompt(tokenizer, longbench.prompt_text(ds, record), self.chat, max_length,
                                     self.max_new_tokens)
            meta = {"length": record.get("length"), "all_classes": record.get("all_classes"), "truncated": cut}
            out.append(Sample(str(record.get("_id", len(out))), ids, [str(a) for a in record["answers"]], meta))
        return out

    def v2_samples(self, tokenizer, limit: int, max_length: int, data_dir: str | None) -> list[Sample]:
        if data_dir is None:
            raise KvrtError(f"{self.name} reads local files: pass --data DIR holding data.json")
        out = []
        for item in longbench_v2.read_items(data_dir)[:limit]:
            ids, cut = framed_prompt(tokenizer, longbench_v2.prompt_text(item), self.chat, max_length,
                                     self.max_new_tokens)
            meta = {k: item.get(k) for k in ("domain", "difficulty", "length")} | {"truncated": cut}
            out.append(Sample(str(item["_id"]), ids, [item["answer"]], meta))
        return out

    def scored_text(self, prediction: str) -> str:
        if self.synthetic or self.name == longbench_v2.NAME:
            return prediction
        return longbench.first_line(longbench.dataset(self.name), prediction)


def get_task(name: str) -> Task:
    if name in GENERATED:
        t = GENERATED[name]
        return Task(name, t.metric, t.max_new_tokens, synthetic=True)
    if name == longbench_v2.NAME:
        return Task(name, "choice", longbench_v2.MAX_NEW_TOKENS, synthetic=False)
    if name in longbench.DATASETS or name in longbench.CHINESE:
        ds = longbench.dataset(name)
        return Task(name, ds.metric, ds.max_new_tokens, synthetic=False)
    known = ", ".join([*GENERATED, *longbench.DATASETS, longbench_v2.NAME])
    raise KvrtError(f"unknown task '{name}'; available: {known}")


def resolve(tasks: str | None, suite: str | None) -> list[Task]:
    """Tasks named by --tasks (comma-separated) or --suite."""
    if tasks:
        return [get_task(n.strip()) for n in tasks.split(",") if n.strip()]
    if suite not in SUITES:
        raise KvrtError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
    return [get_task(n) for n in SUITES[suite]]
