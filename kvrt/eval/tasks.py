"""The task registry and kvrt eval's one standard setting.

A task makes its samples (synthetic ones at a token length, the others from the benchmarks' files),
states its metric, generation budget and whether the chat template wraps the prompt, and
post-processes predictions before scoring. Decoding is greedy everywhere; the seed fixes the
synthetic samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.errors import KvrtError
from kvrt.eval import babilong, counting_stars, infinitebench, longbench, longbench_v2, ruler_qa, synthetic
from kvrt.eval.hub import data_file
from kvrt.eval.sample import Sample, framed_prompt

GENERATED = {**synthetic.TASKS, **ruler_qa.TASKS, **counting_stars.TASKS, **babilong.TASKS}  # made at a length

# The chat template, per task, in one place: synthetic tasks end in an answer prefix that
# any model (base or instruct) completes; LongBench follows its own convention; InfiniteBench's
# open-model templates are plain text, most ending in an answer prefix (kvrt/eval/infinitebench.py).
CHAT_TEMPLATE = {**{name: False for name in [*synthetic.TASKS, *ruler_qa.TASKS]},
                 # these ask a chat model
                 **{name: True for name in ["niah", *counting_stars.ALL_TASKS, *babilong.TASKS, longbench_v2.NAME,
                                            longbench_v2.COT_NAME]},
                 **{name: ds.chat for name, ds in longbench.DATASETS.items()},
                 **{name: infinitebench.CHAT for name in infinitebench.TASKS}}
RULER = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]

SUITES = {
    # retrieval (passkey, single/multi-key/multi-value needles), multi-hop tracing, aggregation
    "lite": ["passkey", "niah_single_2", "niah_multikey", "niah_multivalue", "vt", "fwe"],
    "ruler": RULER,
    "longbench": list(longbench.DATASETS),
    "infinitebench": list(infinitebench.TASKS),
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

    @property
    def answer_tokens(self) -> int:
        """New tokens of a second turn that answers from the first one's reasoning (LongBench v2's chain of
        thought); 0 for a task answered in one turn."""
        return longbench_v2.MAX_NEW_TOKENS if self.name == longbench_v2.COT_NAME else 0

    def answer_prompt(self, tokenizer, sample: Sample, reasoning: str, max_length: int) -> list[int]:
        text = sample.meta["answer_template"].replace("$COT$", reasoning.strip())
        return framed_prompt(tokenizer, text, self.chat, max_length, self.answer_tokens)[0]

    def samples(self, tokenizer, length: int | None, limit: int, seed: int, max_length: int,
                haystack: list[str] | None = None, data_dir: str | None = None) -> list[Sample]:
        """The first `limit` samples: synthetic ones generated at `length` tokens, the others read from their
        files (under `data_dir`, else from the hub) and cut in the middle to `max_length` with the answer's room."""
        if self.synthetic:
            task = GENERATED[self.name]
            return [synthetic.make_sample(task, tokenizer, length, i, seed, self.chat, haystack, limit, data_dir)
                    for i in range(limit)]
        if self.name in (longbench_v2.NAME, longbench_v2.COT_NAME):
            return self.v2_samples(tokenizer, limit, max_length, data_dir)
        if self.name in infinitebench.TASKS:
            return self.infinitebench_samples(tokenizer, limit, max_length, data_dir)
        if self.name in counting_stars.FILES:
            return self.stars_samples(tokenizer, limit, max_length, data_dir)
        ds = longbench.dataset(self.name)
        path = data_file(data_dir, f"{self.name}.jsonl", longbench.hub_file(self.name), self.name)
        out = []
        for record in longbench.read_jsonl(path)[:limit]:
            ids, cut = self.framed(tokenizer, longbench.prompt_text(ds, record), max_length)
            meta = {"length": record.get("length"), "all_classes": record.get("all_classes"), "truncated": cut}
            out.append(Sample(str(record.get("_id", len(out))), ids, [str(a) for a in record["answers"]], meta))
        return out

    def framed(self, tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
        return framed_prompt(tokenizer, text, self.chat, max_length, self.max_new_tokens)

    def v2_samples(self, tokenizer, limit: int, max_length: int, data_dir: str | None) -> list[Sample]:
        cot = self.name == longbench_v2.COT_NAME
        out = []
        for item in longbench_v2.read_items(data_file(data_dir, "data.json", longbench_v2.HUB, self.name))[:limit]:
            template = longbench_v2.COT_TEMPLATE if cot else longbench_v2.TEMPLATE
            ids, cut = self.framed(tokenizer, longbench_v2.prompt_text(item, template), max_length)
            meta = {k: item.get(k) for k in ("domain", "difficulty", "length")} | {"truncated": cut}
            if cot:  # the answer turn's prompt, but for the reasoning it will hold
                meta["answer_template"] = longbench_v2.prompt_text(item, longbench_v2.COT_ANSWER_TEMPLATE)
            out.append(Sample(str(item["_id"]), ids, [item["answer"]], meta))
        return out

    def infinitebench_samples(self, tokenizer, limit: int, max_length: int, data_dir: str | None) -> list[Sample]:
        spec = infinitebench.TASKS[self.name]
        path = data_file(data_dir, f"{spec.name}.jsonl", infinitebench.hub_file(spec.name),
                         f"{self.name} ({spec.title})")
        out = []
        for item in infinitebench.read_items(path, spec.name, limit):
            ids, cut = self.framed(tokenizer, infinitebench.prompt_text(spec.name, item), max_length)
            meta = infinitebench.meta(spec.name, item) | {"truncated": cut}
            out.append(Sample(str(item["id"]), ids, infinitebench.golds(spec.name, item), meta))
        return out

    def stars_samples(self, tokenizer, limit: int, max_length: int, data_dir: str | None) -> list[Sample]:
        out = []
        for number, record in enumerate(counting_stars.read_file_records(data_dir, self.name)[:limit]):
            ids, cut = self.framed(tokenizer, record["question"], max_length)
            meta = {"context_words": record["context_size"], "wrong": record["wrong"], "truncated": cut}
            out.append(Sample(str(number), ids, [str(n) for n in record["reference_counting_results"]], meta))
        return out

    def scored_text(self, prediction: str) -> str:
        """What is scored: LongBench's first-line rule applies to its datasets; the others score the reply."""
        if self.name in longbench.DATASETS:
            return longbench.first_line(longbench.DATASETS[self.name], prediction)
        return prediction


def data_only_file(name: str) -> str | None:
    """The file a task reads from --data alone (no hub serves it; a run without --data skips the task), or None."""
    if name in GENERATED and GENERATED[name].needs_data:
        return GENERATED[name].data_file
    return counting_stars.FILES.get(name)


def get_task(name: str) -> Task:
    if name in GENERATED:
        t = GENERATED[name]
        return Task(name, t.metric, t.max_new_tokens, synthetic=True)
    if name == longbench_v2.NAME:
        return Task(name, "choice", longbench_v2.MAX_NEW_TOKENS, synthetic=False)
    if name == longbench_v2.COT_NAME:  # the reasoning's budget; the answer turn's is answer_tokens
        return Task(name, "choice", longbench_v2.COT_NEW_TOKENS, synthetic=False)
    if name in counting_stars.FILES:
        task = GENERATED[name.replace("_en_", "_")]  # the generated task's budget and scorer
        return Task(name, task.metric, task.max_new_tokens, synthetic=False)
    if name in infinitebench.TASKS:
        spec = infinitebench.TASKS[name]
        return Task(name, spec.metric, spec.max_new_tokens, synthetic=False)
    if name in longbench.DATASETS or name in longbench.CHINESE:
        ds = longbench.dataset(name)
        return Task(name, ds.metric, ds.max_new_tokens, synthetic=False)
    known = ", ".join([*GENERATED, *longbench.DATASETS, longbench_v2.NAME, longbench_v2.COT_NAME,
                       *infinitebench.TASKS, *counting_stars.FILES])
    raise KvrtError(f"unknown task '{name}'; available: {known}")


def resolve(tasks: str | None, suite: str | None) -> list[Task]:
    """Tasks named by --tasks (comma-separated) or --suite."""
    if tasks:
        return [get_task(n.strip()) for n in tasks.split(",") if n.strip()]
    if suite not in SUITES:
        raise KvrtError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
    return [get_task(n) for n in SUITES[suite]]
