"""cluster.yaml and the Dockerfile, checked offline.

The cluster file goes through what `ray up` does to it before it touches the cloud: `prepare_config` fills in the AWS
provider's defaults (`fillout_defaults` reads Ray's own `aws/defaults.yaml`; no boto3, no credentials), merges the
setup commands and checks the docker section, then `validate_config` checks the result against Ray's JSON schema
(`ray/autoscaler/ray-schema.json`, which refuses unknown keys) and Ray's own cross-field rules. Only after this does
`ray up` need boto3 and credentials (for instance types, IAM, security groups): that part cannot be checked here.

The rest checks what the schema cannot: replicas can be placed where they are meant to go and nowhere else, the image
the cluster runs is the one the Dockerfile builds, and the Dockerfile's Ray and Python are the ones the project pins.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import fillout_defaults, prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs
from deployments.production import GPU_SERVE_CONFIG, INGRESS_RESOURCE, deployments_of, production_serve_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TURN_TEMPLATE = ROOT / "deploy" / "turnserver.conf"
ENV_FILE = "/home/ray/seedvc.env"  # where file_mounts puts the secrets file on every node


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load(CLUSTER)


@pytest.fixture(scope="module")
def prepared(cluster: dict[str, Any]) -> dict[str, Any]:
    return prepare_config(copy.deepcopy(cluster))


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def requirement_pin(name: str) -> str:
    """The exact version requirements.txt pins for `name` (extras allowed: ray[serve]==2.60.0)."""
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==(\S+)\s*$", text, re.MULTILINE)
    assert match, f"requirements.txt pins no exact version of {name}"
    return match.group(1)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def base_image(dockerfile: str) -> re.Match[str]:
    match = re.search(r"^FROM rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>\d)(?P<minor>\d+)-gpu\s*$", dockerfile, re.M)
    assert match, "the Dockerfile must build FROM rayproject/ray:<ray>-py<python>-gpu"
    return match


def built_image(dockerfile: str) -> str:
    """The name:tag the Dockerfile's header says to build."""
    match = re.search(r"docker build -t (\S+) \.", dockerfile)
    assert match, "the Dockerfile's header must show its `docker build -t NAME:TAG .` command"
    return match.group(1)


def node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["available_node_types"]


def gpu_types(config: dict[str, Any]) -> list[str]:
    return [name for name, node in node_types(config).items() if node["resources"].get("GPU", 0) >= 1]


def actor_demand(deployment: dict[str, Any]) -> dict[str, float]:
    """The resources one replica asks Ray for, from its ray_actor_options (Serve's default is 1 CPU)."""
    options = deployment.get("ray_actor_options", {})
    demand = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    return {name: amount for name, amount in demand.items() if amount}


def fits(demand: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(name, 0) >= amount for name, amount in demand.items())


def gpu_deployments() -> dict[str, dict[str, Any]]:
    (app,) = load(GPU_SERVE_CONFIG)["applications"]
    return {deployment["name"]: deployment for deployment in app["deployments"]}


def ingress_with_override() -> dict[str, Any]:
    """The production config's Ingress (deployments/production.py: the documented `resources: {ingress: 1}`)."""
    return deployments_of(production_serve_config())["Ingress"]


# -- Ray's schema ------------------------------------------------------------------------------------------------


def test_the_schema_is_the_pinned_rays() -> None:
    assert ray.__version__ == requirement_pin("ray"), "validate with the Ray the cluster runs"


def test_cluster_file_passes_rays_schema_after_defaults(prepared: dict[str, Any]) -> None:
    validate_config(prepared)
    # Ray's defaults were filled in around ours, not over them.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_synced_files"] == []
    assert prepared["head_node_type"] == "head"


def test_raw_file_alone_lacks_the_defaulted_keys(cluster: dict[str, Any]) -> None:
    """Why validation runs after the defaults: the file as written omits keys Ray's checks require."""
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(cluster))


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        ((), "max_worker"),  # for max_workers
        (("available_node_types", "gpu"), "max_worker"),
        (("available_node_types", "gpu"), "resource"),
        (("docker",), "imag"),
        (("auth",), "ssh_usr"),
    ],
    ids=lambda value: ".".join(value) if isinstance(value, tuple) else value,
)
def test_a_typo_is_rejected(cluster: dict[str, Any], path: tuple[str, ...], typo: str) -> None:
    broken = copy.deepcopy(cluster)
    section = broken
    for key in path:
        section = section[key]
    section[typo] = 1
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_config(fillout_defaults(broken))


