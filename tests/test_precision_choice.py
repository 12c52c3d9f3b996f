"""The precision setting: what `auto` chooses on which hardware, and what choosing does to the model."""

from __future__ import annotations

import pytest
import torch

from app.model.dit import TransformerBlock
from app.model.precision import DeviceCapabilities, Precision, resolve
from app.model.seedvc import SeedVC
from bench.parity import ParitySet


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        (DeviceCapabilities("cpu", cpu_bf16=True), Precision.BF16),
        (DeviceCapabilities("cpu", cpu_bf16=False), Precision.FP32),
        (DeviceCapabilities("cuda", cuda_capability=(9, 0)), Precision.BF16),
        (DeviceCapabilities("cuda", cuda_capability=(8, 6)), Precision.BF16),
        (DeviceCapabilities("cuda", cuda_capability=(7, 5)), Precision.FP16),
        (DeviceCapabilities("cuda", cuda_capability=(6, 1)), Precision.FP32),
    ],
)
def test_auto_picks_the_fast_type_the_hardware_has(capabilities: DeviceCapabilities, expected: Precision) -> None:
    choice = resolve("auto", capabilities)
    assert choice.precision is expected
    assert choice.reason.startswith("auto:")


@pytest.mark.parametrize("asked", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_taken_as_asked(asked: str) -> None:
    assert resolve(asked, DeviceCapabilities("cpu", cpu_bf16=False)).precision is Precision(asked)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError):
        resolve("int8", DeviceCapabilities("cpu"))


def test_fp32_turns_tf32_off(parity: ParitySet) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    SeedVC.load(parity.model_dir, precision="fp32")
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_reduced_precision_converts_matrix_weights_once_and_keeps_f0_and_tables_float32(parity: ParitySet) -> None:
    model = SeedVC.load(parity.model_dir, precision="bf16")
    assert model.precision is Precision.BF16
    layer = model.dit.transformer.layers[0]
    assert isinstance(layer, TransformerBlock)
    assert layer.attention.wqkv.weight.dtype == torch.bfloat16
    assert model.vocoder.conv_pre.weight.dtype == torch.bfloat16
    assert next(model.content_encoder.parameters()).dtype in (torch.float32, torch.bfloat16)
    # Accuracy-critical parts and buffers stay float32 (app/model/precision.py says why).
    assert model.vocoder.f0_predictor.classifier.weight.dtype == torch.float32
    assert model.vocoder.m_source.l_linear.weight.dtype == torch.float32
    assert model.dit.transformer.rope.dtype == torch.float32
    assert model.dit.t_embedder.freqs.dtype == torch.float32
    assert model.length_regulator.content_in_proj.weight.dtype == torch.float32
    # Going back would need the float32 weights, which are gone: refused, not silently degraded.
    with pytest.raises(ValueError, match="load it again"):
        model.set_precision("fp32")
