"""Synthetic long-context tasks, generated with the evaluated model's tokenizer at an exact
prompt length, deterministic by seed: passkey; RULER's NIAH variants, variable tracking,
common- and frequent-words extraction (task definitions after NVIDIA/RULER; the prose here
is kvrt's own).

A prompt is built from token pieces: frame prefix (chat template or BOS) + intro + haystack
with the needles at sentence boundaries + question + frame suffix + answer prefix. The haystack
is cut to make the total exactly `length` tokens, so the answer is always in the text.
"""

from __future__ import annotations

import itertools
import random
import string
import uuid
from kvrt.errors import KvrtError
from kvrt.eval.haystack import sentence_stream
from kvrt.eval.sample import Frame, Sample

NOISE = ["The river keeps running to the sea.", "The hills stay where they have always been.",
         "Here we go again.", "Round and round the seasons turn."]
ADJECTIVES = ["amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "narrow", "odd", "pale", "quick", "rusty", "silent", "tidy", "vivid", "wild"]
NOUNS = ["anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quarry", "ribbon", "saddle", "tunnel"]
COMMON_POOL = ["apple", "bridge", "cloud", "desk", "forest", "guitar", "hammer", "ink", "jungle", "kite",
               "lemon", "mirror", "notebook", "ocean", "pillow", "rocket", "spoon", "tiger", "violin", "window"]


class Builder:
    """One prompt: fixed pieces plus haystack sentences cut to hit the length exactly."""

    def __init__(self, tokenizer, frame: Frame, length: int):
        self.tok, self.frame, self.length = tokenizer, frame, length

    def ids(self, text: str, lead: str = " ") -> list[int]:
        return self.tok.encode(lead + text, add_special_tokens=False)

    def head(self, intro: str) -> list[int]:
        return self.frame.prefix + self.ids(intro, lead="")

    def tail(self, question: str, answer_prefix: str) -> list[int]:
        """The question, the frame's end and the answer prefix the model completes."""
        lead = "" if self.frame.suffix else " "  # a chat frame ends the turn; plain text runs on
        return self.ids(question, lead="\n") + self.frame.suffix + self.ids(answer_prefix, lead=lead)

    def build(self, intro: str, needles: list[str], depths: list[float], question: str, answer_prefix: str,
              sentences) -> tuple[list[int], list[int]]:
        """Prompt ids with each needle at the sentence boundary nearest its depth (0..1); also
        the haystack token offsets where the needles went."""
        head, tail = self.head(intro), self.tail(question, answer_prefix)
        needle_ids = [self.ids(n) for n in needles]
        room = self.length - len(head) - len(tail) - sum(map(len, needle_ids))
        if room < 0:
            raise KvrtError(f"{self.length} tokens cannot hold this task's fixed text ({self.length - room} tokens)")
        pieces, used = [], 0
        while used < room:
            piece = self.ids(next(sentences))[: room - used]
            pieces.append(piece)
            used += len(piece)
        bounds = [0]
        for piece in pieces:
            bounds.append(bounds[-1] + len(piece))
        order = sorted(range(len(needles)), key=lambda i: depths[i])
        at = {}
        for i in order:  # each needle at the nearest boundary, never before an earlier-placed one
            target = depths[i] * room
            b = min(range(len(bounds)), key=lambda j: abs(bounds[j] - target))
            at.setdefault(b, []).append(i)
        body, offsets = [], [0] * len(needles)
        for j, piece in enumerate(pieces + [[]]):
            for i in at.get(j, []):
                offsets[i] = len(body)
                body += needle_ids[i]
            body += piece
        return head + body + tail, offsets


def magic_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def magic_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


class Task:
    name = "?"
    metric = "string_match_all"
    max_new_tokens = 128
    needs_data = False  # True: it reads the benchmark's files under --data and cannot run without them

    def sample(self, builder: Builder, rng: random.Random, seed: int, haystack: list[str] | None) -> Sample:
        raise NotImplementedError

    def sample_from(self, builder: Builder, rng: random.Random, seed: int, haystack: list[str] | None,
                    data_dir: str | None, position: float) -> Sample:
        """A sample, for the tasks that use them, from the benchmark's own files under `data_dir`, or at
        `position` (its index over the cell's last, 0 to 1: a sweep's place)."""
        return self.sample(builder, rng, seed, haystack)


class Passkey(Task):
    name, max_new_tokens = "passkey", 16

    def sample(self, builder, rng, seed, haystack):
        key = str(rng.randint(10000, 99999))
        depth = rng.random()
        ids, _ = builder.build(
            "A pass key is hidden somewhere in the long text below. Find it and remember it.",
            [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth],
            "What is the pass key?", "The pass key is", sentence_stream(seed, haystack))
        return Sample("", ids, [key], {"depth": depth})


class NIAH(Task):
    """Needles "One of the special magic {kind} for {key} is: {value}." in a haystack of noise, essay
    sentences, or other needles (RULER's multikey_2/3: every sentence a distractor with its own key)."""

    max_new_tokens = 128

    def __init__(self, name: str, haystack: str = "essay", kind: str = "numbers", keys: int = 1, values: int = 1,
                 queries: int = 1, metric: str = "string_match_all", key_kind: str = "words"):
        self.name, self.haystack, self.kind, self.key_kind = name, haystack, kind, key_kind
        self.keys, self.values, self.queries, self.metric = keys, values, queries, metric

    def key(self, rng: random.Random) -> str:
        return magic_value(rng, "uuids") if self.key_kind == "uuids" else magic_key(rng)

    def distractors(self, rng: random.Random, taken: list[str]):
        """Endless needles of other keys: the haystack of RULER's multikey_2 and multikey_3."""
        while True:
            key = self.key(rng)
            if key not in taken:
                yield needle(self.kind, key, magic_value(rng, self.kind))

    def sample(self, builder, rng, seed, haystack):
        keys = []
        while len(keys) < max(self.keys, self.queries):
            key = self.key(rng)
            keys += [key] if key not in keys else []
        # the first key holds `values` values, the others (distractors or further queries) one each
        pairs = [(keys[0], magic_value(rng, self.kind)) for _ in range(self.values)]
        pairs += [(k, magic_value(rng, self.kind)) for k in keys[1:]]
        rng.shuffle(pairs)
        asked = keys[: self.queries]
        answers = [v for k, v in pairs if k in asked]
        depths = [rng.random() for _ in pairs]
        sentences = {"essay": lambda: sentence_stream(seed, haystack), "noise": lambda: iter(NOISE * 10**6),
                     "needles": lambda: self.distractors(random.Random(seed), keys)}[self.haystack]()
        asked_text = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
        many = len(answers) > 1
        noun = self.kind if many else self.kind[:-1]  # "numbers" -> "number"
        ids, _ = builder.build(
            "Some special magic " + self.kind + " are hidden in the long text below. Memorize them; "
            "you will be asked about them afterwards.",
            [needle(self.kind, k, v) for k, v in pairs], depths,
            f"What {'are all' if many else 'is'} the special magic {noun} for {asked_text} mentioned in the text above?",
            f"The special magic {noun} for {asked_text} mentioned in the text {'are' if many else 'is'}",
            sentences)
        return Sample("", ids, answers, {"depth": depths[0] if len(depths) == 1 else sum(depths) / len(depths)})


class VariableTracking(Task):
    """One chain `VAR A = 12345`, `VAR B = VAR A`, ... (`hops` links) spread through noise."""

    name, max_new_tokens = "vt", 30

    def __init__(self, hops: int = 4):
        self.hops = hops

    def sample(self, builder, rng, seed, haystack):
        names = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            names += [name] if name not in names else []
        value = str(rng.randint(10000, 99999))
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        depths = sorted(rng.random() for _ in lines)
        ids, _ = builder.build(
            "Keep track of the variable assignments in the text below.", lines, depths,
            f"Which variables are assigned the value {value}, directly or through other variables?",
            f"The variables assigned the value {value} are:", iter(NOISE * 10**6))
        return Sample("", ids, names)


class WordCounting(Task):
    """A numbered list of words; answer the most frequent. cwe: `top` common words repeated
    among rare ones (twice each); fwe: coded words with counts ∝ 1/rank² (Zipf, alpha 2),
    answer the top 3. The words that decide the answer all sit in the list's first block; rare
    words fill the rest, and the cut at the exact length only shortens that tail."""

    def __init__(self, name: str, zipf: bool, top: int, max_new_tokens: int):
        self.name, self.zipf, self.top, self.max_new_tokens = name, zipf, top, max_new_tokens

    def sample(self, builder, rng, seed, haystack):
        head = builder.head("Below is a numbered list of words. Count how often each appears.")
        tail = builder.tail(f"Which {self.top} words appear most often in the list above? Answer with the words only.",
                            f"The {self.top} most frequent words are:")
        room = builder.length - len(head) - len(tail)
        capacity = room // len(builder.ids("100. abcdef"))  # entries that fit, about
        first, answers = self.first_block(rng, capacity)
        rng.shuffle(first)
        body, n = [], 0
        for word in itertools.chain(first, self.rare_stream(rng)):
            n += 1
            body += builder.ids(f"{n}. {word}")
            if len(body) >= room:
                break
        if n <= len(first):
            raise KvrtError(f"{self.name}: {builder.length} tokens cannot hold the list's deciding words")
        return Sample("", head + body[:room] + tail, answers)

    def first_block(self, rng, capacity: int) -> tuple[list[str], list[str]]:
        if self.zipf:
            vocab = list(dict.fromkeys(coded_word(rng, 5) for _ in range(64)))
            top = max(capacity // 4, 36)  # rank k appears top/k² times: ranks 1-3 clearly ahead
            counts = {w: top // (k * k) for k, w in enumerate(vocab, start=1) if top // (k * k) >= 2}
            return [w for w, c in counts.items() for _ in range(c)], vocab[: self.top]
        common = rng.sample(COMMON_POOL, self.top)
        reps = min(max(capacity // 25, 4), 30)
        return [w for w in common for _ in range(reps)] + [w for w in self.rare(rng, self.top)], common

    def rare(self, rng, n: int) -> list[str]:
        """n fresh rare words, each twice, shuffled."""
        words = [coded_word(rng, 6) for _ in range(n)] * 2
        rng.shuffle(words)
        return words

    def rare_stream(self, rng):
        while True:
            yield from self.rare(rng, 8)


class NeedleGrid(Task):
    """Kamradt's needle in a haystack (github.com/gkamradt/LLMTest_NeedleInAHaystack): one fixed
    needle at a depth of the haystack, one question, swept over lengths and depths and drawn as a
    heatmap. Sample i of n sits at depth i/(n-1) (linear, 0% to 100%), at the sentence boundary
    nearest it. The original asks GPT-4 to grade the reply 1-10; no judge model runs offline, so
    kvrt scores the share of the needle's answer words the reply contains (`needle_recall`)."""

    name, metric, max_new_tokens = "niah", "needle_recall", 64
    NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    QUESTION = "What is the best thing to do in San Francisco?"
    ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"

    def sample_from(self, builder, rng, seed, haystack, data_dir, position):
        """The needle at depth `position` of the sweep."""
        ids, _ = builder.build("", [self.NEEDLE], [position],
                               f"{self.QUESTION} Don't give information outside the document or repeat your findings.",
                               "", sentence_stream(seed, haystack))
        return Sample("", ids, [self.ANSWER], {"depth": position})


def coded_word(rng: random.Random, letters: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(letters))


TASKS: dict[str, Task] = {t.name: t for t in [
    Passkey(),
    NIAH("niah_single_1", haystack="noise"),
    NIAH("niah_single_2", haystack="essay"),
    NIAH("niah_single_3", haystack="essay", kind="uuids"),
    NIAH("niah_multikey", keys=4),  # RULER's niah_multikey_1
    NIAH("niah_multikey_2", haystack="needles"),
    NIAH("niah_multikey_3", haystack="needles", kind="uuids", key_kind="uuids"),
    NIAH("niah_multivalue", values=4),
    NIAH("niah_multiquery", keys=4, queries=4),
    VariableTracking(),
    WordCounting("cwe", zipf=False, top=10, max_new_tokens=120),
    WordCounting("fwe", zipf=True, top=3, max_new_tokens=50),
    NeedleGrid(),
]}


def make_sample(task: Task, tokenizer, length: int, index: int, seed: int, chat: bool,
                haystack: list[str] | None = None, count: int = 1, data_dir: str | None = None) -> Sample:
    """Sample `index` of `count` of a task at `length` tokens: the same ids for the same (seed, task,
    length, index), and for the needle grid the same count (`data_dir`: see Task.sample_from)."""
    rng = random.Random(f"{seed}:{task.name}:{length}:{index}")
    builder = Builder(tokenizer, Frame(tokenizer, chat), length)
    sample = task.sample_from(builder, rng, rng.randrange(2**31), haystack, data_dir, index / max(count - 1, 1))
    sample.id = f"{task.name}-{length}-{index}"
    return sample
