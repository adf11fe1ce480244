"""`kvrt report RUN`: tables and plots from a run folder's predictions.

Scores are means × 100 per (cache spec, task, length); a task's score is over all its
samples, and a spec's overall score is the sample-weighted mean over tasks (as LOOM-Scope
reports). Beside the scores, per spec: KV bytes per token held on the device at the end of
generation (CaliDrop's host-memory tier apart) and decode tok/s (means over samples; timings
are as noisy as the machine was).

Writes results.json, results.csv, report.md and, with matplotlib, PNG plots: per spec a depth ×
length heatmap of Kamradt's needle sweep (`niah`, its exact depths) and one of the other needle
tasks (depths in five bins), score against budget per method, and score against KV bytes per
token (a line per method over its budgets, a point per other spec).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval import counting_stars
from kvrt.eval.files import json_file
from kvrt.eval.runner import LATER_SETTINGS, Settings, read_predictions, spec_slug

BUCKETS = [(0, 8_000, "0-8k"), (8_000, 16_000, "8-16k"), (16_000, 32_000, "16-32k"), (32_000, 64_000, "32-64k"),
           (64_000, 128_000, "64-128k"), (128_000, float("inf"), ">128k")]
DEPTH_BINS = 5


def load_settings(run: Path) -> dict:
    """A run folder's settings.json, with every field a report reads."""
    path = run / "settings.json"
    if not path.exists():
        raise KvrtError(f"{run} is not a kvrt eval folder (no settings.json)")
    settings = json_file(path, "settings file")
    missing = [f.name for f in fields(Settings) if f.name not in settings and f.name not in LATER_SETTINGS]
    if missing:
        raise KvrtError(f"{path}: not kvrt eval settings (missing {', '.join(missing)})")
    return {**LATER_SETTINGS, **settings}


def load_records(run: Path) -> tuple[dict, list[dict]]:
    """The settings and every record of a run folder; a damaged line (other than a torn last
    one, which the next `kvrt eval` cuts) is an error naming it."""
    settings = load_settings(run)
    records = []
    for path in sorted((run / "predictions").rglob("*.jsonl")):
        found = read_predictions(path)
        if found.damaged:
            first = min(found.damaged)
            raise KvrtError(f"{found.damaged[first]}; rerun the kvrt eval command to drop it and redo its sample")
        records += found.records.values()
    return settings, records


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def bucket(record: dict) -> str:
    """Synthetic samples by their exact length, LongBench ones by LOOM-Scope's length buckets."""
    if record.get("synthetic", True):
        return str(record["length"])
    return next(label for lo, hi, label in BUCKETS if lo <= record["prompt_tokens"] < hi)


def summarize(settings: dict, records: list[dict]) -> dict:
    caches = settings["caches"]
    by = defaultdict(list)
    for r in records:
        by[(r["cache"], r["task"], bucket(r))].append(r)
    cells = [{"cache": c, "task": t, "length": b, "n": len(rs), "score": 100 * mean(r["score"] for r in rs)}
             for (c, t, b), rs in sorted(by.items())]
    tasks = sorted({r["task"] for r in records}, key=lambda t: settings["tasks"].index(t)
                   if t in settings["tasks"] else 99)
    per_task = {c: {} for c in caches}
    overall, cost = {}, {}
    for c in caches:
        mine = [r for r in records if r["cache"] == c]
        for t in tasks:
            rs = [r for r in mine if r["task"] == t]
            if rs:
                per_task[c][t] = 100 * mean(r["score"] for r in rs)
        overall[c] = 100 * mean(r["score"] for r in mine)  # sample-weighted over tasks
        held = [max(r["prompt_tokens"] + r["generation_tokens"], 1) for r in mine]
        # absent in records written before kvrt recorded it; only CaliDrop keeps a host tier
        host = [r.get("kv_host_bytes", None if "calidrop" in c else 0) for r in mine]
        known = all(h is not None for h in host)
        cost[c] = {
            "kv_bytes_per_token": mean((r["kv_bytes"] - (h or 0)) / n for r, h, n in zip(mine, host, held)),
            "host_bytes_per_token": mean(h / n for h, n in zip(host, held)) if known else None,
            "decode_tps": mean(r["generation_tps"] for r in mine if r["generation_tokens"] > 1),
            "samples": len(mine),
        }
    return {"settings": settings, "tasks": tasks, "cells": cells, "per_task": per_task, "overall": overall,
            "cost": cost}


