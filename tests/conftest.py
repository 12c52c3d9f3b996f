from __future__ import annotations

import pytest
import torch

from tests.parity import ParitySet, parity_sets

# Parity is defined in float32 with no reduced-precision matmuls (parity README, section 10).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session", params=parity_sets(), ids=lambda s: s.root.name)
def parity(request: pytest.FixtureRequest) -> ParitySet:
    return request.param
