"""Ten math word-problem templates with random numbers (DataInf's math task, our own templates).

    Tom has 7 apples and buys 5 more. How many apples now? -> 12

A class is a template (its wording and its arithmetic); 90 training and 10
test examples per class with distinct numbers/names, from a seeded
`random.Random`.
"""
from __future__ import annotations

import random

from .common import N_TEST_PER_CLASS, N_TRAIN_PER_CLASS, Example, TaskData, split, unique_draws

NAMES = ("Tom", "Ann", "Mia", "Leo", "Sam", "Ivy", "Max", "Zoe")


def _n(rng, lo=2, hi=19):
    return rng.randint(lo, hi)


def _add(rng):
    p, a, b = rng.choice(NAMES), _n(rng), _n(rng)
    return f"{p} has {a} apples and buys {b} more. How many apples now?", a + b


def _sub(rng):
    p, b = rng.choice(NAMES), _n(rng)
    a = b + _n(rng, 1, 19)
    return f"{p} had {a} coins and spent {b}. How many coins are left?", a - b


def _boxes(rng):
    a, b = _n(rng, 2, 19), _n(rng, 2, 9)
    return f"There are {a} boxes with {b} pens in each. How many pens in all?", a * b


def _share(rng):
    a, b = _n(rng, 2, 12), _n(rng, 2, 12)
    return f"{a * b} candies are shared by {b} kids. How many does each kid get?", a


def _square(rng):
    a = _n(rng, 2, 199)
    return f"A square has sides of {a} cm. What is its perimeter?", 4 * a


def _age(rng):
    p, a, b = rng.choice(NAMES), _n(rng, 2, 60), _n(rng, 2, 20)
    return f"{p} is {a} years old. How old will {p} be in {b} years?", a + b


def _train(rng):
    a, b = _n(rng, 10, 90), _n(rng, 2, 5)
    return f"A train goes {a} km each hour for {b} hours. How far does it go?", a * b


def _pages(rng):
    p, a, b, c = rng.choice(NAMES), _n(rng, 2, 9), _n(rng, 2, 7), _n(rng, 1, 9)
    return f"{p} reads {a} pages a day for {b} days, then {c} more. How many pages?", a * b + c


def _rect(rng):
    a, b = _n(rng, 2, 12), _n(rng, 2, 12)
    return f"A garden is {a} m long and {b} m wide. What is its area?", a * b


def _stickers(rng):
    p, a, b = rng.choice(NAMES), _n(rng, 5, 30), _n(rng, 2, 9)
    c = _n(rng, 1, a + b - 1)
    return f"{p} had {a} stickers, got {b} and gave away {c}. How many are left?", a + b - c


# (short name, arithmetic, generator)
MATH_CLASSES = (
    ("add", "a + b", _add),
    ("subtract", "a - b", _sub),
    ("boxes", "a * b", _boxes),
    ("share", "(a*b) / b", _share),
    ("square", "4 * a", _square),
    ("age", "a + b", _age),
    ("train", "a * b", _train),
    ("pages", "a * b + c", _pages),
    ("garden", "a * b", _rect),
    ("stickers", "a + b - c", _stickers),
)


def math_problems(seed: int = 0, n_train: int = N_TRAIN_PER_CLASS, n_test: int = N_TEST_PER_CLASS) -> TaskData:
    """`TaskData` with `10 * n_train` training and `10 * n_test` test examples, class-major."""
    rng = random.Random(f"math-{seed}")
    per_class = []
    for label, (name, _, gen) in enumerate(MATH_CLASSES):
        probs = unique_draws(gen, n_train + n_test, rng, f"class {name}")
        per_class.append([Example(q, str(a), label) for q, a in probs])
    return split("math", [c[0] for c in MATH_CLASSES], per_class, n_train, n_test)