def test_setup_commands_replace_rays_defaults(cluster: dict[str, Any], prepared: dict[str, Any]) -> None:
    """Ray's defaults would pip install a nightly Ray wheel and boto3 at every node start; the image has all."""
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert cluster[key] == [], key
    assert not any("pip install" in command for command in prepared["head_setup_commands"])


# -- where replicas go -------------------------------------------------------------------------------------------


def test_head_runs_no_replica(cluster: dict[str, Any]) -> None:
    head = node_types(cluster)[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    for name, deployment in gpu_deployments().items():
        assert not fits(actor_demand(deployment), head["resources"]), f"{name} could land on the head"


def test_gpu_node_type_autoscales_from_zero(cluster: dict[str, Any]) -> None:
    (gpu,) = gpu_types(cluster)
    node = node_types(cluster)[gpu]
    assert node["resources"]["GPU"] == 1
    assert node["min_workers"] == 0 and node["max_workers"] == 8
    assert node["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6"}


def test_converters_fit_gpu_nodes_only_and_all_of_them_fit(cluster: dict[str, Any]) -> None:
    converter = gpu_deployments()["Converter"]
    demand = actor_demand(converter)
    assert demand.get("GPU") == 1
    hosts = [name for name, node in node_types(cluster).items() if fits(demand, node["resources"])]
    assert hosts == gpu_types(cluster)
    (gpu,) = hosts
    per_node = int(node_types(cluster)[gpu]["resources"]["GPU"] // demand["GPU"])
    max_replicas = converter["autoscaling_config"]["max_replicas"]
    assert node_types(cluster)[gpu]["max_workers"] * per_node >= max_replicas


def test_ingress_override_pins_ingress_to_ingress_nodes(cluster: dict[str, Any]) -> None:
    types = node_types(cluster)
    without = actor_demand(gpu_deployments()["Ingress"])
    # Without the override an Ingress could take a GPU node's CPUs (when its Converter is not placed yet).
    assert any(fits(without, types[name]["resources"]) for name in gpu_types(cluster))
    ingress = ingress_with_override()
    hosts = [name for name, node in types.items() if fits(actor_demand(ingress), node["resources"])]
    assert hosts == ["ingress"]
    assert types["ingress"]["min_workers"] >= 1, "the service has no entry point without an ingress node"
    capacity = types["ingress"]["max_workers"] * types["ingress"]["resources"][INGRESS_RESOURCE]
    assert capacity >= ingress["autoscaling_config"]["max_replicas"]


def test_documented_production_overrides_are_valid_serve_config() -> None:
    """docs/production.md's private copy of serve_config.gpu.yaml (deployments/production.py makes it): the Ingress
    resource plus TURN, as Serve and the app's own argument models read them."""
    config = production_serve_config(turn_host="203.0.113.7")
    (app,) = config["applications"]
    assert app["args"]["ingress"]["turn_urls"] == [
        "turn:203.0.113.7:3478?transport=udp",
        "turn:203.0.113.7:3478?transport=tcp",
    ]
    app["args"]["ingress"]["turn_secret"] = "0123456789abcdef" * 4
    parsed = ServeDeploySchema(**config)
    (ingress,) = [d for d in parsed.applications[0].deployments if d.name == "Ingress"]
    assert ingress.ray_actor_options.resources == {INGRESS_RESOURCE: 1}
    assert AppArgs(**app["args"]).ingress.turn_urls


def test_global_max_workers_covers_every_node_type(cluster: dict[str, Any]) -> None:
    workers = [node.get("max_workers", 0) for name, node in node_types(cluster).items() if name != "head"]
    assert cluster["max_workers"] == sum(workers)


# -- the image -----------------------------------------------------------------------------------------------------


def test_cluster_runs_the_image_the_dockerfile_builds(cluster: dict[str, Any], dockerfile: str) -> None:
    image = cluster["docker"]["image"]
    name = built_image(dockerfile)
    assert image.endswith("/" + name), f"{image} is not a registry copy of {name}"
    assert name == f"seedvc-serve:{pyproject()['project']['version']}", "the image tag is the package version"


def test_dockerfile_ray_and_python_match_the_pins(dockerfile: str) -> None:
    base = base_image(dockerfile)
    assert base["ray"] == requirement_pin("ray")
    python = f"{base['major']}.{base['minor']}"
    assert python == "3.11"
    # The image runs the oldest Python the package admits: the one ruff and mypy target, and the one CI tests.
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(python)
    assert not SpecifierSet(pyproject()["project"]["requires-python"]).contains("3.10")
    assert pyproject()["tool"]["mypy"]["python_version"] == python
    assert pyproject()["tool"]["ruff"]["target-version"] == f"py{base['major']}{base['minor']}"


def test_dockerfile_installs_the_pins_and_the_package(dockerfile: str) -> None:
    assert re.search(r"^COPY .*requirements\.txt", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*-r requirements\.txt", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*--no-deps -e \.\s*$", dockerfile, re.M)
    # Every extra package is pinned exactly too.
    extras = re.search(r"-r requirements\.txt (.*)$", dockerfile, re.M)
    assert extras and all("==" in package for package in extras.group(1).split())
    # s3fs follows fsspec's calendar version: the same release, or they do not install together.
    assert "s3fs==" + requirement_pin("fsspec") in dockerfile


def test_dockerignore_keeps_data_and_secrets_out() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", "tests", "voices", "checkpoints", "*.env", "*.pem", "*.key"} <= ignored


# -- secrets, env file and TURN ----------------------------------------------------------------------------------


def test_every_start_command_sources_the_mounted_env_file(cluster: dict[str, Any]) -> None:
    assert ENV_FILE in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in cluster[key] if "ray start" in command]
        assert start.startswith(f"set -a && . {ENV_FILE} && set +a &&"), key


def test_turn_template_has_no_secret_and_every_placeholder_is_filled(cluster: dict[str, Any]) -> None:
    template = TURN_TEMPLATE.read_text()
    settings = [line for line in template.splitlines() if line and not line.startswith("#")]
    assert "use-auth-secret" in settings
    assert "static-auth-secret=@SEEDVC_TURN_SECRET@" in settings
    mounted = {remote: local for remote, local in cluster["file_mounts"].items()}
    template_path = next(remote for remote, local in mounted.items() if local == "./deploy/turnserver.conf")
    (turn,) = [command for command in cluster["head_start_ray_commands"] if "turnserver" in command]
    assert template_path in turn and "SEEDVC_TURN_SECRET" in turn
    placeholders = set(re.findall(r"@([A-Z_]+)@", "\n".join(settings)))
    filled = set(re.findall(r"s/@([A-Z_]+)@/", turn))
    assert placeholders == filled == {"SEEDVC_TURN_SECRET", "PUBLIC_IP", "PRIVATE_IP", "TURN_PEER_RANGE"}


def test_security_group_opens_turns_ports(cluster: dict[str, Any]) -> None:
    settings = dict(
        line.split("=", 1) for line in TURN_TEMPLATE.read_text().splitlines() if "=" in line and line[0] != "#"
    )
    rules = {
        (rule["IpProtocol"], rule["FromPort"], rule["ToPort"])
        for rule in cluster["provider"]["security_group"]["IpPermissions"]
    }
    port = int(settings["listening-port"])
    assert {("udp", port, port), ("tcp", port, port)} <= rules
    assert ("udp", int(settings["min-port"]), int(settings["max-port"])) in rules
    assert ("tcp", 8000, 8000) in rules  # Serve's HTTP proxy (http_options.port in the serve configs)


# -- what a key holder can reach through TURN, and who reaches the dashboard and the Serve proxies ----------------

# Addresses no TURN user may relay to: the default VPC (its DNS resolver, any node), other private networks, loopback,
# link-local with EC2's metadata service and DNS, IPv4-mapped and NAT64 forms of those, IPv6 unique-local with EC2's
# IPv6 metadata address, and any public address (no open relay).
FORBIDDEN_PEERS = [
    "172.31.0.2",
    "172.31.40.17",
    "10.0.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "169.254.169.254",
    "169.254.169.253",
    "224.0.0.1",
    "8.8.8.8",
    "::1",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "fd00:ec2::254",
    "fe80::1",
    "2600:1f14::1",
]
EXAMPLE_PEER_RANGE = "172.31.96.0-172.31.99.255"  # an ingress subnet, as docs/production.md and cluster.yaml show


def turn_settings() -> list[tuple[str, str]]:
    """The template's settings as (name, value) in order; a flag has the value ''."""
    lines = [line.strip() for line in TURN_TEMPLATE.read_text().splitlines()]
    return [(name, value) for name, _, value in (line.partition("=") for line in lines if line and line[0] != "#")]


def address_range(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    first, _, last = text.partition("-")
    return ipaddress.ip_address(first), ipaddress.ip_address(last or first)


def in_ranges(address: str, ranges: list[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for text in ranges:
        first, last = address_range(text)
        if first.version == ip.version and int(first) <= int(ip) <= int(last):
            return True
    return False


def relayable(address: str, allowed_range: str) -> bool:
    """What coturn decides for a peer: an allowed range wins, then a denied one refuses, else it is relayed."""
    settings = turn_settings()
    allowed = [value for name, value in settings if name == "allowed-peer-ip"]
    allowed = [value.replace("@TURN_PEER_RANGE@", allowed_range) for value in allowed]
    denied = [value for name, value in settings if name == "denied-peer-ip"]
    return in_ranges(address, allowed) or not in_ranges(address, denied)


def test_turn_relays_udp_only() -> None:
    names = [name for name, _ in turn_settings()]
    assert "no-tcp-relay" in names, "TCP relaying would reach the dashboard, GCS and the metadata service"
    assert "no-multicast-peers" in names


@pytest.mark.parametrize("address", FORBIDDEN_PEERS)
def test_turn_refuses_peers_outside_the_ingress_range(address: str) -> None:
    assert not relayable(address, EXAMPLE_PEER_RANGE)


def test_turn_allows_exactly_the_configured_ingress_range() -> None:
    allowed = [value for name, value in turn_settings() if name == "allowed-peer-ip"]
    assert allowed == ["@TURN_PEER_RANGE@"]
    assert relayable("172.31.97.12", EXAMPLE_PEER_RANGE)
    assert not relayable("172.31.100.0", EXAMPLE_PEER_RANGE)  # the next subnet: the head's or a GPU node's


def peer_range_check(cluster: dict[str, Any]) -> str:
    (turn,) = [command for command in cluster["head_start_ray_commands"] if "turnserver" in command]
    match = re.search(r'\{ printf %s "\$\{SEEDVC_TURN_PEER_RANGE:-\}".*?exit 1; \}; \}', turn)
    assert match, "the head's start command must check SEEDVC_TURN_PEER_RANGE before it fills the template in"
    return match.group(0)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(EXAMPLE_PEER_RANGE, True), ("", False), ("172.31.0.0/16", False), ("0.0.0.0-255.255.255.255 x", False)],
)
def test_coturn_does_not_start_without_a_peer_range(cluster: dict[str, Any], value: str, accepted: bool) -> None:
    """The check the head runs before starting coturn, run here by bash: a missing or malformed range stops it."""
    check = peer_range_check(cluster)
    result = subprocess.run(
        ["bash", "-c", check], env={"SEEDVC_TURN_PEER_RANGE": value, "PATH": "/usr/bin:/bin"}, capture_output=True
    )
    assert (result.returncode == 0) == accepted, result.stderr


def test_dashboard_listens_on_the_heads_loopback_only(cluster: dict[str, Any]) -> None:
    (start,) = [command for command in cluster["head_start_ray_commands"] if "ray start" in command]
    assert re.findall(r"--dashboard-host[= ](\S+)", start) == ["127.0.0.1"]


def test_port_8000_is_open_to_the_load_balancer_only(cluster: dict[str, Any]) -> None:
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    reaching = [
        rule
        for rule in rules
        if rule["IpProtocol"] in ("tcp", "-1") and rule.get("FromPort", 0) <= 8000 <= rule.get("ToPort", 65535)
    ]
    (rule,) = reaching
    assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges") and not rule.get("PrefixListIds")
    (source,) = rule["UserIdGroupPairs"]
    assert source["GroupId"].startswith("sg-")


def test_the_gpu_config_limits_sessions_per_key_and_turn_allows_them() -> None:
    """A key without its own quota may not fill every GPU; coturn's per-key allocations cover its sessions (2 each:
    browsers allocate over UDP and over TCP)."""
    (app,) = load(GPU_SERVE_CONFIG)["applications"]
    sessions = AppArgs(**app["args"]).ingress.default_max_sessions
    assert sessions is not None
    converter = gpu_deployments()["Converter"]
    capacity = app["args"]["converter"]["max_sessions"] * converter["autoscaling_config"]["max_replicas"]
    assert sessions < capacity
    user_quota = int(dict(turn_settings())["user-quota"])
    assert user_quota >= 2 * sessions
