"""BABILong qa1-qa5 (Kuratov et al. 2024, arXiv 2406.10149; github.com/booydar/babilong): the facts
of a bAbI story (Weston et al. 2015, arXiv 1502.05698) spread in order through a long background
text, then a question about them, asked with the benchmark's published prompt
(kvrt.eval.babilong_prompts).

BABILong draws its stories from the bAbI dataset and its background from PG-19 books. With
`--data DIR` holding bAbI (`tasks_1-20_v1-2/en-10k/qa1_single-supporting-fact_train.txt` and so on,
unzipped from the `tasks_1-20_v1-2.zip` that BABILong's repository ships), kvrt reads its stories as
BABILong's create_tasks.py does: each question with the facts of its story before it (earlier
questions left out), from en-10k's train files. Without it, kvrt tells bAbI-style stories itself,
with bAbI's people, places, objects and verbs and one question per story:

- qa1 (single supporting fact): people move about; where is one of them now?
- qa2 (two supporting facts): people move, pick up and drop objects; where is an object now?
- qa3 (three supporting facts): where was an object before the place it is in now?
- qa4 (two-argument relations): two places' compass relations; what lies in a direction of one?
- qa5 (three-argument relations): objects are given from one person to another; who gave,
  who received, what was given?

The background is the `--haystack` files or kvrt's sentences, the facts at sorted random depths.
Scored as BABILong scores: the reply's first sentence, lowercased, must name the answer and no
other of the task's labels (labels the question itself names do not count).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.eval.babilong_prompts import PROMPTS
from kvrt.eval.files import read_file, utf8
from kvrt.eval.haystack import sentence_stream
from kvrt.eval.sample import Sample
from kvrt.eval.synthetic import Task

PLACES = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
PEOPLE = ["Mary", "John", "Daniel", "Sandra"]
GIVERS = ["Bill", "Fred", "Jeff", "Mary"]
OBJECTS = ["apple", "football", "milk"]
MOVES = ["went to", "journeyed to", "travelled to", "moved to", "went back to"]
TAKES = ["picked up", "grabbed", "got", "took"]
DROPS = ["dropped", "discarded", "put down", "left"]
GIVES = ["gave", "handed", "passed"]
LABELS = {"qa1": PLACES, "qa2": PLACES, "qa3": PLACES, "qa4": PLACES, "qa5": GIVERS + OBJECTS}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


class World:
    """Where people and objects are, as a story's facts tell it."""

    def __init__(self, rng: random.Random, people: list[str]):
        self.rng, self.people = rng, people
        self.at: dict[str, str] = {}  # person -> place
        self.holder: dict[str, str | None] = {o: None for o in OBJECTS}
        self.lying: dict[str, str] = {}  # object -> place it was dropped in
        self.trail: dict[str, list[str]] = {o: [] for o in OBJECTS}  # places each object has been, in order
        self.facts: list[str] = []

    def place_of(self, thing: str) -> str | None:
        holder = self.holder[thing]
        return self.at.get(holder) if holder else self.lying.get(thing)

    def note(self, thing: str) -> None:
        place = self.place_of(thing)
        if place and (not self.trail[thing] or self.trail[thing][-1] != place):
            self.trail[thing].append(place)

    def move(self, person: str) -> None:
        place = self.rng.choice([p for p in PLACES if p != self.at.get(person)])
        self.at[person] = place
        self.facts.append(f"{person} {self.rng.choice(MOVES)} the {place}.")
        for thing, holder in self.holder.items():
            if holder == person:
                self.note(thing)

    def take(self, person: str) -> bool:
        free = [o for o, h in self.holder.items() if h is None and (o not in self.lying or
                                                                    self.lying[o] == self.at.get(person))]
        if person not in self.at or not free:
            return False
        thing = self.rng.choice(free)
        self.holder[thing] = person
        self.lying.pop(thing, None)
        self.facts.append(f"{person} {self.rng.choice(TAKES)} the {thing} there.")
        self.note(thing)
        return True

    def drop(self, person: str) -> bool:
        held = [o for o, h in self.holder.items() if h == person]
        if not held:
            return False
        thing = self.rng.choice(held)
        self.holder[thing], self.lying[thing] = None, self.at[person]
        self.facts.append(f"{person} {self.rng.choice(DROPS)} the {thing}.")
        return True

    def step(self, carrying: bool) -> None:
        """One random event: mostly moves; with `carrying`, takes and drops too."""
        person = self.rng.choice(self.people)
        roll = self.rng.random()
        if carrying and roll < 0.3 and self.take(person):
            return
        if carrying and roll < 0.4 and self.drop(person):
            return
        self.move(person)