def markdown(summary: dict) -> str:
    caches, s = summary["settings"]["caches"], summary["settings"]
    head = "| task | " + " | ".join(f"`{c}`" for c in caches) + " |\n|---|" + "---|" * len(caches)
    lines = [f"# kvrt eval: {s['model']}", "",
             f"kvrt {s.get('kvrt_version', '?')}; greedy decoding; seed {s['seed']}; {s['limit']} samples per task "
             f"and length; lengths {s['lengths']} tokens.", "", "## Scores (mean × 100)", "", head]
    fmt = lambda v: "" if v is None or v != v else f"{v:.1f}"  # noqa: E731 - blank for missing cells
    for t in summary["tasks"]:
        lines.append(f"| {t} | " + " | ".join(fmt(summary["per_task"][c].get(t)) for c in caches) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{fmt(summary['overall'][c])}**" for c in caches) + " |")
    lines.append("| KV bytes / token | " + " | ".join(f"{summary['cost'][c]['kv_bytes_per_token']:,.0f}"
                                                       for c in caches) + " |")
    if any(summary["cost"][c].get("host_bytes_per_token") for c in caches):
        host = lambda v: "?" if v is None else f"{v:,.0f}"  # noqa: E731 - ? where the records predate the field
        lines.append("| + host bytes / token | " + " | ".join(host(summary["cost"][c].get("host_bytes_per_token"))
                                                            for c in caches) + " |")
    lines.append("| decode tok/s | " + " | ".join(fmt(summary["cost"][c]["decode_tps"]) for c in caches) + " |")
    lines += by_benchmark(summary, caches, fmt)
    lengths = sorted({cell["length"] for cell in summary["cells"]}, key=lambda b: (len(b), b))
    lines += ["", "## By length", "", "| task | length | " + " | ".join(f"`{c}`" for c in caches) + " |",
              "|---|---|" + "---|" * len(caches)]
    table = {(x["cache"], x["task"], x["length"]): x["score"] for x in summary["cells"]}
    for t in summary["tasks"]:
        for b in lengths:
            if any((c, t, b) in table for c in caches):
                lines.append(f"| {t} | {b} | " + " | ".join(fmt(table.get((c, t, b))) for c in caches) + " |")
    return "\n".join(lines) + "\n"


def by_benchmark(summary: dict, caches: list[str], fmt) -> list[str]:
    """A table of scores per benchmark (kvrt.eval.benchmarks; a task counts for the first that names it),
    each the sample-weighted mean of its tasks, when the run holds tasks of more than one."""
    from kvrt.eval.benchmarks import BENCHMARKS

    owner = {}
    for benchmark in BENCHMARKS.values():
        for task in benchmark.tasks:
            owner.setdefault(task, benchmark.name)
    groups = defaultdict(list)
    for cell in summary["cells"]:
        groups[owner.get(cell["task"], cell["task"])].append(cell)
    if len(groups) < 2:
        return []
    lines = ["", "## By benchmark", "", "| benchmark | " + " | ".join(f"`{c}`" for c in caches) + " |",
             "|---|" + "---|" * len(caches)]
    for name, cells in groups.items():
        scores = []
        for c in caches:
            mine = [x for x in cells if x["cache"] == c]
            n = sum(x["n"] for x in mine)
            scores.append(sum(x["score"] * x["n"] for x in mine) / n if n else None)
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in scores) + " |")
    return lines


def budget_of(spec: str) -> tuple[str, int] | None:
    """(the spec without its budget, the budget) for specs that set budget=N, else None."""
    from kvrt.cache.spec import CacheSpec, Part

    parsed = CacheSpec.parse(spec)
    options = dict(parsed.method.options)
    if "budget" not in options:
        return None
    budget = options.pop("budget")
    return "+".join(str(p) for p in (Part(parsed.method.name, options), *parsed.modifiers)), budget


