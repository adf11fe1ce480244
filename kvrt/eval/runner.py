"""Running an evaluation: every (cache spec, task, length) cell, resumable sample by sample.

Layout of an out folder:
    settings.json                          what was asked (model, specs, tasks, lengths, limit, seed ...)
    predictions/<spec>/<task>-<length>.jsonl   one line per finished sample

A line is appended with one write on an O_APPEND file and flushed to disk, only once its
sample is scored. A rerun reads the files, drops a torn last line (a kill mid-write) quietly,
removes and reports any other line that holds no record (damage on disk), keeping every valid
line, and skips every sample id already present, so a run killed at any moment loses at most
the sample in flight and never writes one twice. An out folder whose settings differ is refused
unless `overwrite`, which clears its predictions first.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kvrt.errors import KvrtError
from kvrt.eval.files import json_line, json_value, read_file
from kvrt.eval.metrics import score_sample
from kvrt.eval.sample import Sample
from kvrt.eval.tasks import Task, data_only_file, get_task
from kvrt.models.progress import Progress
from kvrt.generation.sampling import SamplingParams


@dataclass
class Settings:
    model: str
    caches: list[str]
    tasks: list[str]
    lengths: list[int]
    limit: int
    seed: int = 0
    backend: str = "auto"
    dtype: str | None = None
    max_length: int | None = None  # LongBench truncation target; None = the model's context
    haystack: list[str] = field(default_factory=list)
    data_dir: str | None = None
    server: str | None = None  # an OpenAI-compatible server that generates instead (kvrt.eval.remote)

    def as_dict(self) -> dict:
        from kvrt import __version__

        return {**asdict(self), "kvrt_version": __version__, "decoding": "greedy"}


# Settings added after run folders were first written: a folder without one ran with its default
LATER_SETTINGS = {"server": None}

# Sample meta that builds or scores a sample but is not worth a line in every record
UNRECORDED = ("all_classes", "answer_template")
# What `kvrt report` reads from every record: a line without them is damaged.
RECORD_FIELDS = ("id", "cache", "task", "length", "score", "prompt_tokens", "generation_tokens", "generation_tps",
                 "kv_bytes")


def spec_slug(spec: str) -> str:
    """A folder name for a cache spec (the spec itself is stored in every line)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", spec)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` at once: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the file
    os.replace(tmp, path)


def settings_problem(path: Path, wanted: dict) -> str | None:
    """Why an out folder's saved settings.json is not `wanted` (None when it is); a damaged
    file is a reason too, so --overwrite can replace it, but a folder in its place is an error."""
    data = read_file(path, "settings file")
    try:
        saved = json_value(data, path)
    except KvrtError as exc:
        return str(exc)
    if isinstance(saved, dict):
        saved = {**LATER_SETTINGS, **saved}
    return None if saved == wanted else f"{path.parent} holds a run with other settings"


def prepare_out(out: Path, settings: Settings, overwrite: bool) -> None:
    """Create or reopen an out folder; refuse one made with other settings unless overwriting."""
    wanted = settings.as_dict()
    saved_path = out / "settings.json"
    if saved_path.exists():
        problem = settings_problem(saved_path, wanted)
        if problem:
            if not overwrite:
                raise KvrtError(f"{problem}; pass --overwrite to replace it or choose another --out")
            shutil.rmtree(out / "predictions", ignore_errors=True)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise KvrtError(f"{out} exists and is not a kvrt eval folder; choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvrtError(f"cannot create the run folder {out} ({exc.strerror or type(exc).__name__}); "
                        "choose another --out") from None
    write_atomic(saved_path, (json.dumps(wanted, indent=1) + "\n").encode())


def prediction_record(line: bytes, path: Path, number: int) -> dict:
    """The record on line `number` of a predictions file; a line that is not one is a KvrtError."""
    record = json_line(line, path, number)
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise KvrtError(f"{path}:{number}: not a kvrt eval record (missing {', '.join(missing)})")
    if not isinstance(record["id"], str):
        raise KvrtError(f"{path}:{number}: not a kvrt eval record (its id is not a string)")
    return record


@dataclass
class Predictions:
    """A predictions file as read: the records by sample id, its valid lines, and what was wrong."""

    records: dict[str, dict]
    valid: bytes  # every line that holds a record, newline included, in file order
    damaged: dict[int, str]  # line number -> why it holds no record
    torn: bool  # the last line lacks its newline: the run was killed while writing it


def read_predictions(path: Path) -> Predictions:
    """Every record of a predictions file, keeping the valid lines whatever lies between them."""
    lines = read_file(path, "predictions file").split(b"\n")
    torn = lines.pop() != b""  # what follows the last newline: nothing, or a line cut mid-write
    records, valid, damaged = {}, [], {}
    for number, line in enumerate(lines, start=1):
        try:
            record = prediction_record(line, path, number)
        except KvrtError as exc:
            damaged[number] = str(exc)
            continue
        records[record["id"]] = record
        valid.append(line + b"\n")
    return Predictions(records, b"".join(valid), damaged, torn)


