"""Configuration of the serving layer, validated once (pydantic, unknown keys refused).

The same models back `serve_config.yaml`'s application args: a typo there fails at start-up with the field name,
instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.model.precision import Precision
from app.streaming.settings import StreamSettings
from app.transport.origins import normalized_origin
from app.transport.protocol import SettingsOverrides

ICE_URL_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")

# The CPU real-time profile: the settings a converter on a CPU serves to clients that send none, instead of the README
# (upstream) settings, which are several times slower than real time on 2 cores. Chosen by measurement (README, "CPU
# real-time profile", bench/cpu_profile.py); the settings it leaves out are the README's. Through the service a step
# costs ~1.6x what the engine alone measures (Opus, resampling and Serve share the 2 cores with the engine's threads),
# so the engine's real-time factor must stay near 0.5: a 0.8 s block, 2 steps without guidance, short contexts
# (p99 block latency of one stream through the service on 2 AVX512-BF16 cores: 0.85-1.14 s with 3 steps, 0.75 and
# 0.86 s with 2; on 2 AMX cores, 0.61-0.65 s with 2 in five runs).
CPU_REALTIME_PROFILE = SettingsOverrides(
    block_time=0.8, diffusion_steps=2, cfg_rate=0.0, ce_context=0.5, dit_context=0.15, max_prompt=1.0
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConverterConfig(Strict):
    model: str = Field("hub", description="'hub' (official files by hub id, cached) or a model bundle directory")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    precision: Precision = Field(
        Precision.AUTO,
        description="compute precision: auto (bf16 where the hardware has fast bf16, else fp32), fp32 (exact, matches "
        "upstream), bf16, fp16; the start-up log says what auto chose and why",
    )
    max_sessions: int = Field(16, ge=1, le=1024, description="sessions one replica holds at most")
    voice_store: str = Field("./voices", description="local directory or fsspec URL of the voice store")
    voice_cache_size: int = Field(64, ge=1, description="prepared voices kept per replica")
    silence_gate_dbfs: float | None = Field(-55.0, description="skip the model below this level; null = off")
    deadline_min_steps: int | None = Field(
        None, ge=1, description="lower diffusion steps down to this when a step would miss its deadline; null = off"
    )
    deadline_fraction: float = Field(0.9, gt=0, le=1, description="share of the block time a step may take")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")
    identity: bool = Field(False, description="debug: return the input instead of converting (measures the path)")
    voice_purge_interval_s: float | None = Field(
        30.0,
        gt=0,
        description="how often cached voices are checked against the voice store: a deleted voice leaves every "
        "replica's cache within this; null = never",
    )
    detached_session_ttl_s: float = Field(
        30.0,
        gt=0,
        description="a session without a call for this long is closed: its client left and did not resume it "
        "(keep it well above a block; it bounds how long a dropped client may take to resume)",
    )
    unhealthy_after_failed_steps: int = Field(
        3, ge=1, description="engine steps failing in a row (device errors) before the replica reports unhealthy"
    )
    cpu_settings: SettingsOverrides | None = Field(
        CPU_REALTIME_PROFILE,
        description="on a CPU, the stream settings under what a client asks for (all of them when it sends none): "
        "by default the CPU real-time profile (README); null = the README settings, as on a GPU. Clients that send "
        "a setting keep it",
    )
    replica_tag: str = Field("local", description="set by the deployment: the replica's id")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def default_settings(self, device: torch.device) -> StreamSettings:
        """What a session on a model on `device` gets for the settings its client does not send."""
        if device.type == "cpu" and self.cpu_settings is not None:
            return self.cpu_settings.apply(StreamSettings())
        return StreamSettings()

    @field_validator("cpu_settings")
    @classmethod
    def _consistent(cls, settings: SettingsOverrides | None) -> SettingsOverrides | None:
        if settings is not None:
            settings.apply(StreamSettings())  # its ValueError says what contradicts what
        return settings


class IceServer(Strict):
    """One STUN or TURN server, as a browser's `RTCIceServer` names it."""

    urls: list[str] = Field(min_length=1, description="stun:, stuns:, turn: or turns: URLs of this server")
    username: str | None = Field(None, description="TURN only")
    credential: str | None = Field(None, description="TURN only: the password")

    @field_validator("urls")
    @classmethod
    def _ice_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(ICE_URL_SCHEMES):
                raise ValueError(f"{url!r} is not an ICE server URL: it must start with one of {ICE_URL_SCHEMES}")
        return urls