def plots(summary: dict, records: list[dict], out: Path) -> list[str]:
    """PNG files written (none without matplotlib: the tables are the results)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for cache in summary["settings"]["caches"]:
        mine = [r for r in records if r["cache"] == cache and "depth" in r.get("meta", {})]
        grid = [r for r in mine if r["task"] == "niah"]  # Kamradt's sweep: its own exact depths
        binned = [r for r in mine if r["task"] != "niah"]  # the other needles, at random depths
        if grid:
            depths = sorted({r["meta"]["depth"] for r in grid})
            rows = [(f"{100 * d:.0f}%", lambda r, d=d: r["meta"]["depth"] == d) for d in depths]
            written.append(heatmap(plt, grid, rows, cache, out / f"niah_grid_{spec_slug(cache)}.png"))
        if binned:
            written.append(heatmap(plt, binned, depth_bins(), cache, out / f"niah_{spec_slug(cache)}.png"))
        stars = [star for r in records if r["cache"] == cache and r["task"] in counting_stars.ALL_TASKS
                 for star in counting_stars.star_records(r)]
        if stars:  # Counting-Stars' own figure: each star's points by its depth and the prompt's length
            written.append(heatmap(plt, stars, depth_bins(), cache, out / f"counting_stars_{spec_slug(cache)}.png",
                                   "star depth"))
    curves = defaultdict(list)
    for cache, score in summary["overall"].items():
        parsed = budget_of(cache)
        if parsed:
            curves[parsed[0]].append((parsed[1], score))
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for method, points in sorted(curves.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for cache, score in summary["overall"].items():
            if not budget_of(cache):
                ax.axhline(score, linestyle="--", linewidth=0.8, color="gray")
                ax.annotate(cache, (ax.get_xlim()[0], score), fontsize=7, color="gray")
        ax.set_xlabel("budget (tokens per layer and KV head)")
        ax.set_ylabel("overall score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "score_vs_budget.png", dpi=110)
        plt.close(fig)
        written.append("score_vs_budget.png")
    if len(summary["overall"]) > 1:
        written.append(plot_score_vs_bytes(plt, summary, out))
    return written


def depth_bins() -> list[tuple]:
    """Heatmap rows for depths anywhere in 0-1: DEPTH_BINS equal bins (the last one holds 1.0)."""
    return [(f"{100 * i // DEPTH_BINS}-{100 * (i + 1) // DEPTH_BINS}%",
             lambda r, i=i: min(int(r["meta"]["depth"] * DEPTH_BINS), DEPTH_BINS - 1) == i)
            for i in range(DEPTH_BINS)]


def heatmap(plt, records: list[dict], rows: list[tuple], title: str, path: Path, ylabel: str = "needle depth") -> str:
    """Score by depth (`rows`: a label and a test per row) and prompt length, 0-100, red to green."""
    lengths = sorted({r["length"] for r in records})
    grid = [[float("nan")] * len(lengths) for _ in rows]
    for i, (_, inside) in enumerate(rows):
        for j, length in enumerate(lengths):
            cell = [r["score"] for r in records if r["length"] == length and inside(r)]
            grid[i][j] = 100 * mean(cell) if cell else float("nan")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.4 + 0.3 * len(rows)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_score_vs_bytes(plt, summary: dict, out: Path) -> str:
    """Overall score against KV bytes per token held: a line per method over its budgets, a point
    per other spec (quantization, full)."""
    lines, points = defaultdict(list), []
    for cache, score in summary["overall"].items():
        x = summary["cost"][cache]["kv_bytes_per_token"]
        parsed = budget_of(cache)
        if parsed:
            lines[parsed[0]].append((x, score))
        else:
            points.append((cache, x, score))
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for method, xy in sorted(lines.items()):
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], "--" if "calidrop" in method else "-", marker="o",
                markersize=3, label=method)
    for cache, x, score in points:  # in the legend: close points' labels would overlap on the plot
        ax.scatter([x], [score], marker="s", s=16, label=cache)
    ax.set_xscale("log")
    unsplit = any(c["host_bytes_per_token"] is None for c in summary["cost"].values())
    ax.set_xlabel("KV bytes per token on the device (log" + ("; CaliDrop's host tier included in older records)"
                                                            if unsplit else ")"))
    ax.set_ylabel("overall score")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "score_vs_kv_bytes.png", dpi=110)
    plt.close(fig)
    return "score_vs_kv_bytes.png"


def write_report(run: Path) -> dict:
    """Write results.json, results.csv, report.md and the plots into the run folder."""
    settings, records = load_records(run)
    summary = summarize(settings, records)
    summary["plots"] = plots(summary, records, run)
    tmp = run / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(run / "results.json")
    with (run / "results.csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["cache", "task", "length", "n", "score"])
        writer.writeheader()
        writer.writerows(summary["cells"])
    (run / "results.csv.tmp").replace(run / "results.csv")
    text = markdown(summary) + "".join(f"\n![{p}]({p})\n" for p in summary["plots"])
    (run / "report.md.tmp").write_text(text)
    (run / "report.md.tmp").replace(run / "report.md")
    return summary
