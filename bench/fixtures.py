"""Where the parity fixture sets live (format: tests/fixtures/parity_a/README.md), for the benchmarks and the tests.

Standard library only: bench/gpu_check.py imports it before its smoke test has checked that numpy and torch exist.
The fixtures are data in the checkout, not in an installed wheel: benchmarks and tests run from the repository.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PARITY_A = FIXTURES / "parity_a"  # the tiny random-weight model, its inputs and upstream's outputs
PARITY_A_SOURCE = PARITY_A / "inputs" / "source_16k.wav"
PARITY_A_REFERENCE = PARITY_A / "inputs" / "reference_22k.wav"
