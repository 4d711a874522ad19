"""Synthetic text domains generated in code: the bundled offline dataset for demos and tests.

Each domain is a small string-transformation skill written as plain text ("a prompt and its
answer"), so domains differ in which characters and patterns appear: clients that hold different
domains pull shared experts in different directions, which is the non-IID setting FC-MoE targets.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from datasets import Dataset

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


def _addition(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a} {b} = {a + b}"


def _reverse(rng: random.Random) -> str:
    word = _word(rng)
    return f"reverse {word} = {word[::-1]}"


def _sort(rng: random.Random) -> str:
    word = _word(rng)
    return f"sort {word} = {''.join(sorted(word))}"


def _upper(rng: random.Random) -> str:
    word = _word(rng)
    return f"upper {word} = {word.upper()}"


def _count(rng: random.Random) -> str:
    letter = rng.choice("abc")
    word = "".join(rng.choice("abcde") for _ in range(rng.randint(4, 9)))
    return f"count {letter} in {word} = {word.count(letter)}"


def _repeat(rng: random.Random) -> str:
    word, times = _word(rng, 2, 4), rng.randint(2, 4)
    return f"repeat {word} {times} = {word * times}"


def _multiply(rng: random.Random) -> str:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return f"mul {a} {b} = {a * b}"


def _vowels(rng: random.Random) -> str:
    word = _word(rng, 5, 9)
    return f"vowels {word} = {''.join(c for c in word if c in 'aeiou') or '-'}"


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "addition": _addition,
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "count": _count,
    "repeat": _repeat,
    "multiply": _multiply,
    "vowels": _vowels,
}


def synthetic_domains(num_examples: int = 2048, domains: list[str] | None = None, seed: int = 0) -> Dataset:
    """A `Dataset` with columns ``text`` and ``label`` (the domain name), balanced over `domains`."""
    names = list(domains or DOMAINS)
    unknown = [name for name in names if name not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; available: {sorted(DOMAINS)}")
    rng = random.Random(seed)
    rows = {"text": [], "label": []}
    for i in range(num_examples):
        name = names[i % len(names)]
        rows["text"].append(DOMAINS[name](rng))
        rows["label"].append(name)
    return Dataset.from_dict(rows)
