from __future__ import annotations

import pytest

from app.environment import browser_tests_enabled
from app.model.seedvc import SeedVC
from app.voices.store import VoiceStore
from bench.parity import ParitySet, parity_sets

# Browser tests need a loopback-only network namespace entered before Ray starts: scripts/test runs them as their own
# pytest invocation inside one (SEEDVC_BROWSER_TESTS=1); every other run leaves them out.
collect_ignore = [] if browser_tests_enabled() else ["browser"]


@pytest.fixture(scope="session", params=parity_sets(), ids=lambda s: s.root.name)
def parity(request: pytest.FixtureRequest) -> ParitySet:
    return request.param


@pytest.fixture(scope="session")
def model(parity: ParitySet) -> SeedVC:
    """The fixture set's tiny model, loaded once per test run."""
    return SeedVC.load(parity.model_dir)


@pytest.fixture(scope="module")
def voice_ids(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """A voice store directory with two voices of the key "k": the fixture's reference, and its source."""
    root = str(tmp_path_factory.mktemp("voices"))
    store = VoiceStore(root)
    reference = (parity.root / parity.bundle["files"]["reference_22k"]).read_bytes()
    source = (parity.root / parity.bundle["files"]["source_16k"]).read_bytes()
    return root, [store.add(reference, owner="k").voice_id, store.add(source, owner="k").voice_id]
