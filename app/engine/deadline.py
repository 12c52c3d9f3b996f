"""Deadline control: when a step is projected to miss its time budget, spend fewer diffusion steps on it.

The cost of a batched step is learnt online per block shape: an exponentially weighted average of the fixed part
(content encoder, length regulator, vocoder, SOLA) and of the cost of one diffusion step, both per row. Diffusion
steps are the only knob that trades quality for time without changing the stream's geometry or its random draws
(the CFM noise has the same shape whatever the step count), so a lowered step keeps the stream in step.
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


@dataclass
class StepCostModel:
    policy: DeadlinePolicy
    _costs: dict[Hashable, _Cost] = field(default_factory=dict)

    def observe(self, shape: Hashable, rows: int, steps: int, stage_seconds: dict[str, float]) -> None:
        cfm = stage_seconds.get("cfm", 0.0)
        fixed = sum(stage_seconds.values()) - cfm
        measured = _Cost(fixed_per_row=fixed / rows, step_per_row=cfm / (rows * steps))
        known = self._costs.get(shape)
        if known is None:
            self._costs[shape] = measured
            return
        alpha = self.policy.smoothing
        known.fixed_per_row += alpha * (measured.fixed_per_row - known.fixed_per_row)
        known.step_per_row += alpha * (measured.step_per_row - known.step_per_row)

    def projected_seconds(self, shape: Hashable, rows: int, steps: int) -> float | None:
        cost = self._costs.get(shape)
        return None if cost is None else rows * (cost.fixed_per_row + steps * cost.step_per_row)

    def choose_steps(self, groups: Sequence[tuple[Hashable, int, int]], budget_seconds: float | None) -> list[int]:
        """Steps per group (shape, rows, configured steps) so that the whole step fits the budget if it can.

        Every group is lowered by the same amount, never below the floor nor above its configured steps.
        """
        configured = [steps for _, _, steps in groups]
        floor = self.policy.min_steps
        if floor is None or budget_seconds is None:
            return configured
        projections = [cost for shape, _, _ in groups if (cost := self._costs.get(shape)) is not None]
        if len(projections) < len(groups):
            return configured  # nothing measured yet for some shape: run as configured and learn
        fixed = sum(rows * cost.fixed_per_row for (_, rows, _), cost in zip(groups, projections, strict=True))
        per_step = sum(rows * cost.step_per_row for (_, rows, _), cost in zip(groups, projections, strict=True))
        total_configured = fixed + sum(
            rows * steps * cost.step_per_row for (_, rows, steps), cost in zip(groups, projections, strict=True)
        )
        if total_configured <= budget_seconds or per_step <= 0:
            return configured
        # Lower every group by the same number of steps until the projection fits (or all reach the floor).
        over = total_configured - budget_seconds
        # (the epsilon keeps float noise like 0.9 / 0.3 = 3.0000000000000004 from costing a whole extra step)
        cut = math.ceil(over / per_step - 1e-9)
        return [max(min(floor, steps), steps - cut) for steps in configured]
