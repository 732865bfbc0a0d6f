"""A seeded, offline RULER-style long-context suite: prompts of a given token length, their
answers, an exact-match scorer and confidence intervals.

Task formats follow RULER (Hsieh et al. 2024, NVIDIA/RULER ``synthetic.yaml``): needle in a
haystack with one key (``niah_single``: noise haystack), several keys (``niah_multikey``: four
needles, one asked for, essay haystack) and several values (``niah_multivalue``), variable
tracking (``vt``: a chain of ``VAR X = Y`` hops plus a distractor chain), common word extraction
(``cwe``: a numbered word list, the most repeated words asked for) and frequent word extraction
(``fwe``: Zipf-distributed coded words). The essay haystack and the word vocabulary come from
Python's own pydoc topics (shipped with CPython), so nothing is downloaded.

Scoring is RULER's ``string_match_all``: the fraction of reference strings that occur in the
output (case-insensitive); for the single-answer tasks that is exact match, 0 or 1.
``Sample.chance`` is the score of an answer-shaped guess: a random 7-digit number (0), one of
the needle numbers in the prompt (multikey), random variable names / words from the prompt.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
Count = Callable[[str], int]  # text -> its number of tokens


@dataclass
class Sample:
    task: str
    length: int  # the target token count; the prompt has at most this many tokens
    index: int
    prompt: str  # context + question + answer prefix: the model continues it
    answers: list[str]
    chance: float
    max_new_tokens: int
    depth: float | None = None  # where the (first) needle sits, 0..1 of the haystack
    meta: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def _essay() -> list[str]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.strip()) > 20]


@lru_cache(maxsize=1)
def vocabulary() -> list[str]:
    """Distinct lowercase words of 4-10 letters from the essay text, sorted (seed-stable)."""
    return sorted({w for s in _essay() for w in re.findall(r"\b[a-z]{4,10}\b", s)})


def _fit(build: Callable[[int], str], count: Count, length: int, hi: int) -> str:
    """The longest ``build(n)``, n in [0, hi], with at most ``length`` tokens (binary search)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid - 1)
    return build(lo)


