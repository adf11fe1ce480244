"""Text for the benchmarks, made or found locally (no dataset hub): haystacks and natural passages."""

from __future__ import annotations

import importlib
import inspect
import random
import sys
from pathlib import Path

SENTENCES = [
    "The harbour town woke slowly, its fishing boats rocking against the grey stone quay.",
    "A baker on the corner pulled the first loaves from the oven and set them by the window.",
    "Children ran along the sea wall, counting the gulls that circled above the lighthouse.",
    "By noon the market square was full of voices bargaining over apples, nets and rope.",
    "An old clockmaker repaired a brass watch while rain tapped on the glass of his shop.",
    "The ferry sounded its horn twice before easing away from the pier into the mist.",
    "In the library, a student copied notes about tides, winds and the phases of the moon.",
    "Evening lamps were lit one by one along the narrow streets that climbed the hill.",
]

# stdlib modules whose docstrings are paragraphs of English prose
DOC_MODULES = ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "functools", "heapq",
               "json", "logging", "pathlib", "pickle", "re", "sqlite3", "statistics", "string", "subprocess",
               "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile", "difflib",
               "fractions", "inspect", "shutil", "socket", "tempfile", "tkinter", "turtle", "doctest", "pydoc"]


def haystack_ids(tokenizer, length: int, seed: int = 0) -> list[int]:
    """Exactly `length` token ids of shuffled plain sentences."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(" " + rng.choice(SENTENCES), add_special_tokens=False)
    return ids[:length]


def natural_passages(tokenizer, length: int, count: int) -> list[list[int]]:
    """`count` passages of exactly `length` tokens of natural English: Python's own LICENSE text and
    the docstrings of standard-library modules (present wherever CPython is installed)."""
    parts = []
    license_txt = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"
    if license_txt.exists():
        parts.append(license_txt.read_text())
    for name in DOC_MODULES:
        try:
            parts.append(inspect.getdoc(importlib.import_module(name)) or "")
        except ImportError:
            continue
    ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False)
    if len(ids) < length * count:
        raise SystemExit(f"only {len(ids)} tokens of local text; ask for fewer or shorter passages")
    return [ids[i * length : (i + 1) * length] for i in range(count)]
