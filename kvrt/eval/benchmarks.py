"""The benchmarks `kvrt eval --benchmark` names, each stated in one place: its tasks, where its data
comes from, and the standard settings kvrt runs it with (prompt, truncation, answer budget, metric),
in the spirit of LOOM-Scope (arXiv 2507.04723), which fixes such settings across benchmarks. The
facts come from each benchmark's paper and repository, cited here; the prompts' wording is kvrt's
own where a benchmark is generated.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.errors import KvrtError
from kvrt.eval import counting_stars
from kvrt.eval.tasks import SUITES


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[str, ...]
    source: str  # the paper and repository the facts come from
    data: str  # where its samples come from
    settings: str  # prompt frame, lengths, answer budget, metric


BENCHMARKS = {b.name: b for b in [
    Benchmark(
        "ruler", tuple(SUITES["ruler"]),
        "Hsieh et al. 2024, RULER: What's the Real Context Size of Your Long-Context Language Models? "
        "(arXiv 2404.06654; github.com/NVIDIA/RULER)",
        "generated with the evaluated model's tokenizer at each of --lengths, deterministic by --seed; qa_1 and "
        "qa_2 over SQuAD 2.0 dev and HotpotQA dev (distractor) from --data DIR/squad.json, DIR/hotpotqa.json "
        "(skipped without them)",
        "plain text (no chat template) ending in an answer prefix; the haystack cut so that the prompt is "
        "exactly the length (qa: documents added up to it); greedy; 128 new tokens for the needles, 30 for vt, "
        "120 for cwe, 50 for fwe, 32 for qa; string_match_all (share of gold strings in the reply), qa "
        "string_match_part (any)"),
    Benchmark(
        "niah", ("niah",),
        "Kamradt 2023, Needle In A Haystack (github.com/gkamradt/LLMTest_NeedleInAHaystack)",
        "generated: one needle in --haystack files (Kamradt's are Paul Graham's essays) or kvrt's sentences",
        "the chat template; sample i of --limit at depth i/(limit-1), 0-100% linear, at each of --lengths; "
        "the question after the text; greedy, 64 new tokens; needle_recall (share of the answer's words, "
        "in place of the original GPT-4 grade); a length x depth heatmap per spec"),
    Benchmark(
        "counting_stars", ("counting_stars_searching", "counting_stars_reasoning", *counting_stars.FILES),
        "Song et al. 2024, Counting-Stars (arXiv 2403.11802; github.com/nick7nlp/Counting-Stars), English version",
        "generated: star sentences in --haystack files (the benchmark's are Paul Graham's essays) or kvrt's "
        "sentences, one per 128 tokens (2-32), the i-th of m at depth i/m; the published English files (32 stars, "
        "3,200-102,400 words) as counting_stars_en_searching/reasoning from --data DIR under their names "
        "(skipped without it)",
        "the chat template; the benchmark's question asking for a JSON list; greedy, 128 new tokens; the share of "
        "counts found (searching) and its partial credit for wrong counts (reasoning)"),
    Benchmark(
        "babilong", tuple(f"babilong_qa{i}" for i in range(1, 6)),
        "Kuratov et al. 2024, BABILong (arXiv 2406.10149; github.com/booydar/babilong); bAbI (Weston et al. 2015)",
        "bAbI's own stories from --data DIR (tasks_1-20_v1-2/en-10k/<task>_train.txt, as BABILong builds its sets), "
        "else bAbI-style stories told by kvrt (bAbI's people, places, objects and verbs); the facts at sorted "
        "random depths of --haystack files (BABILong's are PG-19 books) or kvrt's sentences",
        "BABILong's published prompt per task (instruction, examples, answer format, <context> ... </context>, "
        "Question); the chat template; greedy, 20 new tokens; its scorer (the first sentence names the answer "
        "and no other label)"),
    Benchmark(
        "longbench", tuple(SUITES["longbench"]),
        "Bai et al. 2023, LongBench (arXiv 2308.14508; github.com/THUDM/LongBench)",
        "files: --data DIR holding <dataset>.jsonl as published, else data.zip of HF THUDM/LongBench",
        "each dataset's published prompt (config/dataset2prompt.json) and answer budget; the chat template except "
        "for the few-shot and code datasets (trec, triviaqa, samsum, lcc, repobench-p), as pred.py; prompts cut in "
        "the middle to --max-length; greedy; the published metric per dataset, the few-shot ones on the first line"),
    Benchmark(
        "longbench_v2", ("longbench_v2", "longbench_v2_cot"),
        "Bai et al. 2024, LongBench v2 (arXiv 2412.15204; github.com/THUDM/LongBench)",
        "files: --data DIR/data.json as published, else HF THUDM/LongBench-v2",
        "the repository's templates through the chat template, cut in the middle to --max-length; greedy (pred.py "
        "samples at 0.1); zero-shot (prompts/0shot.txt): 128 new tokens; chain of thought (0shot_cot.txt, then "
        "0shot_cot_ans.txt with the reasoning and without the text): 1024 new tokens, then 128; the letter of "
        "'The correct answer is (X)' against the gold one"),
    Benchmark(
        "infinitebench", tuple(SUITES["infinitebench"]),
        "Zhang et al. 2024, InfiniteBench (arXiv 2402.13718; github.com/OpenBMB/InfiniteBench), English tasks",
        "files: --data DIR/<task>.jsonl as published (passkey.jsonl, longbook_qa_eng.jsonl, ...), else HF "
        "xinrongzhang2022/InfiniteBench",
        "the templates its open-model scripts use (src/prompt.py, yarn_mistral_templates) as plain text; cut in the "
        "middle to --max-length; greedy; its budgets (passkey 6, number_string 12, kv_retrieval 50, En.QA/En.MC 40, "
        "En.Sum 1200, Code.Debug 5, Math.Find 3 new tokens) and its scorers (src/compute_scores.py; En.Sum: "
        "ROUGE-Lsum)"),
    Benchmark(
        "lite", tuple(SUITES["lite"]), "kvrt's own quick suite (RULER's tasks plus a passkey)",
        "generated, as ruler", "as ruler; passkey: 16 new tokens"),
]}


def benchmark_tasks(names: str) -> list[str]:
    """The tasks of comma-separated benchmark names, each once, in order."""
    tasks: list[str] = []
    for name in (n.strip() for n in names.split(",")):
        if name not in BENCHMARKS:
            raise KvrtError(f"unknown benchmark '{name}'; available: {', '.join(BENCHMARKS)}")
        tasks += [t for t in BENCHMARKS[name].tasks if t not in tasks]
    return tasks


def parse_lengths(text: str) -> list[int]:
    """'512,1k,2k' -> [512, 1024, 2048] (k: 1024 tokens, as RULER's and LOOM-Scope's lengths)."""
    lengths = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            lengths.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise KvrtError(f"--lengths takes comma-separated token counts like 512,1k,2k; got '{part}'") from None
    if not lengths or min(lengths) < 1:
        raise KvrtError(f"--lengths takes positive token counts like 512,1k,2k; got '{text}'")
    return lengths
