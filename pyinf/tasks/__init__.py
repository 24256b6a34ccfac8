"""Embedded attribution tasks (seeded generators), the tiny model that learns them, and the demo."""
from .math_problems import MATH_CLASSES, math_problems
from .sentences import SENTENCE_CLASSES, sentence_transformations

__all__ = ["SENTENCE_CLASSES", "sentence_transformations", "MATH_CLASSES", "math_problems"]