class IngressConfig(Strict):
    voice_store: str = Field("./voices", description="local directory or fsspec URL of the voice store (shared)")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="development keys, key id -> API key: accepted from loopback clients only, and ignored when the "
        "SEEDVC_API_KEYS env var (id=key,...) names the static keys",
    )
    token_ttl_s: float = Field(900, gt=0, description="lifetime of a session token")
    resume_token_ttl_s: float = Field(
        24 * 3600, gt=0, description="lifetime of a resume token (it also needs the session held and a session token)"
    )
    max_backlog_blocks: int = Field(3, ge=1, description="pending input blocks per session before the oldest drops")
    retry_after_s: float = Field(
        5.0,
        gt=0,
        description="what a client refused for capacity is told to wait when no converter is starting (a session may "
        "end at any moment), and the least it is ever told (app/serving/retry_after.py)",
    )
    scale_up_estimate_s: float = Field(
        60.0,
        gt=0,
        description="seconds from Serve's request for a converter replica to it serving (a node joining, the model "
        "loading), told to refused clients during a scale-up until the ingress has measured a replica start",
    )
    retry_after_max_s: float = Field(300.0, gt=0, description="the most a client refused for capacity is told to wait")
    opus_bitrate: int = Field(32000, ge=6000, le=256000, description="bit rate of the converted audio")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest voice upload")
    max_concurrent_uploads: int = Field(
        4, ge=1, description="voice uploads read and decoded at once per ingress replica; more wait for a slot"
    )
    upload_timeout_s: float = Field(
        30.0, gt=0, description="longest an upload waits for a slot, and then for its body to arrive"
    )
    api_docs: bool = Field(
        False, description="serve /docs and /openapi.json (they list every route, the admin API's too)"
    )
    static_dir: str | None = Field(None, description="browser client files served at /; null = the bundled client/web")

    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers of the server's own WebRTC peer connections, also handed to browsers by "
        "GET /v1/ice; empty = host candidates only, and no STUN server is ever contacted (aiortc uses the first STUN "
        "and the first TURN URL)",
    )
    turn_secret: SecretStr | None = Field(
        None,
        description="secret shared with a TURN server (coturn's static-auth-secret): GET /v1/ice then hands each "
        "caller short-lived TURN credentials for `turn_urls` (TURN REST API); null = none",
    )
    turn_urls: list[str] = Field(default_factory=list, description="turn: or turns: URLs the credentials are for")
    turn_ttl_s: float = Field(
        600,
        ge=60,
        le=3600,
        description="longest life of the TURN credentials GET /v1/ice hands out: one username per key and half of "
        "this, valid for at least half of it (a call's allocation outlives its credential; only new ones need it)",
    )
    ice_requests_per_s: float = Field(1.0, gt=0, description="GET /v1/ice per key and second, sustained (429 over)")
    ice_burst: int = Field(20, ge=1, description="GET /v1/ice a key may send at once beyond that")
    ice_host_addresses: list[str] | None = Field(
        None,
        description="the only host addresses the server's ICE offers; null = aioice's default (every address but "
        "loopback); ['127.0.0.1'] for loopback-only tests",
    )
    rtc_connect_timeout_s: float = Field(
        15.0, gt=0, description="WebRTC: for the offer to arrive after `ready`, then for the media to connect"
    )
    rtp_enabled: bool = Field(
        False,
        description="serve /v1/rtp: calls in plain RTP over UDP, for media gateways (README, 'Non-browser peers'). "
        "Plain RTP is unencrypted: open the port range to private networks only",
    )
    rtp_host: str | None = Field(
        None,
        description="RTP: the address of this node as RTP peers reach it, the SEEDVC_RTP_HOST env var of each node "
        "taking precedence; null = the node's address as Ray knows it (its private address)",
    )
    rtp_bind_address: str = Field("0.0.0.0", description="RTP: the local address the calls' UDP ports bind to")
    rtp_port_min: int = Field(40000, ge=1024, le=65535, description="RTP: lowest UDP port of a call")
    rtp_port_max: int = Field(40999, ge=1024, le=65535, description="RTP: highest UDP port of a call")
    rtp_jitter_ms: float = Field(
        60.0, ge=0, le=1000, description="RTP: how long received audio waits for late and reordered packets"
    )
    outbound_networks: list[str] = Field(
        default_factory=list,
        description="networks (CIDR) the service may send UDP to besides public addresses, e.g. a media gateway's "
        "private network; empty = public unicast addresses only (app/transport/addresses.py)",
    )
    allowed_origins: list[Annotated[str, AfterValidator(normalized_origin)]] = Field(
        default_factory=list,
        description="browser origins (scheme://host[:port]) allowed on /v1/stream, /v1/rtc and, by CORS, the HTTP API, "
        "besides the service's own page; ['*'] = any. Clients that send no Origin (not browsers) are always allowed",
    )
    max_audio_speed: float = Field(3.0, gt=1, description="real-time audio a stream may send, in times real time")
    audio_burst_s: float = Field(5.0, gt=0, description="seconds of audio a stream may send at once beyond that")
    max_text_per_s: float = Field(5.0, gt=0, description="text messages a connection may send a second, sustained")
    text_burst: int = Field(20, ge=1, description="text messages a connection may send at once beyond that")
    max_session_s: float = Field(4 * 3600, gt=0, description="longest a stream or call lasts (session_too_long)")
    start_timeout_s: float = Field(
        5.0,
        gt=0,
        description="for the start message after a WebSocket opens (not_started): an idle socket holds a slot",
    )
    idle_input_timeout_s: float | None = Field(
        30.0,
        gt=0,
        description="a session that receives no media packet at all for this long ends (idle_timeout) and frees its "
        "converter slot; silent audio and DTX packets are media; null = never",
    )
    max_output_backlog_s: float = Field(
        3.0,
        gt=0,
        description="converted audio waiting for a real-time client: beyond this the oldest is dropped (a warning "
        "event says so), so a client sending faster than real time cannot pile up memory",
    )
    max_ice_candidates: int = Field(
        20, ge=1, le=100, description="remote ICE candidates an SDP offer may carry (more: bad_offer)"
    )
    key_store: str | None = Field(
        None,
        description="local directory or fsspec URL of the runtime API keys, their usage and session leases, shared "
        "by every ingress replica; null = a '_keys' directory inside the voice store",
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="how long a replica trusts a key record it read: revocations elsewhere apply within it"
    )
    key_rotation_grace_s: float = Field(
        0.0, ge=0, le=7 * 24 * 3600, description="how long an old secret works after a rotation that names no grace"
    )
    default_max_sessions: int | None = Field(
        None, ge=1, description="live sessions at once per key, for static keys and new keys that set none; null = any"
    )
    default_max_stream_minutes_per_day: float | None = Field(
        None, gt=0, description="stream minutes per key and UTC day, for static keys and new keys that set none"
    )
    session_lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="a session's slot in its key's limit is freed this long after its replica last renewed it (a "
        "crash, or a dropped client that did not resume); keep it above the converter's detached_session_ttl_s",
    )
    usage_flush_interval_s: float = Field(
        15.0, gt=0, description="how often a replica writes its sessions' stream time (a crash loses at most this)"
    )

    @field_validator("ice_host_addresses")
    @classmethod
    def _ip_addresses(cls, addresses: list[str] | None) -> list[str] | None:
        for address in addresses or []:
            ipaddress.ip_address(address)  # its ValueError names the bad address
        return addresses

    @field_validator("outbound_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network)  # its ValueError names the bad network
        return networks

    @model_validator(mode="after")
    def _retry_after_bounds(self) -> IngressConfig:
        if self.retry_after_s > self.retry_after_max_s:
            raise ValueError(f"retry_after_s {self.retry_after_s} is above retry_after_max_s {self.retry_after_max_s}")
        return self

    @model_validator(mode="after")
    def _rtp_port_range(self) -> IngressConfig:
        if self.rtp_port_min > self.rtp_port_max:
            raise ValueError(f"rtp_port_min {self.rtp_port_min} is above rtp_port_max {self.rtp_port_max}")
        return self

    @field_validator("turn_urls")
    @classmethod
    def _turn_urls(cls, urls: list[str]) -> list[str]:
        bad = [url for url in urls if not url.startswith(("turn:", "turns:"))]
        if bad:
            raise ValueError(f"turn_urls must be turn: or turns: URLs, got {bad}")
        return urls

    @model_validator(mode="after")
    def _turn_complete(self) -> IngressConfig:
        if self.turn_secret is not None and not self.turn_urls:
            raise ValueError("turn_secret is set but turn_urls is empty: list the TURN server's turn: URLs")
        return self
