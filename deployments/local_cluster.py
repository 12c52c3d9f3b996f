"""A local Ray cluster that mirrors the real one, on CPU: watch the service scale before paying for GPUs.

Ray's fake multi-node provider starts a real raylet for every node the real autoscaler decides to launch, all on this
machine. The node types, their resources and min/max workers come from cluster.yaml (the head offers no CPU, so no
replica lands there; `ingress` nodes offer the `ingress` resource; `gpu` nodes one fake GPU); the application is
the production Serve config (deployments/production.py), made to run here: the converter on the CPU with the tiny
test bundle (or SEEDVC_MODEL), delays shortened. Replicas still ask for what production asks (a Converter 4 CPUs and
1 GPU), so every Converter replica brings a `gpu` node, and an idle one is terminated.

    .venv/bin/python -m deployments.local_cluster up        # head, ingress node, one gpu node; deploys; prints a key
    .venv/bin/python -m deployments.local_cluster status    # nodes by type and the replicas on each
    .venv/bin/python -m deployments.local_cluster down      # stops every process this cluster started

Private by construction: its own --temp-dir and non-default ports (GCS 6390, HTTP 8300, dashboard 8266 on
127.0.0.1), and it stops only the processes it started (never `ray stop`, which ends every Ray on the machine).
Facts this rests on (Ray 2.60): the wheel lacks the provider's example config, so the provider is named as an
`external` module; its raylets carry no auth token, so the cluster runs with RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from app.environment import API_KEYS, LOCAL_CLUSTER_MARKER, TOKEN_SECRET, VOICE_STORE
from app.processes import descendants, parent_pids
from deployments.production import CLUSTER_CONFIG, ROOT, deployments_of, load_yaml, production_serve_config

FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_TYPE = "ray.head.default"  # the provider tags its head with this type name
NODE_ID_VARIABLE = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # every process of a fake worker node carries its node id
MARKER = LOCAL_CLUSTER_MARKER  # every process of this cluster inherits it: how `down` finds them
HEAD_RESOURCE = "node:__internal_head__"
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # per node; Ray's minimum is 75 MiB, and nothing large goes through it
DEFAULT_DIR = Path("/tmp/seedvc-local-cluster")
LOG_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
TINY_MODEL = ROOT / "tests" / "fixtures" / "parity_a" / "model"


@dataclass
class Ports:
    gcs: int = 6390
    http: int = 8300
    dashboard: int = 8266
    client_server: int = 23001  # outside Ray's worker ports (10002-19999)
    dashboard_agent: int = 52465


@dataclass
class Sizing:
    """What the local cluster changes in cluster.yaml's node types and the production config's scaling."""

    idle_timeout_minutes: float = 0.5
    max_workers: dict[str, int] = field(default_factory=dict)  # caps per node type (this machine's cores)
    converter_max_replicas: int | None = None  # None: the production config's
    sessions_per_replica: float | None = None  # None: the production config's
    upscale_delay_s: float = 1.0
    downscale_delay_s: float = 5.0
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 0.5
    # Headroom (deployments/autoscaling.py): a fake gpu node's replica serves ~10 s after it is requested.
    headroom_sessions: float = 0.0
    open_rate_lead_s: float = 10.0


def resource_flags(resources: dict[str, float]) -> list[str]:
    """`ray start` flags for a node type's resources."""
    rest = {name: amount for name, amount in resources.items() if name not in ("CPU", "GPU")}
    flags = [f"--num-cpus={int(resources.get('CPU', 0))}", f"--num-gpus={int(resources.get('GPU', 0))}"]
    return [*flags, f"--resources={json.dumps(rest)}"] if rest else flags