def counted(n: int, noun: str) -> str:
    """3 samples, 1 cell."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def line_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7": line numbers in short form, however many there are."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def finished(path: Path, report: Callable[[str], None] = print) -> dict[str, dict]:
    """Records already written, by sample id. A torn last line is cut off quietly; damaged lines
    are removed from the file and reported (their samples run again); every valid line stays."""
    if not path.exists():
        return {}
    found = read_predictions(path)
    if found.damaged or found.torn:
        write_atomic(path, found.valid)
    if found.damaged:
        numbers = list(found.damaged)
        report(f"{path}: dropped {counted(len(numbers), 'damaged line')} ({'lines' if len(numbers) > 1 else 'line'} "
               f"{line_ranges(numbers)}: not UTF-8, JSON or a kvrt eval record); their samples run again")
    return found.records


def append_record(path: Path, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Cell:
    spec: str
    task: Task
    length: int | None  # None for LongBench (its samples bring their own lengths)

    @property
    def name(self) -> str:
        return f"{self.task.name}-{self.length}" if self.length else self.task.name


def cells(settings: Settings, context_length: int, report: Callable[[str], None]) -> list[Cell]:
    """Every (spec, task, length) to run; synthetic lengths the model cannot reach (with the
    answer's room) are reported and skipped, and so are tasks that read files only --data gives
    (RULER's qa, Counting-Stars' published files) when there is none; a run left with no cell at all is an error."""
    held = Path(settings.data_dir) if settings.data_dir else None
    wanting = [n for n in settings.tasks if data_only_file(n) and not (held and (held / data_only_file(n)).exists())]
    if wanting:
        files = ", ".join(f"{n} (DIR/{data_only_file(n)})" for n in wanting)
        if len(wanting) == len(settings.tasks):
            raise KvrtError(f"{files} read the benchmark's files: pass --data DIR holding them")
        why = f"{held} does not hold them" if held else "no --data DIR was given"
        report(f"skipped {files}: they read the benchmark's files, and {why}")
    out, skipped = [], 0
    for spec in settings.caches:
        for name in settings.tasks:
            if name in wanting:
                continue
            task = get_task(name)
            if not task.synthetic:
                out.append(Cell(spec, task, None))
                continue
            for length in settings.lengths:
                if length + task.max_new_tokens > context_length:
                    skipped += 1
                    continue
                out.append(Cell(spec, task, length))
    if skipped:
        report(f"skipped {skipped} (cache, task, length) cells whose length + answer exceeds the model's "
               f"context of {context_length} tokens")
    return out


ProgressFactory = Callable[..., Progress]  # called as Progress is: (label, total, unit, log_every=...)


def progress_factory(progress: bool | ProgressFactory) -> ProgressFactory:
    """`Progress` on stderr for True, a progress that never shows for False, else the caller's
    own factory (e.g. `functools.partial(Progress, delay=0, stream=log)`)."""
    if callable(progress):
        return progress
    return Progress if progress else functools.partial(Progress, enabled=False)


@dataclass
class CellPlan:
    """A cell's predictions file and its samples, all of them and those still to run."""

    cell: Cell
    path: Path
    samples: list[Sample]
    todo: list[Sample]


def plan_cells(model, settings: Settings, todo: list[Cell], out: Path, report: Callable[[str], None],
               show: ProgressFactory) -> list[CellPlan]:
    """Each cell's samples, built with progress shown (long synthetic lengths take a while),
    less those its predictions file already holds."""
    paths = [out / "predictions" / spec_slug(cell.spec) / f"{cell.name}.jsonl" for cell in todo]
    done = [finished(path, report) for path in paths]  # before the progress line, so reports don't break it
    max_length = settings.max_length or model.context_length
    built: dict[tuple[str, int | None], list[Sample]] = {}  # a (task, length) has the same samples for every spec
    plans = []
    with show("preparing samples", len(todo), "cells", log_every=0.1) as bar:
        for cell, path, records in zip(todo, paths, done):
            key = (cell.task.name, cell.length)
            if key not in built:
                built[key] = cell.task.samples(model.tokenizer, cell.length, settings.limit, settings.seed, max_length,
                                               settings.haystack or None, settings.data_dir)
            plans.append(CellPlan(cell, path, built[key], [s for s in built[key] if s.id not in records]))
            bar.advance(note=f"{cell.spec} {cell.name}")
    return plans


def plan_summary(plans: list[CellPlan]) -> str:
    """One line: how many cells and samples, how many a killed run already did, how many run now."""
    total = sum(len(p.samples) for p in plans)
    todo = sum(len(p.todo) for p in plans)
    return (f"{counted(len(plans), 'cell')}, {counted(total, 'sample')}: {total - todo} already done (resumed), "
            f"{todo} to run")


def run_eval(model, settings: Settings, out: Path, overwrite: bool = False, progress: bool | ProgressFactory = True,
             report: Callable[[str], None] = print, ray_address: str | None = None, workers: int = 2,
             batch: int = 1) -> dict:
    """Run (or resume) every cell, here or sharded over Ray workers (`ray_address`: a cluster's
    address, "auto" for the running one, "local" to start one with `workers` workers); this
    process alone writes the files. `batch` > 1 decodes that many samples of a cell together
    (kvrt.generation.scheduler; greedy predictions equal batch 1's). With `settings.server`, `model` is a
    kvrt.eval.remote.RemoteModel and `workers` requests are in flight at once. `progress`: True shows
    it on stderr, False stays silent, or a factory made like `kvrt.models.progress.Progress`.
    Returns {"cells": n, "written": n}."""
    show = progress_factory(progress)
    prepare_out(out, settings, overwrite)
    plans = plan_cells(model, settings, cells(settings, model.context_length, report), out, report, show)
    report(plan_summary(plans))
    work = [(p.cell, p.path, sample) for p in plans for sample in p.todo]
    for _, path, _ in work:
        path.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(i, cell, sample) for i, (cell, _, sample) in enumerate(work)]
    if ray_address:
        from kvrt.eval.distributed import ray_records

        results = ray_records(ray_address, workers, settings, [(cell, sample) for cell, _, sample in work], batch)
    elif settings.server:
        results = concurrent_records(model, jobs, workers)
    else:
        results = (pair for group in batched_jobs(jobs, batch) for pair in run_samples(model, group))
    written = 0
    with show("eval", len(work), "samples", log_every=0) as bar:
        for i, record in results:  # in completion order; each record goes to its own cell's file
            cell, path, _ = work[i]
            append_record(path, record)
            written += 1
            bar.advance(note=f"{cell.spec} {cell.name}: score {record['score']:.2f}")
    return {"cells": len(plans), "written": written}


