from __future__ import annotations

import os

import pytest
import torch

from app.model.seedvc import SeedVC
from tests.parity import ParitySet, parity_sets

# Browser tests need a loopback-only network namespace entered before Ray starts: scripts/test runs them as their own
# pytest invocation inside one (SEEDVC_BROWSER_TESTS=1); every other run leaves them out.
collect_ignore = [] if os.environ.get("SEEDVC_BROWSER_TESTS") == "1" else ["browser"]

# Parity is defined in float32 with no reduced-precision matmuls (parity README, section 10).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session", params=parity_sets(), ids=lambda s: s.root.name)
def parity(request: pytest.FixtureRequest) -> ParitySet:
    return request.param


@pytest.fixture(scope="session")
def model(parity: ParitySet) -> SeedVC:
    """The fixture set's tiny model, loaded once per test run."""
    return SeedVC.load(parity.model_dir)