def _haystack(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "noise":
        return [NOISE] * n
    sents = _essay()
    start = rng.randrange(len(sents))
    return [sents[(start + i) % len(sents)] for i in range(n)]


def _insert(hay: list[str], needles: list[str], depths: list[float]) -> str:
    out = list(hay)
    for nd, d in sorted(zip(needles, depths), key=lambda x: -x[1]):  # back to front: indices stay valid
        out.insert(round(d * len(hay)), nd)
    return " ".join(out)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _key(rng: random.Random) -> str:
    v = vocabulary()
    return f"{rng.choice(v)}-{rng.choice(v)}"


NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.\n")


def _niah(rng, count, length, kind, n_keys, n_values, depth, index):
    keys = [_key(rng) for _ in range(n_keys)]
    values = [[_number(rng) for _ in range(n_values)] for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    depths = [depth] + [rng.random() for _ in needles[1:]]  # the asked needle (first) at ``depth``
    q = keys[0]
    if n_values > 1:
        tail = (f"\nWhat are all the special magic numbers for {q} mentioned in the provided text? "
                f"The special magic numbers for {q} mentioned in the provided text are")
    else:
        tail = (f"\nWhat is the special magic number for {q} mentioned in the provided text? "
                f"The special magic number for {q} mentioned in the provided text is")
    hay = _haystack(kind, rng, length // 4)  # a unit has >= 4 tokens: enough to fill
    prompt = _fit(lambda n: NIAH_HEAD + _insert(hay[:n], needles, depths) + tail, count, length, len(hay))
    chance = 1 / n_keys if n_keys > 1 else 0.0
    return dict(prompt=prompt, answers=values[0], chance=chance, max_new_tokens=10 * n_values, depth=depth)


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _vt(rng, count, length, depth, index, hops=4, chains=2):
    names = []
    while len(names) < chains * (hops + 1):
        v = _var(rng)
        names += [v] if v not in names else []
    values = [str(rng.randrange(10_000, 100_000)) for _ in range(chains)]
    lines, depths = [], []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        lines += [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
        start = depth if c == 0 else rng.random() * 0.5
        depths += [start + (1 - start) * i / (hops + 2) for i in range(hops + 1)]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. Answer: According "
            f"to the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned the value "
            f"{values[0]}, they are:")
    hay = _haystack("noise", rng, length // 4)
    prompt = _fit(lambda n: head + _insert(hay[:n], lines, depths) + tail, count, length, len(hay))
    return dict(prompt=prompt, answers=names[:hops + 1], chance=1 / chains, max_new_tokens=4 * (hops + 1), depth=depth)


def _cwe(rng, count, length, depth, index, common=5, reps=(20, 2)):
    words = rng.sample(vocabulary(), min(len(vocabulary()), common + length // 6))
    top, rest = words[:common], words[common:]

    def build(n):  # n rare words, each ``reps[1]`` times; the common ones ``reps[0]`` times
        items = top * reps[0] + rest[:n] * reps[1]
        random.Random(index * 7919 + n).shuffle(items)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
                f"that appear most often.\n{body}\nQuestion: What are the {common} most common words in the above list? "
                f"Answer: The top {common} words that appear most often in the list are:")
    prompt = _fit(build, count, length, len(rest))
    n_words = len(set(re.findall(r"\d+\. (\w+)", prompt)))
    return dict(prompt=prompt, answers=top, chance=common / max(n_words, common), max_new_tokens=4 * common, depth=None)


def _fwe(rng, count, length, depth, index, alpha=2.0, top=3, vocab=200):
    coded = []
    while len(coded) < vocab:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        coded += [w] if w not in coded else []
    weights = [1 / (r + 1) ** alpha for r in range(vocab)]
    stream = rng.choices(range(vocab), weights=weights, k=length)

    def build(n):
        return ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
                "appeared coded words. " + " ".join(coded[i] for i in stream[:n]) + " .... \nQuestion: Do not provide any "
                "explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above "
                "coded text? Answer: According to the coded text above, the three most frequently appeared words are:")
    prompt = _fit(build, count, length, len(stream))
    n = len(re.findall(r"\b[a-z]{6}\b", prompt.split("coded words. ", 1)[1].split(" ....")[0]))
    freq = {}
    for i in stream[:n]:
        freq[i] = freq.get(i, 0) + 1
    ranked = sorted(freq, key=lambda i: (-freq[i], i))[:top]
    return dict(prompt=prompt, answers=[coded[i] for i in ranked], chance=top / max(len(freq), top), max_new_tokens=4 * top,
                depth=None)


_MAKERS = {
    "niah_single": lambda rng, c, L, d, i: _niah(rng, c, L, "noise", 1, 1, d, i),
    "niah_multikey": lambda rng, c, L, d, i: _niah(rng, c, L, "essay", 4, 1, d, i),
    "niah_multivalue": lambda rng, c, L, d, i: _niah(rng, c, L, "essay", 1, 4, d, i),
    "vt": _vt, "cwe": _cwe, "fwe": _fwe,
}


def generate(task: str, length: int, n: int, count: Count, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``task`` at ``length`` tokens (as ``count`` measures them); the same
    ``(task, length, n, seed)`` always gives the same samples. Needle depths are spread evenly
    over 0.05 .. 0.95 across the samples."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{task}/{length}/{i}")
        depth = 0.05 + 0.9 * (i / (n - 1) if n > 1 else 0.5)
        out.append(Sample(task=task, length=length, index=i, **_MAKERS[task](rng, count, length, depth, i)))
    return out


def score(output: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of ``answers`` found in ``output`` (case-insensitive)."""
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, mid - half), min(1.0, mid + half))


def interval(scores: list[float], z: float = 1.96, boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean score: Wilson when every score is 0 or 1, else a seeded
    percentile bootstrap (partial credit is not a proportion)."""
    n = len(scores)
    if all(s in (0.0, 1.0) for s in scores):
        return wilson(sum(scores), n, z)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(boot))
    return (means[int(0.025 * boot)], means[int(0.975 * boot) - 1])
