"""TracIn / gradient dot product (Pruthi et al., NeurIPS 2020): H = I.

score[j, i] = −⟨v_j, g_i⟩: one pass over the training gradients, no curvature.
"""
from __future__ import annotations

from .base import Method


class TracIn(Method):
    """TracIn: no curvature, H = I; the score is the gradient dot product."""
    name = "tracin"
    needs_damping = False  # the damping is accepted for uniformity and unused

    def precondition(self, queries):
        return self._unstacked(self._stacked(queries))
