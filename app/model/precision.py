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
from torch import Tensor, nn


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

# A reduced-precision kernel can be plain wrong for some shapes on some hardware. Measured (torch 2.9.1, Intel Xeon
# with AMX): oneDNN's AMX path gives a grouped Conv1d with 4 channels per group and an even kernel (XLS-R's positional
# convolution at the test fixture's size) a mean relative error of 1.06 in bf16: its output is noise. Right kernels
# stay near 0.003 (bf16's 8-bit mantissa); the same layer on AVX512-BF16 alone gives 0.003. So every layer is run once
# on a probe in both types when it is converted, and one off by more than this is kept in float32.
MAX_REDUCED_LAYER_ERROR = 0.05


@dataclass(frozen=True)
class WrongReducedKernel:
    """A layer kept in float32 because its reduced-precision kernel computed wrong results on this device."""

    name: str
    relative_error: float  # mean |reduced - float32| / mean |float32| on the probe

    def __str__(self) -> str:
        return f"{self.name} (relative error {self.relative_error:.2f})"


def convert_matrix_weights(
    module: nn.Module, dtype: torch.dtype, keep: tuple[nn.Module, ...] = (), name: str = ""
) -> list[WrongReducedKernel]:
    """Convert the weights and biases of `module`'s matrix layers (linear, conv) to `dtype`, in place, once.

    Autocast would otherwise re-cast every float32 weight on every call. Norm gains, learned activations (Snake's
    alpha) and buffers (RoPE tables, time-embedding frequencies, windows) stay float32, and so does every layer inside
    a module of `keep`. A layer whose reduced kernel computes wrong results here stays float32 too: returned, named
    below `name`.
    """
    kept = {id(layer) for parent in keep for layer in parent.modules()}
    wrong = []
    for layer_name, layer in module.named_modules(prefix=name):
        if isinstance(layer, _MATRIX_LAYERS) and id(layer) not in kept:
            error = _convert_checked(layer, dtype)
            if error > MAX_REDUCED_LAYER_ERROR:
                _keep_float32(layer)
                wrong.append(WrongReducedKernel(layer_name, error))
    return wrong


def _convert_checked(layer: nn.Module, dtype: torch.dtype) -> float:
    """Convert `layer` to `dtype`; its mean relative error against float32 on a random probe, under autocast.

    Only the probe runs in inference mode: parameters converted inside it would become inference tensors.
    """
    weight = next(layer.parameters())
    probe = _probe(layer).to(weight.device)
    with torch.inference_mode(), full_precision(weight.device):
        reference = layer(probe)
    layer.to(dtype)
    with torch.inference_mode(), torch.autocast(weight.device.type, dtype=dtype):
        reduced = layer(probe).float()
    scale = float(reference.abs().mean())
    return float((reduced - reference).abs().mean()) / scale if scale > 0 else 0.0


def _probe(layer: nn.Module) -> Tensor:
    """A random input the layer accepts, a little longer than its kernel reaches (seeded: the check is repeatable)."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        return torch.randn(8, layer.in_features, generator=generator)
    assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d)
    reach = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    return torch.randn(1, layer.in_channels, *(r + 32 for r in reach), generator=generator)


def _keep_float32(layer: nn.Module) -> None:
    """Weights back to float32, and the layer computes in float32 inside autocast (its output is float32)."""
    layer.float()
    forward = layer.forward
    device_type = next(layer.parameters()).device.type

    def float32_forward(*inputs: Tensor) -> Tensor:
        with torch.autocast(device_type, enabled=False):
            return forward(*(tensor.float() for tensor in inputs))

    layer.forward = float32_forward  # this one instance only, set once at conversion


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
