"""Annealing schedules: Gumbel temperature tau (4 -> 0.05) and logit scale kappa (1e2 -> 5e2).

Pure functions of the iteration, so a resumed run recomputes exactly the value an uninterrupted
run had (no schedule state to checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("linear", "cosine")


def anneal(start: float, end: float, iteration: int, total: int, kind: str = "linear") -> float:
    """Value at ``iteration`` of ``total``, going from ``start`` (0) to ``end`` (``total``).

    ``linear`` is the original MaskLLM schedule; ``cosine`` moves slowly at both ends.
    Iterations outside ``[0, total]`` are clamped.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULE_KINDS)}")
    if total <= 0:
        return float(end)
    progress = min(max(iteration / total, 0.0), 1.0)
    if kind == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return float(start + (end - start) * progress)


@dataclass(frozen=True)
class GumbelSchedule:
    """tau and kappa over training; defaults follow the original recipe."""

    tau_range: tuple[float, float] = (4.0, 0.05)
    kappa_range: tuple[float, float] = (1e2, 5e2)
    total_iters: int = 1
    kind: str = "linear"

    def __post_init__(self) -> None:
        if min(self.tau_range) <= 0:
            raise ValueError(f"Gumbel temperatures must be positive, got {self.tau_range}")
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"unknown schedule {self.kind!r}; choose from {', '.join(SCHEDULE_KINDS)}")

    def tau(self, iteration: int) -> float:
        return anneal(*self.tau_range, iteration, self.total_iters, self.kind)

    def kappa(self, iteration: int) -> float:
        return anneal(*self.kappa_range, iteration, self.total_iters, self.kind)
