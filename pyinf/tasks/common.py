"""The example record and the train/test split shared by the task generators."""
from __future__ import annotations

from dataclasses import dataclass

N_TRAIN_PER_CLASS = 90
N_TEST_PER_CLASS = 10
SEP = " -> "


@dataclass(frozen=True)
class Example:
    """One example: `prompt + SEP + answer`; the model is trained on the answer only."""

    prompt: str
    answer: str
    label: int  # class index

    @property
    def text(self) -> str:
        """Prompt and answer joined by the separator token."""
        return self.prompt + SEP + self.answer


@dataclass(frozen=True)
class TaskData:
    """An embedded task's examples: name, class names, training and test examples (class-major)."""

    name: str
    class_names: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def shown_method(scores: dict, n_queries: int, prefer: str = "datainf") -> str | None:
    """The method a figure shows: `prefer` when it scored every query, else the first method that did
    (forward scores a subset of the queries); None when none did."""
    full = [m for m, S in scores.items() if S.shape[0] == n_queries]
    return prefer if prefer in full else (full[0] if full else None)


def split(name, class_names, per_class: list[list[Example]], n_train: int, n_test: int) -> TaskData:
    """Class-major order: train = class 0's n_train, class 1's, ...; test likewise."""
    train = tuple(e for ex in per_class for e in ex[:n_train])
    test = tuple(e for ex in per_class for e in ex[n_train : n_train + n_test])
    return TaskData(name, tuple(class_names), train, test)


def unique_draws(draw, k: int, rng, what: str) -> list:
    """k distinct results of draw(rng) (distinct examples: no train/test leakage)."""
    seen, out = set(), []
    for _ in range(200 * k):
        e = draw(rng)
        key = e if isinstance(e, (str, tuple)) else repr(e)
        if key not in seen:
            seen.add(key)
            out.append(e)
            if len(out) == k:
                return out
    raise ValueError(f"{what}: could not draw {k} distinct examples")
