"""Deadline control: when a step is projected to miss its time budget, spend fewer diffusion steps on it.

The cost of a batched step is learnt online per block geometry: an exponentially weighted average of the fixed part
(content encoder, length regulator, vocoder, SOLA) and of the cost of one diffusion step, both per row. Diffusion
steps are the only knob that trades quality for time without changing the stream's geometry or its random draws
(the CFM noise has the same shape whatever the step count), so a lowered step keeps the stream in step.

A geometry never measured here (its first step) is not run blind: its cost is estimated from the measured ones, per
unit of work (mel frames per block), taking the costliest rate seen. The converter measures one geometry before it
serves (the warm-up on a GPU, the speed check on a CPU), so every step of a served session has a projection.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeadlinePolicy:
    """`min_steps` None disables deadline control (the default: parity needs the configured steps)."""

    min_steps: int | None = None
    smoothing: float = 0.3  # weight of the newest measurement in the running averages


@dataclass
class _Cost:
    fixed_per_row: float
    step_per_row: float


@dataclass(frozen=True)
class GroupCost:
    """One batched pass as the cost model sees it: its shape, rows, configured steps and work per row."""

    shape: Hashable
    rows: int
    steps: int
    work: float = 1.0  # how much one row computes, relative to other shapes (mel frames per block)


@dataclass
class StepCostModel:
    policy: DeadlinePolicy
    _costs: dict[Hashable, _Cost] = field(default_factory=dict)
    _work: dict[Hashable, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._costs)

    def observe(
        self, shape: Hashable, rows: int, steps: int, stage_seconds: dict[str, float], work: float = 1.0
    ) -> None:
        cfm = stage_seconds.get("cfm", 0.0)
        fixed = sum(stage_seconds.values()) - cfm
        measured = _Cost(fixed_per_row=fixed / rows, step_per_row=cfm / (rows * steps))
        known = self._costs.get(shape)
        if known is None:
            self._costs[shape], self._work[shape] = measured, work
            return
        alpha = self.policy.smoothing
        known.fixed_per_row += alpha * (measured.fixed_per_row - known.fixed_per_row)
        known.step_per_row += alpha * (measured.step_per_row - known.step_per_row)

    def _cost(self, group: GroupCost) -> _Cost | None:
        """Measured, or estimated from the measured shapes at their costliest rate per unit of work (None: nothing
        measured at all)."""
        known = self._costs.get(group.shape)
        if known is not None or not self._costs:
            return known
        rates = [(cost, self._work[shape]) for shape, cost in self._costs.items()]
        return _Cost(
            fixed_per_row=group.work * max(cost.fixed_per_row / work for cost, work in rates),
            step_per_row=group.work * max(cost.step_per_row / work for cost, work in rates),
        )

    def projected_seconds(self, group: GroupCost) -> float | None:
        cost = self._cost(group)
        return None if cost is None else group.rows * (cost.fixed_per_row + group.steps * cost.step_per_row)

    def choose_steps(self, groups: Sequence[GroupCost], budget_seconds: float | None) -> list[int]:
        """Steps per group so that the whole step fits the budget if it can.

        Every group is lowered by the same amount, never below the floor nor above its configured steps.
        """
        configured = [group.steps for group in groups]
        floor = self.policy.min_steps
        if floor is None or budget_seconds is None:
            return configured
        costs = [cost for group in groups if (cost := self._cost(group)) is not None]
        if len(costs) < len(groups):
            return configured  # nothing measured yet at all: run as configured and learn
        fixed = sum(group.rows * cost.fixed_per_row for group, cost in zip(groups, costs, strict=True))
        per_step = sum(group.rows * cost.step_per_row for group, cost in zip(groups, costs, strict=True))
        total_configured = fixed + sum(
            group.rows * group.steps * cost.step_per_row for group, cost in zip(groups, costs, strict=True)
        )
        if total_configured <= budget_seconds or per_step <= 0:
            return configured
        # Lower every group by the same number of steps until the projection fits (or all reach the floor).
        over = total_configured - budget_seconds
        # (the epsilon keeps float noise like 0.9 / 0.3 = 3.0000000000000004 from costing a whole extra step)
        cut = math.ceil(over / per_step - 1e-9)
        return [max(min(floor, steps), steps - cut) for steps in configured]
