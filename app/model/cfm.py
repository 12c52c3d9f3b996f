"""Conditional flow matching sampler: Euler steps of the DiT velocity, with classifier-free guidance.

Legend: B rows (streams), M mel bins, T frames padded to the longest row; row i holds P_i prompt frames then N_i
generated frames (T_i = P_i + N_i valid frames). The prompt part of x is held at zero; the prompt mel is given to the
estimator as `prompt_x` instead. With guidance the conditional and the null rows (zero prompt, style and content)
go through ONE estimator call of 2B rows, and v = (1 + cfg) * v_cond - cfg * v_null per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.model.dit import DiT


@dataclass(frozen=True)
class FlowBatch:
    """The inputs of one sampling call, right-padded to a common length T."""

    condition: Tensor  # (B, T, content_dim): [prompt condition | block condition | padding]
    prompt_mel: Tensor  # (B, M, T): the voice's prompt mel in [:P_i], zero elsewhere
    prompt_frames: Tensor  # (B,) int64: P_i
    valid_frames: Tensor  # (B,) int64: T_i = P_i + N_i
    style: Tensor  # (B, style_dim)
    noise: Tensor  # (B, M, T): each row's initial noise in its first T_i columns
    cfg_rates: tuple[float, ...]  # per row; 0 disables guidance for that row


def _prompt_region(batch: FlowBatch) -> Tensor:
    """(B, 1, T) bool: True on each row's prompt frames."""
    positions = torch.arange(batch.noise.shape[-1], device=batch.noise.device)
    return (positions[None, :] < batch.prompt_frames[:, None])[:, None, :]


@dataclass(frozen=True)
class EstimatorInputs:
    """What every Euler step feeds the estimator besides x and t: with guidance, conditional rows then null rows."""

    prompt_mel: Tensor  # (R, M, T), R = 2B with guidance, else B
    style: Tensor  # (R, style_dim)
    condition: Tensor  # (R, T, content_dim)
    valid_frames: Tensor  # (R,)
    in_prompt: Tensor  # (B, 1, T) bool
    gain: Tensor | None  # (B, 1, 1): 1 + cfg per row; None without guidance
    cfg: Tensor | None  # (B, 1, 1)


def estimator_inputs(batch: FlowBatch) -> EstimatorInputs:
    in_prompt = _prompt_region(batch)
    if not any(rate > 0 for rate in batch.cfg_rates):
        return EstimatorInputs(
            batch.prompt_mel, batch.style, batch.condition, batch.valid_frames, in_prompt, gain=None, cfg=None
        )
    # The null rows: same x and lengths, nothing to condition on.
    rows, device = batch.noise.shape[0], batch.noise.device
    return EstimatorInputs(
        prompt_mel=torch.cat([batch.prompt_mel, torch.zeros_like(batch.prompt_mel)]),
        style=torch.cat([batch.style, torch.zeros_like(batch.style)]),
        condition=torch.cat([batch.condition, torch.zeros_like(batch.condition)]),
        valid_frames=batch.valid_frames.repeat(2),
        in_prompt=in_prompt,
        # Upstream forms 1 + cfg in double precision, then scales in float32: so do we.
        gain=torch.tensor([1.0 + rate for rate in batch.cfg_rates], device=device).view(rows, 1, 1),
        cfg=torch.tensor(batch.cfg_rates, device=device).view(rows, 1, 1),
    )


def euler_step(estimator: DiT, inputs: EstimatorInputs, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
    """x at flow time t (a 0-d tensor) -> x at t + dt. The velocity may come out reduced; x stays float32."""
    rows = x.shape[0]
    if inputs.gain is not None and inputs.cfg is not None:
        velocity = estimator(
            torch.cat([x, x]),
            inputs.prompt_mel,
            inputs.valid_frames,
            t.expand(2 * rows),
            inputs.style,
            inputs.condition,
        )
        v_cond, v_null = velocity.chunk(2)
        velocity = inputs.gain * v_cond - inputs.cfg * v_null
    else:
        velocity = estimator(x, inputs.prompt_mel, inputs.valid_frames, t.expand(rows), inputs.style, inputs.condition)
    return (x + dt * velocity).masked_fill(inputs.in_prompt, 0.0)


EulerStep = Callable[[EstimatorInputs, Tensor, Tensor, Tensor], Tensor]


@torch.inference_mode()
def sample(estimator: DiT, batch: FlowBatch, steps: int, step: EulerStep | None = None) -> Tensor:
    """Integrate the flow from noise (t=0) to mel (t=1) in `steps` Euler steps. Returns x (B, M, T), prompt zeroed.

    `step` replaces the eager Euler step (e.g. a captured CUDA graph of it); it must compute `euler_step`.
    """
    inputs = estimator_inputs(batch)
    advance = step or (lambda inputs, x, t, dt: euler_step(estimator, inputs, x, t, dt))
    x = batch.noise.masked_fill(inputs.in_prompt, 0.0)
    t_span = torch.linspace(0, 1, steps + 1, device=batch.noise.device)
    t = t_span[0]
    for index in range(1, steps + 1):
        dt = t_span[index] - t_span[index - 1]
        x = advance(inputs, x, t, dt)
        # t is accumulated (not read from t_span) exactly as upstream does: the float32 sums differ slightly.
        t = t + dt
    return x
