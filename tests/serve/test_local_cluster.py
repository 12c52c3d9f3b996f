"""The cluster, exercised: cluster.yaml's node types under Ray's real autoscaler (its fake multi-node provider starts a
real raylet per node, on this machine), the production Serve config deployed on them (deployments/local_cluster.py),
real streams through the ingress. The head gets no replica, min_workers brings the ingress node, sessions past one
replica's share bring Converter replicas and gpu nodes up to the node type's max, and after the load the extra
replica goes and its idle gpu node is terminated, while the ingress stays. A node that crashes (every process killed
at once) costs no session: a gpu node's sessions go on on the survivor, an ingress node's clients resume on the other
ingress; each node is replaced. Figures are printed (`-s`).

Converters run in identity mode with the tiny fixture bundle loaded: the placement and scaling are under test, and
real-time sessions of the model on two cores beside four raylets would not keep up. Like every Serve test, it runs in a
private network namespace (unshare -n); its ports differ from the other Serve tests' anyway.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.harness import ServeApp
from bench.parity import ParitySet
from client.api import get_token, upload_voice
from deployments.local_cluster import LocalCluster, Ports, Sizing, local_serve_config
from deployments.production import deployments_of
from tests.serve.test_autoscaling import Session, wait_for
from tests.serve.test_resilience import block_indexes_by_session

pytestmark = pytest.mark.serve

GPU_NODES = 2  # the gpu type's max_workers here (cluster.yaml: 8; two cores hold two fake gpu nodes)
SESSIONS_PER_REPLICA = 2
SIZING = Sizing(
    idle_timeout_minutes=0.1,
    max_workers={"gpu": GPU_NODES},
    # One more than the gpu nodes: the node type's max, not Serve's, is what stops the scale-up.
    converter_max_replicas=GPU_NODES + 1,
    sessions_per_replica=SESSIONS_PER_REPLICA,
)
PORTS = Ports(gcs=6391, http=8301, dashboard=8267, client_server=23002, dashboard_agent=52466)
# Issue 18's target for a node crash is 1 s, as for a replica kill; a session that waited for Serve's controller to
# drop the dead replica showed ~10 s. Bounded loosely here (a shared 2-core machine), printed exactly.
CRASH_GAP_BOUND_MS = 3000.0


@pytest.fixture(scope="module")
def cluster(parity: ParitySet) -> Iterator[tuple[LocalCluster, ServeApp]]:
    # Under /tmp, short: Ray's socket paths live in the temp dir and must stay under the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="seedvc-cluster-", dir="/tmp"))
    local = LocalCluster(root, PORTS)
    try:
        local.start(SIZING)
        local.deploy(local_serve_config(PORTS.http, root / "voices", SIZING, parity.model_dir, identity=True))
        ready_s = local.wait_ready()
        print(f"\nlocal cluster serving {ready_s:.1f} s after the deploy")
        token = get_token(local.base_url, local.api_key)
        voice = upload_voice(local.base_url, token, parity.root / parity.bundle["files"]["reference_22k"], name="v")
        yield local, ServeApp(parity=parity, token=token, voice_id=voice["voice_id"], base_url=local.base_url)
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


def node_counts(local: LocalCluster) -> Counter[str]:
    return Counter(node.node_type for node in local.nodes())


def replicas_by_type(local: LocalCluster) -> dict[str, Counter[str]]:
    """Node type -> how many replicas of each deployment run on nodes of that type."""
    types = {node.node_id: node.node_type for node in local.nodes()}
    placed: dict[str, Counter[str]] = {}
    for node_id, replicas in local.replicas_by_node().items():
        placed.setdefault(types.get(node_id, "gone"), Counter()).update(replicas)
    return placed


def sorted_stages(stages: dict[str, float | None]) -> list[tuple[str, float | None]]:
    return sorted(stages.items(), key=lambda item: float("inf") if item[1] is None else item[1])


def at_gpu_nodes(local: LocalCluster) -> int:
    """Converter replicas running on gpu nodes."""
    return replicas_by_type(local).get("gpu", Counter())["Converter"]


def at_rest(local: LocalCluster) -> bool:
    """The head, the ingress node min_workers asks for, and one gpu node for the one Converter min_replicas asks for;
    each replica on its node type, none on the head."""
    return node_counts(local) == Counter(head=1, ingress=1, gpu=1) and replicas_by_type(local) == {
        "ingress": Counter(Ingress=1),
        "gpu": Counter(Converter=1),
    }


def test_sessions_bring_gpu_nodes_up_to_the_types_max_and_idle_ones_go(cluster: tuple[LocalCluster, ServeApp]) -> None:
    local, app = cluster
    wait_for(lambda: at_rest(local), "the cluster at rest", [])
    opened, opened_at = time.time(), time.monotonic()
    sessions = [Session(app, seed) for seed in range(2 * SESSIONS_PER_REPLICA + 1)]
    joined_s = wait_for(lambda: len(nodes_of(local, "gpu")) == GPU_NODES, "a second gpu node", sessions)
    replica_s = joined_s + wait_for(lambda: at_gpu_nodes(local) == GPU_NODES, "its converter", sessions)
    # The policy asks for one replica more than there are gpu nodes: none may come, and nothing lands elsewhere.
    time.sleep(5.0)
    assert node_counts(local) == Counter(head=1, ingress=1, gpu=GPU_NODES)
    assert replicas_by_type(local) == {"ingress": Counter(Ingress=1), "gpu": Counter(Converter=GPU_NODES)}
    for session in sessions:
        session.stop()
    for session in sessions:
        session.went_on()
        result = session.call.result
        assert result is not None and result.end is not None
        assert result.end["blocks"] == session.call.blocks, "every block sent was answered"
    scale_down_s = wait_for(lambda: at_rest(local), "the idle gpu node to go", [])
    dropped_ms = sum(s.call.result.end["dropped_ms"] for s in sessions if s.call.result and s.call.result.end)
    converting_s = max(min(s.call.audio_times) for s in sessions) - opened_at  # the last one's first audio
    stages = {
        **local.scale_up_stages(opened),
        "all sessions converting": converting_s,
        "node joined": joined_s,
        "replica actor alive": replica_s,
    }
    timeline = ", ".join(f"{name} {'-' if at is None else f'{at:.1f}'} s" for name, at in sorted_stages(stages))
    print(
        f"\n{len(sessions)} sessions opened at once: {timeline}; back to one gpu node {scale_down_s:.1f} s after "
        f"they ended; input dropped in all: {dropped_ms} ms"
    )


def audio_since(session: Session, since: float) -> int:
    return sum(1 for arrived in session.call.audio_times if arrived > since)


def nodes_of(local: LocalCluster, node_type: str) -> set[str]:
    return {node.node_id for node in local.nodes() if node.node_type == node_type}


@dataclass
class Crash:
    """A node killed whole under live sessions: what it cost them, and when the cluster had replaced it."""

    killed: int  # processes
    gaps_ms: list[float]  # each session's longest gap in the audio around the crash, sorted
    going_on_s: float  # from the crash until every session it hit had 20 packets more
    replaced_s: float  # from the crash until `replaced` held


def crash(
    local: LocalCluster, node: str, hit: list[Session], every: list[Session], serving: Callable[[], bool]
) -> Crash:
    """Kills every process of `node` at once, as a machine that fails; waits until the sessions it `hit` go on and a
    new node of its type has joined and `serving` holds again."""
    [node_type] = {n.node_type for n in local.nodes() if n.node_id == node}
    crashed_at = time.monotonic()
    killed = local.crash_node(node)
    assert killed > 0
    wait_for(lambda: all(audio_since(s, crashed_at) >= 20 for s in hit), "the sessions to go on", every)
    going_on_s = time.monotonic() - crashed_at
    wait_for(lambda: node not in nodes_of(local, node_type) and serving(), "a replacement node", every)
    gaps_ms = sorted(s.call.longest_gap_ms_between(crashed_at - 1, time.monotonic()) for s in every)
    return Crash(killed, gaps_ms, going_on_s, time.monotonic() - crashed_at)


def test_a_gpu_node_crash_moves_its_sessions_to_the_survivor_and_the_node_is_replaced(
    cluster: tuple[LocalCluster, ServeApp],
) -> None:
    local, app = cluster
    wait_for(lambda: at_rest(local), "the cluster at rest", [])
    [first] = nodes_of(local, "gpu")
    early = [Session(app, seed) for seed in range(SESSIONS_PER_REPLICA + 1)]

    def two_nodes_convert() -> bool:
        return len(nodes_of(local, "gpu")) == GPU_NODES and at_gpu_nodes(local) == GPU_NODES

    wait_for(two_nodes_convert, "a second node", early)
    [second] = nodes_of(local, "gpu") - {first}
    # Opened now, these go to the emptier converter: the second node's.
    late = [Session(app, seed) for seed in range(10, 12)]
    wait_for(lambda: all(s.call.blocks >= 5 for s in early + late), "every session to run", early + late)
    crashed = crash(local, second, late, early + late, two_nodes_convert)
    for session in early + late:
        session.stop()
    for session in early + late:
        session.went_on()
    print(
        f"\ngpu node crash ({crashed.killed} processes killed): worst gap per session "
        f"{[round(g) for g in crashed.gaps_ms]} ms; a replacement converter on a new gpu node "
        f"{crashed.replaced_s:.1f} s after the crash"
    )
    assert crashed.gaps_ms[-1] < CRASH_GAP_BOUND_MS
    wait_for(lambda: at_rest(local), "the idle gpu node to go", [])


def ingress_replicas(local: LocalCluster) -> int:
    """Ingress replicas running on ingress nodes."""
    return replicas_by_type(local).get("ingress", Counter())["Ingress"]


def test_an_ingress_node_crash_its_clients_resume_on_another_ingress_and_the_node_is_replaced(
    cluster: tuple[LocalCluster, ServeApp],
) -> None:
    """Last in the module: it leaves two Ingress replicas deployed."""
    local, app = cluster
    wait_for(lambda: at_rest(local), "the cluster at rest", [])
    [first] = nodes_of(local, "ingress")
    sessions = [Session(app, seed) for seed in range(20, 22)]  # all through the only ingress
    # Two Ingress replicas, as a deployment that must survive an ingress node runs (production's min is 1: its
    # clients would wait for a new node): the autoscaler brings a second ingress node for the second replica.
    config = local_serve_config(PORTS.http, local.root / "voices", SIZING, app.parity.model_dir, identity=True)
    deployments_of(config)["Ingress"]["autoscaling_config"]["min_replicas"] = 2
    local.deploy(config)
    wait_for(lambda: ingress_replicas(local) == 2, "a second ingress on a second node", sessions)
    wait_for(lambda: all(s.call.blocks >= 5 for s in sessions), "every session to run", sessions)
    crashed = crash(local, first, sessions, sessions, lambda: ingress_replicas(local) == 2)
    for session in sessions:
        session.stop()
    for session in sessions:
        call = session.call
        assert call.failure is None and call.result is not None, call.failure
        assert call.result.error is None and call.result.end is not None, call.result.error
        # The same session, resumed (not a new one): the converter held it while its client found another ingress.
        assert call.result.resumes >= 1 and call.result.restarts == 0
        assert {e["session_id"] for e in call.events if e["type"] == "ready"} == {call.session_id}
        for indexes in block_indexes_by_session(call.events):
            assert indexes == sorted(set(indexes)), "blocks out of order"
    print(
        f"\ningress node crash ({crashed.killed} processes killed) under {len(sessions)} sessions: each resumed on "
        f"the other ingress, worst gap per session {[round(g) for g in crashed.gaps_ms]} ms, all going on "
        f"{crashed.going_on_s:.1f} s after the crash; a replacement ingress on a new node {crashed.replaced_s:.1f} s "
        "after the crash"
    )
