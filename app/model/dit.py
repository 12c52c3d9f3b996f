"""The DiT flow estimator of Seed-VC's real-time model: predicts the flow velocity of a mel spectrogram.

Legend: B batch rows, T mel frames of the row (prompt + block), S = T + 2 tokens, D hidden dim, H heads, Hd head dim.

Token layout per row: [time token, style token, frame_0 .. frame_{T-1}]. Each frame token mixes the noisy mel, the
prompt mel (zero outside the prompt) and the content condition. Rows of different lengths are right-padded; a key
mask (`position < x_lens + 2`) keeps padding out of every valid token, and RoPE positions do not depend on padding,
so a padded row computes what it computes alone.

Parameter names follow the upstream checkpoint (`net.cfm` with the `estimator.` prefix removed: `DIT_LAYOUT`).
Weights the real-time path never uses (x_embedder, cond_embedder, ...) are not built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.model.checkpoints import CheckpointLayout, RenamePrefix, StripPrefix
from app.model.config import DiTConfig
from app.model.sources import ModelLoadError

# Both parts of upstream's DiT checkpoint (`dit_checkpoint_parts`) may sit behind `module.`, when saved from
# DistributedDataParallel. Their unused weights belong to modules the real-time path never runs, so they are not built;
# `input_pos` is a position buffer whose stored size (the config's block_size) differs from ours; upstream skips it too.
_SEEDVC_HINT = "Is it a Seed-VC real-time (xlsr-tiny) checkpoint, with the config it was trained with?"
DIT_LAYOUT = CheckpointLayout(
    "DiT estimator",
    hooks=(StripPrefix("module."), RenamePrefix("estimator.", "")),
    unused=("input_pos", "x_embedder.", "cond_embedder.", "content_mask_embedder.", "skip_linear."),
    strict_extras=False,
    hint=_SEEDVC_HINT,
)
REGULATOR_LAYOUT = CheckpointLayout(
    "length regulator",
    hooks=(StripPrefix("module."),),
    unused=("embedding.", "mask_token", "extra_codebooks.", "extra_codebook_mask_tokens."),
    strict_extras=False,
    hint=_SEEDVC_HINT,
)


def dit_checkpoint_parts(checkpoint: Any, path: Path) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
    """The (estimator, length regulator) state dicts of an upstream DiT checkpoint `{'net': {'cfm', ...}}`, each in
    its file layout (DIT_LAYOUT and REGULATOR_LAYOUT map them to the modules)."""
    net = checkpoint.get("net") if isinstance(checkpoint, Mapping) else None
    if not isinstance(net, Mapping) or not {"cfm", "length_regulator"} <= set(net):
        raise ModelLoadError(
            f"{path} is not a Seed-VC DiT checkpoint: expected {{'net': {{'cfm': ..., 'length_regulator': ...}}}}"
        )
    return net["cfm"], net["length_regulator"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(torch.mean(x.float() * x.float(), dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose scale and shift come from a conditioning vector when one is given.

    With time as a token only the final norm is conditioned; the per-block norms still own a (then unused)
    `project_layer`, kept so their checkpoint keys load.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is None:
            return self.norm(x)
        scale, shift = self.project_layer(condition).chunk(2, dim=-1)
        return scale * self.norm(x) + shift


def rope_table(positions: int, head_dim: int, base: float) -> Tensor:
    """(positions, Hd/2, 2) cos/sin of the rotary angles, computed in float32 as upstream does."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(positions), inv_freq)  # (positions, Hd/2)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, S, H, Hd) by the table rows for positions 0..S-1."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, Hd/2, 2)
    cos = table[: x.shape[1], None, :, 0]  # (S, 1, Hd/2)
    sin = table[: x.shape[1], None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.hidden_dim, 3 * config.hidden_dim, bias=False)
        self.wo = nn.Linear(config.hidden_dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, key_mask: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)  # (B, S, H, Hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, Hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = AdaptiveRMSNorm(config.hidden_dim, config.norm_eps)
        self.ffn_norm = AdaptiveRMSNorm(config.hidden_dim, config.norm_eps)
        # Every block owns a U-ViT skip projection; only the blocks of the second half use theirs.
        self.skip_in_linear = nn.Linear(2 * config.hidden_dim, config.hidden_dim)

    def forward(self, x: Tensor, rope: Tensor, key_mask: Tensor, skip: Tensor | None) -> Tensor:
        if skip is not None:
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x), rope, key_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """U-ViT: blocks of the first half push their outputs, blocks after the middle pop the most recent one."""

    # Registered buffers, declared so that they type as tensors rather than as Module.__getattr__'s union.
    rope: Tensor

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.norm = AdaptiveRMSNorm(config.hidden_dim, config.norm_eps)
        self.register_buffer(
            "rope", rope_table(config.rope_positions, config.head_dim, config.rope_base), persistent=False
        )

    def forward(self, x: Tensor, time_embedding: Tensor, key_mask: Tensor) -> Tensor:
        middle = len(self.layers) // 2
        skips: list[Tensor] = []
        for index, layer in enumerate(self.layers):
            x = layer(x, self.rope, key_mask, skips.pop() if index > middle else None)
            if index < middle:
                skips.append(x)
        return self.norm(x, time_embedding)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the flow time t (scaled by 1000) followed by an MLP."""

    # Registered buffers, declared so that they type as tensors rather than as Module.__getattr__'s union.
    freqs: Tensor

    def __init__(self, hidden_dim: int, frequency_embedding_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        half = frequency_embedding_size // 2
        # A persistent buffer: the checkpoint carries its own copy, and upstream uses the stored values.
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half))

    def forward(self, t: Tensor) -> Tensor:
        args = 1000 * t[:, None].float() * self.freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.transformer = Transformer(config)
        self.t_embedder = TimestepEmbedder(dim, config.frequency_embedding_size)
        self.cond_projection = nn.Linear(config.content_dim, dim)
        self.cond_x_merge_linear = nn.Linear(dim + 2 * config.in_channels, dim)
        self.style_in = nn.Linear(config.style_dim, dim)
        self.final_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, config.in_channels))

    def forward(self, x: Tensor, prompt_x: Tensor, x_lens: Tensor, t: Tensor, style: Tensor, cond: Tensor) -> Tensor:
        """Flow velocity.

        x, prompt_x: (B, n_mels, T); x_lens: (B,) valid frames per row; t: (B,); style: (B, style_dim);
        cond: (B, T, content_dim). Returns (B, n_mels, T); frames at or beyond x_lens are meaningless.
        """
        batch, _, frames = x.shape
        time_embedding = self.t_embedder(t)  # (B, D)
        frame_tokens = self.cond_x_merge_linear(
            torch.cat([x.transpose(1, 2), prompt_x.transpose(1, 2), self.cond_projection(cond)], dim=-1)
        )  # (B, T, D)
        tokens = torch.cat([time_embedding[:, None], self.style_in(style)[:, None], frame_tokens], dim=1)
        positions = torch.arange(frames + 2, device=x.device)
        key_mask = (positions[None, :] < (x_lens[:, None] + 2)).view(batch, 1, 1, frames + 2)
        hidden = self.transformer(tokens, time_embedding[:, None], key_mask)  # (B, S, D)
        return self.final_mlp(hidden[:, 2:]).transpose(1, 2)
