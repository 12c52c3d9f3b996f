"""Numeric precision of the heavy stages: fp32 (exact, the parity mode) or a reduced type for speed.

`fp32` computes what upstream computes (parity tests) and turns TF32 off, on CPU and CUDA alike. `bf16` / `fp16` run
the content encoder, the DiT and the vocoder's convolutions in the reduced type, with their matrix weights converted
ONCE (at load, not on every call); autocast then only casts activations. What accuracy needs stays float32 or wider,
each decided by measurement (bench/precision.py prints the deviation, tests/test_precision.py bounds it):

- the length regulator (cheap: 65 frames), norms' statistics and softmax accumulation (autocast keeps them fp32);
- the vocoder's f0 predictor and NSF source: f0 integrates over the whole block, so a 1e-3 error in f0 moves the
  waveform's phase by whole cycles; the phase cumsum stays float64 (parity README, section 10);
- the source STFT, the iSTFT, SOLA, and the Euler state of the flow sampler (velocity is added in float32).

`auto` picks bf16 where bf16 matrix units exist (CPUs with AVX512-BF16 or AMX, CUDA compute capability 8.0+), fp16
on older CUDA GPUs with fast fp16 (7.0+), else fp32; `resolve` says why, and the converter logs it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class Precision(enum.StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]

    @property
    def reduced(self) -> bool:
        return self in (Precision.BF16, Precision.FP16)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What decides `auto`: the device type, and the hardware's fast reduced-precision units."""

    device_type: str  # "cpu" or "cuda"
    cpu_bf16: bool = False  # AVX512-BF16 or AMX tiles
    cuda_capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device: torch.device) -> DeviceCapabilities:
        if device.type == "cuda":
            return cls("cuda", cuda_capability=torch.cuda.get_device_capability(device))
        return cls("cpu", cpu_bf16=bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision  # never AUTO
    reason: str


def resolve(requested: Precision | str, capabilities: DeviceCapabilities) -> PrecisionChoice:
    """The concrete precision for `requested` on a device with `capabilities`, and why."""
    requested = Precision(requested)
    if requested is not Precision.AUTO:
        return PrecisionChoice(requested, f"{requested} was asked for")
    if capabilities.device_type == "cuda":
        major, minor = capabilities.cuda_capability or (0, 0)
        if major >= 8:
            return PrecisionChoice(
                Precision.BF16, f"auto: CUDA compute capability {major}.{minor} has bf16 tensor cores"
            )
        if major >= 7:
            return PrecisionChoice(
                Precision.FP16, f"auto: CUDA compute capability {major}.{minor} has fp16 tensor cores only"
            )
        return PrecisionChoice(
            Precision.FP32, f"auto: CUDA compute capability {major}.{minor} has no fast reduced types"
        )
    if capabilities.cpu_bf16:
        return PrecisionChoice(Precision.BF16, "auto: this CPU has AVX512-BF16/AMX bf16 matrix instructions")
    return PrecisionChoice(Precision.FP32, "auto: this CPU has no bf16 matrix instructions (bf16 would be slower)")


def disable_tf32() -> None:
    """float32 means float32: torch leaves cuDNN's TF32 on by default, which breaks fp32 parity on Ampere and later.

    Off in the reduced modes too: what they keep in float32 (f0, the NSF source) is there for its accuracy.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d)


def convert_matrix_weights(module: nn.Module, dtype: torch.dtype, keep: tuple[nn.Module, ...] = ()) -> None:
    """Convert the weights and biases of `module`'s matrix layers (linear, conv) to `dtype`, in place, once.

    Autocast would otherwise re-cast every float32 weight on every call. Norm gains, learned activations (Snake's
    alpha) and buffers (RoPE tables, time-embedding frequencies, windows) stay float32, and so does every layer inside
    a module of `keep`.
    """
    kept = {id(layer) for parent in keep for layer in parent.modules()}
    for layer in module.modules():
        if isinstance(layer, _MATRIX_LAYERS) and id(layer) not in kept:
            layer.to(dtype)


def compute_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast to the reduced type for the heavy stages; a no-op in fp32."""
    if not precision.reduced:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """A float32 region inside a reduced-precision stage (inputs must be cast to float32 by the caller)."""
    with torch.autocast(device.type, enabled=False):
        yield
