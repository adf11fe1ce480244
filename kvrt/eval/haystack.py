"""Haystack text for the synthetic tasks: sentences written for kvrt, varied and natural-reading,
deterministic by seed; or the sentences of text files the user gives (`--haystack PATH`).

Lengths are counted in the evaluated model's tokens: `filler_ids` encodes sentences one at a
time (each after a space, as it would read mid-text) and cuts the last one, so a prompt is
built from token pieces to an exact length.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterator

from kvrt.errors import KvrtError
from kvrt.eval.files import read_file, utf8

PEOPLE = ["the baker", "my neighbour", "a retired sailor", "the librarian", "our cousin", "the old farmer",
          "a young painter", "the night nurse", "the ferry captain", "a travelling musician", "the beekeeper",
          "the mayor's clerk", "a quiet student", "the village doctor", "the orchard keeper"]
VERBS = ["repaired", "painted", "carried", "described", "sold", "borrowed", "measured", "photographed",
         "cleaned", "planted", "forgot", "discovered", "sketched", "wrapped", "polished"]
THINGS = ["a wooden chair", "the garden gate", "an old map of the coast", "a basket of pears", "the blue bicycle",
          "a box of letters", "the copper kettle", "a field of barley", "the broken clock", "a pair of boots",
          "the kitchen window", "a stack of records", "the red umbrella", "a jar of honey", "the stone bridge"]
PLACES = ["near the harbour", "behind the chapel", "at the edge of town", "by the river", "in the market square",
          "under the elm trees", "on the hill road", "beside the railway", "in the walled garden", "at the mill"]
TIMES = ["before breakfast", "on a windy afternoon", "late in the autumn", "after the rain", "one Sunday morning",
         "during the long winter", "at dusk", "in early spring", "the day the fair opened", "last summer"]
REMARKS = ["Nobody expected it to take so long.", "It was the talk of the street for a week.",
           "The weather, as usual, had other plans.", "Most people walked past without noticing.",
           "Some said it had happened once before.", "The dogs barked at everything that day.",
           "It smelled of cut grass and woodsmoke.", "A few children stopped to watch.",
           "Afterwards there was tea and a long argument.", "The light was soft and the air was still."]


def kvrt_sentence(rng: random.Random) -> str:
    """One sentence from a handful of shapes and word lists, so the text varies like prose."""
    who, did, what = rng.choice(PEOPLE), rng.choice(VERBS), rng.choice(THINGS)
    where, when = rng.choice(PLACES), rng.choice(TIMES)
    shape = rng.randrange(5)
    if shape == 0:
        return f"{when.capitalize()}, {who} {did} {what} {where}."
    if shape == 1:
        return f"{who.capitalize()} {did} {what} {where} {when}."
    if shape == 2:
        return f"It was {who} who {did} {what}, {when}, {where}."
    if shape == 3:
        return f"{who.capitalize()} once {did} {what}; {rng.choice(REMARKS).lower()}"
    return rng.choice(REMARKS)


def sentence_stream(seed: int, files: list[str] | None = None) -> Iterator[str]:
    """Endless sentences: kvrt's own, or the given files' sentences from a seeded start, cycling."""
    rng = random.Random(seed)
    if not files:
        while True:
            yield kvrt_sentence(rng)
    sentences = []
    for name in files:
        text = utf8(read_file(Path(name), "haystack file"), Path(name))
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if not sentences:
        raise KvrtError(f"the haystack files hold no text: {', '.join(files)}")
    start = rng.randrange(len(sentences))
    while True:
        yield from sentences[start:]
        start = 0


def filler_ids(tokenizer, n_tokens: int, sentences: Iterator[str]) -> list[int]:
    """Exactly n_tokens ids of filler, whole sentences and then a cut one, each read after a space."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(" " + next(sentences), add_special_tokens=False)
    return ids[:n_tokens]