def concurrent_records(model, jobs: list[tuple], workers: int):
    """(index, record) of each job, `workers` requests in flight at once (a server batches them), in
    completion order; the first failure stops the rest."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    pool = ThreadPoolExecutor(workers)
    try:
        for future in as_completed([pool.submit(run_samples, model, [job]) for job in jobs]):
            yield from future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched_jobs(jobs: list[tuple], size: int) -> list[list[tuple]]:
    """(index, cell, sample) jobs in groups of at most `size` that share a cell (its spec and budget of
    new tokens), in order."""
    groups: list[list[tuple]] = []
    for job in jobs:
        if groups and len(groups[-1]) < size and groups[-1][0][1] == job[1]:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def run_samples(model, jobs: list[tuple]) -> list[tuple[int, dict]]:
    """(index, record) of each (index, cell, sample) job of one cell: alone, or decoded as one batch."""
    if len(jobs) == 1:
        index, cell, sample = jobs[0]
        return [(index, run_sample(model, cell, sample))]
    return list(zip([index for index, _, _ in jobs], cell_records(model, jobs[0][1], [s for _, _, s in jobs])))


def run_sample(model, cell: Cell, sample) -> dict:
    return cell_records(model, cell, [sample])[0]


def cell_records(model, cell: Cell, samples: list) -> list[dict]:
    """The records of samples of one cell, generated together."""
    gens = generated(model, [s.prompt_ids for s in samples], cell.task.max_new_tokens, cell.spec)
    if not cell.task.answer_tokens:
        return [sample_record(cell, sample, gen) for sample, gen in zip(samples, gens)]
    # chain of thought: a second turn answers from the first's reasoning
    turns = [cell.task.answer_prompt(model.tokenizer, s, gen.text, model.context_length) for s, gen in zip(samples, gens)]
    answers = generated(model, turns, cell.task.answer_tokens, cell.spec)
    return [sample_record(cell, sample, answer, reasoning=gen) for sample, gen, answer in zip(samples, gens, answers)]


def generated(model, prompts: list[list[int]], max_tokens: int, spec: str) -> list:
    """Greedy generations of the prompts: one alone, several decoded as one batch."""
    if len(prompts) == 1:
        return [model.generate_ids(prompts[0], max_tokens=max_tokens, cache=spec, params=SamplingParams())]
    return model.generate_ids_batch(prompts, max_tokens=max_tokens, cache=spec, params=SamplingParams(),
                                    max_batch=len(prompts))


def sample_record(cell: Cell, sample, gen, reasoning=None) -> dict:
    """The scored record of a sample. With a reasoning turn, `gen` is the answer's; the costs are the reasoning's,
    which read the long prompt, and the new tokens are both turns'."""
    prediction = gen.text
    score = score_sample(cell.task.metric, cell.task.scored_text(prediction), sample.answers, sample.meta)
    s = (reasoning or gen).stats
    new_tokens = gen.stats.generation_tokens + (reasoning.stats.generation_tokens if reasoning else 0)
    extra = {"reasoning": reasoning.text} if reasoning else {}
    return {
        "id": sample.id, "cache": cell.spec, "task": cell.task.name, "synthetic": cell.task.synthetic,
        "length": cell.length or len(sample.prompt_ids),
        "prediction": prediction, **extra, "answers": sample.answers, "score": score,
        "prompt_tokens": s.prompt_tokens, "generation_tokens": new_tokens,
        "prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "kv_bytes": s.kv_bytes,
        "kv_host_bytes": s.kv_host_bytes,
        "meta": {k: v for k, v in sample.meta.items() if k not in UNRECORDED}, "time": time.time(),
    }
