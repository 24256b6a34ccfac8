"""Ten sentence transformations, each named by a made-up word (DataInf's sentence task, our own words).

    blorf: red fox eats cake -> cake eats fox red

A class is a transformation; every example of a class starts with the class's
made-up word, the only thing in the prompt that says which transformation to
apply. 90 training and 10 test examples per class (distinct sentences), from
a seeded `random.Random`.
"""
from __future__ import annotations

import random

from .common import N_TEST_PER_CLASS, N_TRAIN_PER_CLASS, Example, TaskData, split, unique_draws

WORDS = (
    "red blue green old new big small fast slow happy sad cold warm dark bright "
    "cat dog fox bird fish cow frog bee owl hen "
    "eats sees finds likes holds takes wants moves "
    "cake milk rice corn seed nut leaf rock tree lake hill road box cup hat ball"
).split()

VOWELS = set("aeiou")


def _reverse_words(w):
    return w[::-1]


def _capitalise(w):
    return [x.capitalize() for x in w]


def _upper(w):
    return [x.upper() for x in w]


def _reverse_letters(w):
    return [x[::-1] for x in w]


def _sort(w):
    return sorted(w)


def _rotate(w):
    return w[1:] + w[:1]


def _swap_ends(w):
    return w[-1:] + w[1:-1] + w[:1]


def _every_other(w):
    return w[::2]


def _initials(w):
    return [x[0] for x in w]


def _no_vowels(w):
    return ["".join(c for c in x if c not in VOWELS) for x in w]


# (made-up name, description, function on the word list)
SENTENCE_CLASSES = (
    ("blorf", "reverse the word order", _reverse_words),
    ("zindle", "capitalise every word", _capitalise),
    ("quaxo", "upper-case everything", _upper),
    ("mivet", "reverse the letters of each word", _reverse_letters),
    ("dranto", "sort the words alphabetically", _sort),
    ("plusk", "move the first word to the end", _rotate),
    ("fendro", "swap the first and last words", _swap_ends),
    ("sorbik", "keep every other word", _every_other),
    ("wugga", "the first letters of the words", _initials),
    ("trelm", "drop the vowels", _no_vowels),
)


def transform(label: int, sentence: str) -> str:
    """The answer of class `label` for `sentence` (its words transformed by the class's rule)."""
    return " ".join(SENTENCE_CLASSES[label][2](sentence.split()))


def random_sentence(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    """`lo`..`hi` distinct words drawn from the vocabulary by `rng`."""
    return " ".join(rng.sample(WORDS, rng.randint(lo, hi)))


def sentence_transformations(
    seed: int = 0, n_train: int = N_TRAIN_PER_CLASS, n_test: int = N_TEST_PER_CLASS
) -> TaskData:
    """`TaskData` with `10 * n_train` training and `10 * n_test` test examples, class-major."""
    rng = random.Random(f"sentences-{seed}")
    per_class = []
    for label, (name, _, _) in enumerate(SENTENCE_CLASSES):
        sents = unique_draws(random_sentence, n_train + n_test, rng, f"class {name}")
        per_class.append([Example(f"{name}: {s}", transform(label, s), label) for s in sents])
    return split("sentences", [c[0] for c in SENTENCE_CLASSES], per_class, n_train, n_test)
