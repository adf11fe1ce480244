"""Running an evaluation: every (cache spec, task, length) cell, resumable sample by sample.

Layout of an out folder:
    settings.json                          what was asked (model, specs, tasks, lengths, limit, seed ...)
    predictions/<spec>/<task>-<length>.jsonl   one line per finished sample

A line is appended with one write on an O_APPEND file and flushed to disk, only once its
sample is scored. A rerun reads the files, drops a torn last line (a kill mid-write) and
skips every sample id already present, so a run killed at any moment loses at most the
sample in flight and never writes one twice. An out folder whose settings differ is refused
unless `overwrite`, which clears its predictions first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kvrt.errors import KvrtError
from kvrt.eval.metrics import score_sample
from kvrt.eval.tasks import Task, get_task
from kvrt.sampling import SamplingParams


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

    def as_dict(self) -> dict:
        from kvrt import __version__

        return {**asdict(self), "kvrt_version": __version__, "decoding": "greedy"}


def spec_slug(spec: str) -> str:
    """A folder name for a cache spec (the spec itself is stored in every line)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", spec)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_out(out: Path, settings: Settings, overwrite: bool) -> None:
    """Create or reopen an out folder; refuse one made with other settings unless overwriting."""
    wanted = settings.as_dict()
    saved_path = out / "settings.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved != wanted:
            if not overwrite:
                raise KvrtError(f"{out} holds a run with other settings; pass --overwrite to replace it "
                                "or choose another --out")
            shutil.rmtree(out / "predictions", ignore_errors=True)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise KvrtError(f"{out} exists and is not a kvrt eval folder; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved_path, json.dumps(wanted, indent=1) + "\n")


def finished(path: Path) -> dict[str, dict]:
    """Records already written, by sample id; a torn last line is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    records, good = {}, 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        records[record["id"]] = record
        good += len(line)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return records


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
    answer's room) are reported and skipped."""
    out, skipped = [], 0
    for spec in settings.caches:
        for name in settings.tasks:
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


def run_eval(model, settings: Settings, out: Path, overwrite: bool = False, progress: bool = True,
             report: Callable[[str], None] = print, ray_address: str | None = None, workers: int = 2) -> dict:
    """Run (or resume) every cell, here or sharded over Ray workers (`ray_address`: a cluster's
    address, "auto" for the running one, "local" to start one with `workers` workers); this
    process alone writes the files. Returns {"cells": n, "written": n}."""
    prepare_out(out, settings, overwrite)
    todo = cells(settings, model.context_length, report)
    max_length = settings.max_length or model.context_length
    plan = []
    for cell in todo:
        samples = cell.task.samples(model.tokenizer, cell.length, settings.limit, settings.seed, max_length,
                                    settings.haystack or None, settings.data_dir)
        path = out / "predictions" / spec_slug(cell.spec) / f"{cell.name}.jsonl"
        done = finished(path)
        plan.append((cell, path, [s for s in samples if s.id not in done]))
    work = [(cell, path, sample) for cell, path, rest in plan for sample in rest]
    for _, path, _ in work:
        path.parent.mkdir(parents=True, exist_ok=True)
    if ray_address:
        from kvrt.eval.distributed import ray_records

        results = ray_records(ray_address, workers, settings, [(cell, sample) for cell, _, sample in work])
    else:
        results = ((i, run_sample(model, cell, sample)) for i, (cell, _, sample) in enumerate(work))
    written = 0
    with _bar(len(work), progress) as bar:
        for i, record in results:  # in completion order; each record goes to its own cell's file
            append_record(work[i][1], record)
            written += 1
            bar.update(1)
    return {"cells": len(todo), "written": written}


def run_sample(model, cell: Cell, sample) -> dict:
    gen = model.generate_ids(sample.prompt_ids, max_tokens=cell.task.max_new_tokens, cache=cell.spec,
                             params=SamplingParams())
    prediction = gen.text
    score = score_sample(cell.task.metric, cell.task.scored_text(prediction), sample.answers, sample.meta)
    s = gen.stats
    return {
        "id": sample.id, "cache": cell.spec, "task": cell.task.name, "synthetic": cell.task.synthetic,
        "length": cell.length or len(sample.prompt_ids),
        "prediction": prediction, "answers": sample.answers, "score": score,
        "prompt_tokens": s.prompt_tokens, "generation_tokens": s.generation_tokens,
        "prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "kv_bytes": s.kv_bytes,
        "meta": {k: v for k, v in sample.meta.items() if k != "all_classes"}, "time": time.time(),
    }


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    import sys

    import click

    return click.progressbar(length=total, label="kvrt eval", show_eta=True, show_pos=True, file=sys.stderr)