def story(task: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(facts, question, answer) of one bAbI-style story for a task."""
    if task == "qa1":
        world = World(rng, PEOPLE)
        for _ in range(rng.randint(6, 10)):
            world.step(carrying=False)
        person = rng.choice(sorted(world.at))
        return world.facts, f"Where is {person}?", world.at[person]
    if task in ("qa2", "qa3"):
        while True:  # until the story can answer its question
            world = World(rng, PEOPLE)
            for _ in range(rng.randint(10, 16)):
                world.step(carrying=True)
            if task == "qa2":
                known = [o for o in OBJECTS if world.trail[o] and world.place_of(o)]
                if known:
                    thing = rng.choice(known)
                    return world.facts, f"Where is the {thing}?", world.place_of(thing)
            else:  # a first visit to where it is now, so that "before the kitchen" names one place
                trails = world.trail
                moved = [o for o in OBJECTS if len(trails[o]) >= 2 and trails[o].count(trails[o][-1]) == 1]
                if moved:
                    thing = rng.choice(moved)
                    before, last = world.trail[thing][-2:]
                    return world.facts, f"Where was the {thing} before the {last}?", before
    if task == "qa4":
        a, b, c = rng.sample(PLACES, 3)
        one = rng.choice(list(OPPOSITE))
        two = rng.choice([d for d in OPPOSITE if d != OPPOSITE[one]])  # else the a would be `one` of the c too
        facts = [f"The {a} is {one} of the {b}.", f"The {c} is {two} of the {a}."]
        if rng.random() < 0.5:  # "What is DIR of X?" or "What is X DIR of?"
            return facts, f"What is {one} of the {b}?", a
        return facts, f"What is the {a} {one} of?", b
    return gifts(rng)


def gifts(rng: random.Random) -> tuple[list[str], str, str]:
    """qa5: people take objects and give them to each other; a question about the last gift."""
    facts, holder, last = [], {}, None
    while last is None or len(facts) < 5:
        person = rng.choice(GIVERS)
        mine = [o for o, h in holder.items() if h == person]
        if mine and rng.random() < 0.6:
            thing, other = rng.choice(mine), rng.choice([g for g in GIVERS if g != person])
            holder[thing] = other
            facts.append(f"{person} {rng.choice(GIVES)} the {thing} to {other}.")
            last = (person, thing, other)
        elif [o for o in OBJECTS if o not in holder]:
            thing = rng.choice([o for o in OBJECTS if o not in holder])
            holder[thing] = person
            facts.append(f"{person} {rng.choice(TAKES)} the {thing} there.")
        else:
            facts.append(f"{person} {rng.choice(MOVES)} the {rng.choice(PLACES)}.")
    giver, thing, taker = last
    return facts, *rng.choice([(f"Who gave the {thing}?", giver), (f"Who received the {thing}?", taker),
                               (f"What did {giver} give to {taker}?", thing),
                               (f"Who did {giver} give the {thing} to?", taker)])


BABI_FILES = {"qa1": "qa1_single-supporting-fact", "qa2": "qa2_two-supporting-facts",
              "qa3": "qa3_three-supporting-facts", "qa4": "qa4_two-arg-relations", "qa5": "qa5_three-arg-relations"}


def read_babi(path: Path) -> list[tuple[list[str], str, str]]:
    """bAbI's stories as (facts, question, answer): every question with the facts of its story before it.
    A line is "N sentence" or "N question<TAB>answer<TAB>supporting fact numbers"; N = 1 starts a story."""
    stories, facts = [], []
    for number, line in enumerate(utf8(read_file(path, "bAbI file"), path).splitlines(), start=1):
        index, _, text = line.partition(" ")
        if not index.isdigit() or not text.strip():
            raise KvrtError(f"{path}:{number}: not a bAbI line (a number, a space, then a sentence)")
        if index == "1":
            facts = []
        if "\t" in text:
            question, answer = text.split("\t")[:2]
            stories.append((list(facts), question.strip(), answer.strip()))
        else:
            facts.append(text.strip())
    if not stories:
        raise KvrtError(f"{path} holds no bAbI question")
    return stories


@functools.lru_cache(maxsize=8)
def babi_stories(data_dir: str, task: str) -> list[tuple[list[str], str, str]]:
    """A task's stories from bAbI's en-10k train file below `data_dir` (BABILong's source)."""
    name = f"{BABI_FILES[task]}_train.txt"
    found = sorted(Path(data_dir).rglob(name), key=lambda p: "en-10k" not in p.parts)
    if not found:
        raise KvrtError(f"babilong_{task} reads bAbI under --data: put tasks_1-20_v1-2/en-10k/{name} there "
                        "(unzip tasks_1-20_v1-2.zip from github.com/booydar/babilong, folder data)")
    return read_babi(found[0])


class BabiLong(Task):
    metric, max_new_tokens = "babilong", 20

    def __init__(self, task: str):
        self.task, self.name = task, f"babilong_{task}"

    def sample(self, builder, rng, seed, haystack):
        return self.sample_from(builder, rng, seed, haystack, None, 0.0)

    def sample_from(self, builder, rng, seed, haystack, data_dir, position):
        if data_dir is None:
            facts, question, answer = story(self.task, rng)
        else:
            stories = babi_stories(str(data_dir), self.task)
            facts, question, answer = stories[rng.randrange(len(stories))]
        prompt = PROMPTS[self.task]
        intro = f"{prompt['instruction']}\n\n{prompt['examples']}\n\n{prompt['post_prompt']}\n\n<context>\n"
        depths = sorted(rng.random() for _ in facts)
        ids, _ = builder.build(intro, facts, depths, f"</context>\n\nQuestion: {question}", "",
                               sentence_stream(seed, haystack))
        return Sample("", ids, [answer], {"question": question, "task": self.task})


def babilong_score(prediction: str, gold: str, sample: dict | None = None) -> float:
    """BABILong's rule: the first sentence of the reply names the answer and no other label."""
    meta = sample or {}
    labels = {label.lower() for label in LABELS[meta.get("task", "qa1")]}
    reply = prediction.lower().split(".")[0].split("<context>")[0].split("<example>")[0]
    asked = {label for label in labels if label in meta.get("question", "").lower()}
    named = {label for label in labels if label in reply} - asked
    return float(named == {gold.lower()})


TASKS = {t.name: t for t in (BabiLong(f"qa{i}") for i in range(1, 6))}
