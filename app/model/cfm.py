"""Conditional flow matching sampler: Euler steps of the DiT velocity, with classifier-free guidance.

Legend: B rows (streams), M mel bins, T frames padded to the longest row; row i holds P_i prompt frames then N_i
generated frames (T_i = P_i + N_i valid frames). The prompt part of x is held at zero; the prompt mel is given to the
estimator as `prompt_x` instead. With guidance the conditional and the null rows (zero prompt, style and content)
go through ONE estimator call of 2B rows, and v = (1 + cfg) * v_cond - cfg * v_null per row.
"""

from __future__ import annotations

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


@torch.inference_mode()
def sample(estimator: DiT, batch: FlowBatch, steps: int) -> Tensor:
    """Integrate the flow from noise (t=0) to mel (t=1) in `steps` Euler steps. Returns x (B, M, T), prompt zeroed."""
    device = batch.noise.device
    in_prompt = _prompt_region(batch)
    x = batch.noise.masked_fill(in_prompt, 0.0)
    rows = x.shape[0]
    guided = any(rate > 0 for rate in batch.cfg_rates)
    if guided:
        # The null rows: same x and lengths, nothing to condition on.
        prompt_mel = torch.cat([batch.prompt_mel, torch.zeros_like(batch.prompt_mel)])
        style = torch.cat([batch.style, torch.zeros_like(batch.style)])
        condition = torch.cat([batch.condition, torch.zeros_like(batch.condition)])
        valid_frames = batch.valid_frames.repeat(2)
        # Upstream forms 1 + cfg in double precision, then scales in float32: so do we.
        gain = torch.tensor([1.0 + rate for rate in batch.cfg_rates], device=device).view(rows, 1, 1)
        cfg = torch.tensor(batch.cfg_rates, device=device).view(rows, 1, 1)
    else:
        prompt_mel, style, condition, valid_frames = (
            batch.prompt_mel,
            batch.style,
            batch.condition,
            batch.valid_frames,
        )
    t_span = torch.linspace(0, 1, steps + 1, device=device)
    t = t_span[0]
    for step in range(1, steps + 1):
        dt = t_span[step] - t_span[step - 1]
        if guided:
            velocity = estimator(torch.cat([x, x]), prompt_mel, valid_frames, t.expand(2 * rows), style, condition)
            v_cond, v_null = velocity.chunk(2)
            velocity = gain * v_cond - cfg * v_null
        else:
            velocity = estimator(x, prompt_mel, valid_frames, t.expand(rows), style, condition)
        # t is accumulated (not read from t_span) exactly as upstream does: the float32 sums differ slightly.
        x = (x + dt * velocity).masked_fill(in_prompt, 0.0)
        t = t + dt
    return x
