"""Seeded text augmentation for small datasets (off by default): applied to inputs, never outputs.

Teaching the model noisy *outputs* would teach it to write noise; perturbing the inputs teaches it
to answer the same question asked a little differently.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from peftcore._json import read_text

OPS = ("word_dropout", "adjacent_swap", "char_noise", "synonym")


@dataclass
class AugmentConfig:
    copies: int = 0  # augmented copies per record; 0 = off
    # applied in order: word_dropout | adjacent_swap | char_noise | synonym
    ops: tuple[str, ...] = ("word_dropout", "adjacent_swap")
    probability: float = 0.1  # per word (or per character for char_noise)
    # lines "word: synonym1, synonym2"; relative to the recipe
    synonyms_file: str | None = field(default=None, metadata={"path": True})
    seed: int = 0  # the augmentation's own random stream (the same copies every run)

    def __post_init__(self):
        check_config(self)


def check_config(config: AugmentConfig) -> None:
    """On construction, so that copies = 0 (the default) still rejects a misspelt op in a recipe:
    otherwise the mistake would surface only on the day someone turns augmentation on."""
    if isinstance(config.ops, str):  # a bare "char_noise" would iterate as its characters
        raise TypeError(f"ops must be a list of names, got the string {config.ops!r}; e.g. ops = [{config.ops!r}]")
    unknown = [op for op in config.ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation op(s) {unknown}; choose from {', '.join(OPS)}")
    if "synonym" in config.ops and not config.synonyms_file:
        raise ValueError("the 'synonym' augmentation needs synonyms_file")
    if config.copies < 0:
        raise ValueError(f"copies must be >= 0 (0 = off), got {config.copies}")
    if not 0 <= config.probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {config.probability}")


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    table, path = {}, Path(path)
    for lineno, line in enumerate(read_text(path, path.name).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, sep, rest = line.partition(":")
        choices = [w.strip() for w in rest.split(",") if w.strip()]
        if not sep or not word.strip() or not choices:
            raise ValueError(f"{path.name}:{lineno}: expected 'word: synonym, synonym', got {line!r}")
        table[word.strip().lower()] = choices
    return table


def word_dropout(words: list[str], p: float, rng: random.Random, _) -> list[str]:
    kept = [w for w in words if rng.random() >= p]
    return kept or words[:1]


def adjacent_swap(words: list[str], p: float, rng: random.Random, _) -> list[str]:
    words = list(words)
    for i in range(len(words) - 1):
        if rng.random() < p:
            words[i], words[i + 1] = words[i + 1], words[i]
    return words


def char_noise(words: list[str], p: float, rng: random.Random, _) -> list[str]:
    """Drop or double single characters (typos), leaving 1-character words alone."""
    def noisy(w: str) -> str:
        out = []
        for ch in w:
            r = rng.random()
            out.append("" if r < p / 2 and len(w) > 1 else ch * 2 if r < p else ch)
        return "".join(out) or w
    return [noisy(w) for w in words]


def synonym(words: list[str], p: float, rng: random.Random, table: dict) -> list[str]:
    return [rng.choice(table[w.lower()]) if w.lower() in table and rng.random() < p else w for w in words]


FUNCTIONS = {"word_dropout": word_dropout, "adjacent_swap": adjacent_swap, "char_noise": char_noise, "synonym": synonym}


def augment_text(text: str, config: AugmentConfig, rng: random.Random, table: dict) -> str:
    words = text.split(" ")
    for op in config.ops:
        words = FUNCTIONS[op](words, config.probability, rng, table)
    return " ".join(words)


def augment_records(records: list[tuple[dict, str]], config: AugmentConfig,
                    kind: str = "generation") -> list[tuple[dict, str]]:
    """The records plus `copies` perturbed copies of each record's input (chat: the user turns;
    classification (`kind`): the text). The records must already be checked (tasks.parse_records
    does so): perturbing assumes the fields are there and are strings."""
    check_config(config)  # again: the fields may have been changed since construction
    table = load_synonyms(config.synonyms_file) if config.synonyms_file else {}
    rng = random.Random(config.seed)
    out = list(records)
    for copy_index in range(config.copies):
        for record, where in records:
            out.append((perturb(record, config, rng, table, kind), f"{where} (augmented #{copy_index + 1})"))
    return out


def perturb(record: dict, config: AugmentConfig, rng: random.Random, table: dict, kind: str = "generation") -> dict:
    if "messages" in record:
        messages = [dict(m, content=augment_text(m["content"], config, rng, table)) if m.get("role") == "user" else m
                    for m in record["messages"]]
        return {**record, "messages": messages}
    key = "text" if kind == "classification" else "input"  # by kind: an input/output record may carry a "text" too
    return {**record, key: augment_text(record.get(key, ""), config, rng, table)}
