"""Plot `bench/fidelity.py --json` results: mean ΔNLL and KL(full ‖ cache) against device KV bytes.

One line per method family (each eviction method with and without CaliDrop, over its budgets and
ratios; each quantization spec alone), one figure per model. Several JSON files of one model (a
sweep split over processes) merge; the full cache is the dashed line at 0. Also prints, for every
`BASE+calidrop` spec, BASE's and its mean ΔNLL and KL, the share recovered, and how many passages
came out worse than BASE.

    python bench/plot_fidelity.py bench/fidelity/default-*.json --out bench/fidelity/default.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def family(spec: str) -> str:
    """The spec without its size options: `snapkv:budget=128+calidrop` -> `snapkv+calidrop`."""
    parts = []
    for part in spec.split("+"):
        name, _, options = part.partition(":")
        kept = [o for o in options.split(",") if o and not o.startswith(("budget=", "ratio="))]
        parts.append(name + (":" + ",".join(kept) if kept else ""))
    return "+".join(parts)


def load(paths: list[str]) -> tuple[str, dict]:
    model, specs = None, {}
    for path in paths:
        data = json.loads(open(path).read())
        if model not in (None, data["model"]):
            raise SystemExit(f"{path} is for model {data['model']}, not {model}")
        model = data["model"]
        specs.update(data["specs"])
    return model, specs


def calidrop_table(specs: dict) -> None:
    print("| cache | ΔNLL base → +CaliDrop (recovered) | KL base → +CaliDrop (recovered) | passages worse in KL |"
          "\n|---|---|---|---|")
    for spec, r in specs.items():
        base = "+".join(p for p in spec.split("+") if not p.startswith("calidrop"))
        if base == spec or base not in specs:
            continue
        cells = []
        for key in ("delta_nll", "kl"):
            b, c = statistics.mean(specs[base][key]), statistics.mean(r[key])
            share = f" ({100 * (1 - c / b):+.0f}%)" if b > 0 else ""
            cells.append(f"{b:+.4f} → {c:+.4f}{share}")
        worse = sum(c > b for b, c in zip(specs[base]["kl"], r["kl"]))
        print(f"| {spec} | {cells[0]} | {cells[1]} | {worse} of {len(r['kl'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, specs = load(args.json)
    curves = defaultdict(list)
    for spec, r in specs.items():
        if spec != "full":
            curves[family(spec)].append((r["kv_bytes"] / 2**20, statistics.mean(r["delta_nll"]),
                                         statistics.mean(r["kl"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict[str, str] = {}
    for ax, column, label in ((axes[0], 1, "ΔNLL (nats/token)"), (axes[1], 2, "KL(full ‖ cache) (nats/token)")):
        for name, points in sorted(curves.items()):
            points.sort()
            color = colors.setdefault(name.split("+calidrop")[0].split(":")[0] + (name if "bits" in name else ""),
                                      f"C{len(colors) % 10}")  # a method's lines share a colour
            style, marker = ("--" if "calidrop" in name else "-"), ("s" if "bits" in name else "o")
            ax.plot([p[0] for p in points], [p[column] for p in points], style, color=color, marker=marker,
                    markersize=3 if marker == "o" else 5, label=name)
        ax.axhline(0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        xs = [p[0] for points in curves.values() for p in points]
        ax.set_xticks([t for t in (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if min(xs) / 2 < t < max(xs) * 2])
        ax.set_xlim(min(xs) / 1.15, max(xs) * 1.15)
        ax.set_xlabel("KV MiB on the device after the prompt (log)")
        ax.set_ylabel(label)
    full = specs.get("full", {}).get("kv_bytes")
    title = f"{model}: step-by-step fidelity" + (f" (full cache {full / 2**20:.1f} MiB)" if full else "")
    fig.suptitle(title + "; dashed: +CaliDrop, whose evicted tier sits in host memory", fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}\n")
    calidrop_table(specs)


if __name__ == "__main__":
    main()
