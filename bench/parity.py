"""Access to a Seed-VC parity fixture set (format: tests/fixtures/parity_a/README.md).

Tests read every number they need (settings, geometry, tolerances) from the set itself, so any other set in the
same format passes with no code change. The serving benchmarks read their tiny model and inputs through it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile
import torch

from bench.fixtures import FIXTURES

Kind = Literal["stage", "e2e"]


@dataclass(frozen=True)
class ParitySet:
    root: Path

    @cached_property
    def bundle(self) -> dict[str, Any]:
        return json.loads((self.root / "bundle.json").read_text())

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "expected_meta.json").read_text())

    @cached_property
    def expected(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "expected.npz") as npz:
            return {name: npz[name] for name in npz.files}

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def settings(self) -> dict[str, Any]:  # JSON numbers: diffusion_steps is an int, the times are floats
        return self.bundle["stream_settings"]

    @property
    def geometry(self) -> dict[str, Any]:
        return self.bundle["geometry"]

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.expected[name].copy())

    def wav(self, key: str) -> np.ndarray:
        """A fixture WAV (mono float32, read bit-exact) by its `files` key in bundle.json."""
        data, _ = soundfile.read(self.root / self.bundle["files"][key], dtype="float32")
        return data

    def tolerance(self, name: str, kind: Kind) -> float:
        return float(self.meta["arrays"][name][f"atol_{kind}"])

    def max_error(self, name: str, actual: torch.Tensor | np.ndarray, index: int | None = None) -> float:
        expected = self.expected[name] if index is None else self.expected[name][index]
        actual_np = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
        assert actual_np.shape == expected.shape, f"{name}: shape {actual_np.shape} != {expected.shape}"
        return float(np.max(np.abs(actual_np.astype(np.float64) - expected.astype(np.float64)), initial=0.0))

    def assert_close(self, name: str, actual: torch.Tensor | np.ndarray, kind: Kind, index: int | None = None) -> None:
        error = self.max_error(name, actual, index)
        atol = self.tolerance(name, kind)
        where = name if index is None else f"{name}[{index}]"
        assert error <= atol, f"{where}: max abs error {error:.3g} > atol_{kind} {atol:.3g}"


def parity_sets() -> list[ParitySet]:
    return [ParitySet(path) for path in sorted(FIXTURES.glob("parity_*")) if (path / "bundle.json").exists()]
