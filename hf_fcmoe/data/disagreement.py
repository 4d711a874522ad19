"""A bundled scenario where clients genuinely disagree: the same prompt has a client-specific correct answer.

Label skew (`synthetic_domains`) gives clients different but compatible skills: one global model can serve
them all. Here every row belongs to a *group* (its label): half of a group's rows are ``map <word> = ...``
whose answer follows the group's rule (sorted, reversed, upper-cased, ... letters) over one shared pool of
words, so the same prompt has a different correct completion in every group; the other half are shared skills
(``mul``, ``count``) whose answers every group agrees on: structure worth federating. Partitioning on the
label (Dirichlet, natural) then yields clients that contradict each other on one part and agree on the other,
the setting where conflict-aware aggregation and personalization are supposed to pay off.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from datasets import Dataset

from hf_fcmoe.data.synthetic import DOMAINS

RULES: dict[str, Callable[[str], str]] = {
    "sort": lambda word: "".join(sorted(word)),
    "reverse": lambda word: word[::-1],
    "upper": str.upper,
    "vowels": lambda word: "".join(c for c in word if c in "aeiou") or "-",
    "double": lambda word: "".join(c + c for c in word),
    "first": lambda word: word[0] * len(word),
}
DEFAULT_RULES = ("sort", "reverse", "upper", "vowels")
DEFAULT_SHARED = ("multiply", "count")
WORD_POOL = 256  # distinct words: with a few thousand rows each prompt recurs in several groups


def parse_disagreement_config(config: str | None) -> tuple[list[str], list[str]]:
    """``"rule,rule;shared,shared"`` -> (rules, shared domains); either part may be omitted (defaults)."""
    rules_part, _, shared_part = (config or "").partition(";")
    rules = [r for r in rules_part.split(",") if r] or list(DEFAULT_RULES)
    shared = [s for s in shared_part.split(",") if s] or list(DEFAULT_SHARED)
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown disagreement rule(s) {unknown}; available: {sorted(RULES)}")
    unknown = [s for s in shared if s not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown shared domain(s) {unknown}; available: {sorted(DOMAINS)}")
    if len(rules) < 2:
        raise ValueError(f"a disagreement scenario needs at least 2 rules, got {rules}")
    return rules, shared


def synthetic_disagreement(
    num_examples: int = 2048, config: str | None = None, seed: int = 0, shared_fraction: float = 0.5
) -> Dataset:
    """Columns ``text``, ``label`` (the group's rule) and ``kind`` (``conflicting`` or ``shared``), balanced over
    groups; `config` is ``"rules;shared"`` (see `parse_disagreement_config`)."""
    rules, shared = parse_disagreement_config(config)
    rng = random.Random(seed)
    pool = sorted(
        {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(WORD_POOL)}
    )
    rows: dict[str, list[str]] = {"text": [], "label": [], "kind": []}
    for i in range(num_examples):
        group = rules[i % len(rules)]
        if rng.random() < shared_fraction:
            rows["text"].append(DOMAINS[shared[rng.randrange(len(shared))]](rng))
            rows["kind"].append("shared")
        else:
            word = rng.choice(pool)
            rows["text"].append(f"map {word} = {RULES[group](word)}")
            rows["kind"].append("conflicting")
        rows["label"].append(group)
    return Dataset.from_dict(rows)