def fake_autoscaler_config(cluster: dict[str, Any], gcs_address: str, sizing: Sizing) -> dict[str, Any]:
    """cluster.yaml's node types on the fake provider: the same resources and min/max workers (capped by `sizing`),
    no cloud settings, the head renamed to the type the provider gives it."""
    types: dict[str, Any] = {}
    for name, node in cluster["available_node_types"].items():
        resources = {**node["resources"], "object_store_memory": OBJECT_STORE_BYTES}
        head = name == cluster["head_node_type"]
        limit = node.get("max_workers", 0)
        types[FAKE_HEAD_TYPE if head else name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": 0 if head else node.get("min_workers", 0),
            "max_workers": 0 if head else min(limit, sizing.max_workers.get(name, limit)),
        }
    return {
        "cluster_name": f"{cluster['cluster_name']}-local",
        "max_workers": sum(node["max_workers"] for node in types.values()),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": sizing.idle_timeout_minutes,
        "provider": {
            "type": "external",
            "module": FAKE_PROVIDER,
            "gcs_address": gcs_address,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ray"},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def local_serve_config(
    http_port: int, voices: Path, sizing: Sizing, model: Path = TINY_MODEL, identity: bool = False
) -> dict[str, Any]:
    """The production config (deployments/production.py) as this machine runs it: converters on the CPU (one torch
    thread, exact fp32) with `model`, voices in a local directory every node shares (production: a bucket), Serve's
    HTTP proxy on the head only (all fake nodes share one IP, and with a proxy on every node a connection could enter
    through a gpu node's, which a load balancer never targets), scaling delays shortened. Resource asks stay."""
    config = production_serve_config()
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    [app] = config["applications"]
    app["args"]["converter"].update(
        model=str(model), device="cpu", precision="fp32", torch_threads=1, voice_store=str(voices), identity=identity
    )
    # Until the ingress has measured a replica start, a caller refused during a scale-up is told to wait about as long
    # as a new gpu node takes to serve here.
    app["args"]["ingress"].update(voice_store=str(voices), scale_up_estimate_s=sizing.open_rate_lead_s)
    converter = deployments_of(config)["Converter"]
    scaling = converter["autoscaling_config"]
    scaling.update(
        upscale_delay_s=sizing.upscale_delay_s,
        downscale_delay_s=sizing.downscale_delay_s,
        look_back_period_s=sizing.look_back_period_s,
        metrics_interval_s=sizing.metrics_interval_s,
    )
    if sizing.converter_max_replicas is not None:
        scaling["max_replicas"] = sizing.converter_max_replicas
    policy = scaling["policy"]["policy_kwargs"]
    policy.update(
        headroom_sessions=sizing.headroom_sessions,
        open_rate_lead_s=sizing.open_rate_lead_s,
        rate_window_s=sizing.look_back_period_s,
    )
    if sizing.sessions_per_replica is not None:
        policy["sessions_per_replica"] = sizing.sessions_per_replica
    converter["graceful_shutdown_timeout_s"] = 5  # production's 30 s only delays the scale-down here
    return config


@dataclass
class Node:
    node_id: str
    node_type: str  # "head" (cluster.yaml's name) or a worker type


def node_type_of(resources: dict[str, float], cluster: dict[str, Any]) -> str:
    """The cluster.yaml node type whose resources a live node offers (the fake provider's nodes carry no label)."""
    if HEAD_RESOURCE in resources:
        return str(cluster["head_node_type"])
    for name, node in cluster["available_node_types"].items():
        if all(resources.get(resource, 0) == amount for resource, amount in node["resources"].items()):
            return str(name)
    return "unknown"


def pids_where(wanted: dict[str, str]) -> list[int]:
    """Processes whose environment has every variable of `wanted` (reading another user's needs root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        if all(variables.get(name.encode()) == value.encode() for name, value in wanted.items()):
            found.append(int(entry.name))
    return found


def with_descendants(pids: list[int]) -> list[int]:
    return sorted({*pids, *descendants(parent_pids(), *pids)})


def kill_all(pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace_s` (0: SIGKILL at once, as a crashed machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL) if grace_s > 0 else (signal.SIGKILL,):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)


class LocalCluster:
    """One local cluster, kept in `root`: Ray's temp dir, the generated configs, the voices, the API key."""

    def __init__(self, root: Path = DEFAULT_DIR, ports: Ports | None = None) -> None:
        self.root = root
        self.ports = ports or Ports()
        self.cluster = load_yaml(CLUSTER_CONFIG)

    @property
    def gcs_address(self) -> str:
        from ray._private.services import get_node_ip_address  # the address the fake nodes' raylets use too

        return f"{get_node_ip_address()}:{self.ports.gcs}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def api_key(self) -> str:
        return (self.root / "api_key").read_text().strip()

    def environment(self) -> dict[str, str]:
        """What every process of the cluster runs with: production's env file settings, and the fake cluster's."""
        secrets_file = self.root / "secrets.json"
        if not secrets_file.exists():
            key = secrets.token_urlsafe(24)
            secrets_file.write_text(json.dumps({"api_key": key, "token_secret": secrets.token_hex(32)}))
            secrets_file.chmod(0o600)
            (self.root / "api_key").write_text(key + "\n")
            (self.root / "api_key").chmod(0o600)
        saved = json.loads(secrets_file.read_text())
        return {
            **os.environ,
            MARKER: str(self.root),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            API_KEYS: f"local={saved['api_key']}",
            TOKEN_SECRET: saved["token_secret"],
            VOICE_STORE: str(self.root / "voices"),
        }

    def start(self, sizing: Sizing) -> None:
        """The head, with the autoscaler that launches cluster.yaml's worker types as fake nodes."""
        if self.processes():
            raise RuntimeError(f"a local cluster already runs in {self.root}: `down` first")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "voices").mkdir(exist_ok=True)
        autoscaler = self.root / "autoscaler.yaml"
        autoscaler.write_text(yaml.safe_dump(fake_autoscaler_config(self.cluster, self.gcs_address, sizing)))
        head = self.cluster["available_node_types"][self.cluster["head_node_type"]]
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={self.ports.gcs}",
            f"--temp-dir={self.root / 'ray'}",
            f"--autoscaling-config={autoscaler}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.ports.dashboard}",
            f"--ray-client-server-port={self.ports.client_server}",
            f"--dashboard-agent-listen-port={self.ports.dashboard_agent}",
            "--disable-usage-stats",
            *resource_flags(head["resources"]),
        ]
        self._run(command)

    def _run(self, command: list[str]) -> None:
        """A Ray CLI command with the cluster's environment; its output only when it fails (it is long)."""
        done = subprocess.run(command, env=self.environment(), capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def deploy(self, config: dict[str, Any]) -> None:
        """`serve run --non-blocking` of `config` against this cluster, as an operator deploys the production copy."""
        path = self.root / "serve_config.local.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve = str(Path(sys.executable).parent / "serve")
        self._run([serve, "run", "--non-blocking", f"--address={self.gcs_address}", str(path)])

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until GET /readyz answered 200 (a converter answers through the ingress)."""
        started = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{self.base_url}/readyz did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)

    def processes(self) -> list[int]:
        return pids_where({MARKER: str(self.root)})

    def node_processes(self, node_id: str) -> list[int]:
        """Every process of one fake worker node: those that carry its node id (its raylet and agents), and all their
        descendants (the workers that run its replicas)."""
        return with_descendants(pids_where({MARKER: str(self.root), NODE_ID_VARIABLE: node_id}))

    def crash_node(self, node_id: str) -> int:
        """Kill every process of a worker node at once, as a machine that fails; returns how many there were."""
        pids = self.node_processes(node_id)
        kill_all(pids, grace_s=0)
        return len(pids)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every process of this cluster (and only those)."""
        for _ in range(3):  # the autoscaler may launch a node while the first round stops the rest
            pids = self.processes()
            if not pids:
                return
            kill_all(pids, grace_s)

    def logged_at(self, log: str, pattern: str, since: float) -> float | None:
        """Wall time of the first line matching `pattern` (a regex) logged at or after `since`, in the log files that
        match the glob `log` under the session's log directory ("monitor.log": the autoscaler; "serve/controller_*":
        Serve's controller). Ray stamps every line with its local time to the millisecond."""
        times = []
        for path in (self.root / "ray" / "session_latest" / "logs").glob(log):
            for line in path.read_text(errors="replace").splitlines():
                stamp = LOG_TIME.search(line)
                if stamp and re.search(pattern, line):
                    when = datetime.strptime(stamp.group(0), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if when >= since:
                        times.append(when)
        return min(times, default=None)

    def scale_up_stages(self, since: float) -> dict[str, float | None]:
        """Seconds from `since` (wall time) to the first scale-up's logged stages: Serve's controller asks for a
        Converter replica, the autoscaler queues a node launch, the provider's launch returns (the node's raylet is
        up), the replica reports started (None: not seen)."""
        stages = {
            "policy wants more": ("serve/controller_*.log", r"SessionAwarePolicy wants [2-9]"),
            "replica requested": ("serve/controller_*.log", r"Upscaling .*Converter"),
            "node requested": ("monitor.log", r"Queue \d+ new nodes for launch"),
            "node launch returned": ("monitor.log", r"Launching \d+ nodes, type gpu"),
            "replica serving": ("serve/controller_*.log", r"Converter.* started successfully"),
        }
        found = {name: self.logged_at(log, pattern, since) for name, (log, pattern) in stages.items()}
        return {name: None if when is None else when - since for name, when in found.items()}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.dashboard}"

    def nodes(self) -> list[Node]:
        """The cluster's live nodes, from Ray's state API (through the head's dashboard: no driver joins the cluster,
        so killing a node never kills the caller)."""
        from ray.util.state import list_nodes

        # (Ray counts the filtered-out dead nodes as "missing output": not an error here.)
        alive = list_nodes(
            address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
        )
        return [Node(node.node_id, node_type_of(node.resources_total, self.cluster)) for node in alive]

    def replicas_by_node(self) -> dict[str, list[str]]:
        """Live Serve replicas' deployment names ("Ingress", "Converter") by node id."""
        from ray.util.state import list_actors

        placed: dict[str, list[str]] = {}
        alive = list_actors(
            address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
        )
        for actor in alive:
            name = actor.name or ""
            if name.startswith("SERVE_REPLICA::"):
                placed.setdefault(actor.node_id or "", []).append(name.split("#")[1])
        return placed

    def describe(self) -> str:
        """One line per node: its type, id and replicas (what `status` prints)."""
        placed = self.replicas_by_node()
        lines = [
            f"{node.node_type:>8}  {node.node_id[:12]}  {', '.join(sorted(placed.get(node.node_id, []))) or '-'}"
            for node in sorted(self.nodes(), key=lambda n: (n.node_type, n.node_id))
        ]
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the cluster keeps its files")
    parser.add_argument("--http-port", type=int, default=Ports.http)
    parser.add_argument("--gcs-port", type=int, default=Ports.gcs)
    parser.add_argument("--dashboard-port", type=int, default=Ports.dashboard)
    parser.add_argument("--idle-timeout-minutes", type=float, default=Sizing.idle_timeout_minutes)
    parser.add_argument("--gpu-nodes", type=int, default=3, help="the gpu type's max_workers here (cluster.yaml: 8)")
    parser.add_argument("--sessions-per-replica", type=float, default=2, help="the policy's (production: 24)")
    parser.add_argument("--identity", action="store_true", help="converters return their input (many more sessions)")
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    args = parser.parse_args()
    ports = Ports(gcs=args.gcs_port, http=args.http_port, dashboard=args.dashboard_port)
    cluster = LocalCluster(args.dir.resolve(), ports)
    if args.command == "down":
        cluster.stop()
        print(f"stopped the local cluster in {cluster.root}")
        return
    if args.command == "status":
        print(cluster.describe())
        return
    sizing = Sizing(
        idle_timeout_minutes=args.idle_timeout_minutes,
        max_workers={"gpu": args.gpu_nodes},
        converter_max_replicas=args.gpu_nodes,
        sessions_per_replica=args.sessions_per_replica,
    )
    cluster.start(sizing)
    cluster.deploy(local_serve_config(ports.http, cluster.root / "voices", sizing, args.model, args.identity))
    ready_s = cluster.wait_ready()
    print(
        f"serving at {cluster.base_url} ({ready_s:.0f} s after the deploy); API key: {cluster.api_key}\n"
        f"ray: {cluster.gcs_address}, dashboard http://127.0.0.1:{ports.dashboard}\n"
        f"watch it: watch -n 2 .venv/bin/python -m deployments.local_cluster status --dir {cluster.root}"
    )


if __name__ == "__main__":
    main()
