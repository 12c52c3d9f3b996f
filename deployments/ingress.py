"""The ingress deployment: FastAPI on Serve. WebSocket streams, WebRTC calls, session tokens, the voices API, health,
the web client.

Every route is thin: it checks the caller and hands over to app/ (StreamConnection, RtcCall, RtpCall, TokenSigner,
VoiceStore).
Storage and decoding run on bounded worker pools (app/offload.py), never on the event loop that paces every stream of
the replica; a full pool answers 503 with Retry-After.
"""

# No `from __future__ import annotations` here: FastAPI must see real types in the route signatures.

import logging
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address

from app.auth.admin import AdminKey, NewKeyRequest, RotateRequest, new_secret_answer, static_key_answer, usage_answer
from app.auth.ratelimit import KeyRate
from app.auth.tokens import (
    GENERATION_CLAIM,
    TokenError,
    TokenSigner,
    bearer,
    from_loopback,
    purpose_secret,
    static_keys,
)
from app.environment import TOKEN_SECRET, ServiceEnvironment
from app.logs import route_to
from app.offload import Busy, Offload
from app.serving.config import IngressConfig
from app.serving.retry_after import ScaleUpWatch
from app.transport.limits import MessageLimits
from app.transport.origins import origin_allowed
from app.transport.protocol import CLOSE_POLICY_VIOLATION, published_limits
from app.transport.quotas import SessionQuotas
from app.transport.rtp import RtpCall, RtpServices
from app.transport.sessions import StreamServices
from app.transport.webrtc import RtcCall, RtcServices, restrict_ice_host_addresses
from app.transport.websocket import StreamConnection
from app.voices.store import VoiceError, VoiceLimits, VoiceNotFound, VoiceStore
from app.voices.uploads import Uploads
from deployments.client import RayConverterClient
from deployments.keys import admin_error, key_store, usage_meter
from deployments.metrics import RayServeMetrics
from deployments.scale_up import ServeScaleUpOutlook

log = logging.getLogger(__name__)

WEB_CLIENT = Path(__file__).resolve().parent.parent / "client" / "web"
SERVE_LOGGER = "ray.serve"  # the replica's logger: Serve's logging_config (JSON, level, log files) applies to it

# Pools for blocking work: (threads, calls that may wait). Key records are small reads (an S3 GET each) that anyone
# can cause by naming made-up keys; voices are listings, deletions, and decoding uploads (uploads also take a slot).
KEY_IO = (4, 64)
VOICE_IO = (2, 32)
BUSY_RETRY_AFTER_S = 1
# The web page's Content-Security-Policy: its own scripts, styles and worklet only (no inline script, no eval), API
# calls and WebSockets to its own origin, media from blob: URLs (recordings the page makes), and no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
READY_FIELDS = ("real_time_factor", "sessions", "capacity")  # of a converter's stats, for /readyz

# No documentation routes unless configured (`ingress.api_docs`): they would list every route, the admin API's too.
api = FastAPI(title="Seed-VC real-time voice conversion", version="1", openapi_url=None, docs_url=None, redoc_url=None)


def enable_api_docs(app: FastAPI) -> None:
    """Adds /openapi.json and /docs to an app made without them (`ingress.api_docs`)."""
    app.openapi_url, app.docs_url = "/openapi.json", "/docs"
    app.setup()  # adds the routes of the URLs now set; FastAPI added none for them while they were None


@api.exception_handler(Busy)
async def busy(request: Request, error: Busy) -> JSONResponse:
    log.warning("refused %s %s: %s", request.method, request.url.path, error)
    headers = {"Retry-After": str(BUSY_RETRY_AFTER_S)}
    return JSONResponse(status_code=503, content={"detail": "busy; try again shortly"}, headers=headers)


@api.middleware("http")
async def security_headers(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    return response


def with_turn_secret(config: IngressConfig, secret: str | None) -> IngressConfig:
    """The TURN secret from the environment (SEEDVC_TURN_SECRET), when the config does not carry one."""
    if secret and config.turn_secret is None:
        return IngressConfig(**{**config.model_dump(), "turn_secret": secret})
    return config


def token_secret(secret: str | None) -> bytes:
    """The environment's token secret (SEEDVC_TOKEN_SECRET), shared by every ingress replica so that any of them
    accepts a token; without one, a random secret of this replica's own."""
    if secret:
        return secret.encode()
    log.warning("%s is not set: session tokens are valid on this ingress replica only", TOKEN_SECRET)
    return secrets.token_bytes(32)


@serve.ingress(api)
class Ingress:
    def __init__(self, converter: DeploymentHandle, config: dict[str, Any]) -> None:
        # Per-chunk resampling and Opus work is tiny: more torch threads only fight the converters for the cores.
        torch.set_num_threads(1)
        route_to(logging.getLogger(SERVE_LOGGER))  # app/ and deployments/ records, with their session fields
        env = ServiceEnvironment.read()
        self.config = with_turn_secret(IngressConfig(**config), env.turn_secret)
        self.converter = converter
        self.admin = AdminKey.from_value(env.admin_key)
        static = static_keys(self.config.api_keys, env.api_keys)
        self.development_keys = static.development
        self.keys = key_store(self.config, static.keys, self.admin)  # static keys, then runtime ones
        self.key_io = Offload("key-io", *KEY_IO)
        self.voice_io = Offload("voice-io", *VOICE_IO)
        self.ice_rate = KeyRate(self.config.ice_requests_per_s, self.config.ice_burst)
        self.usage = usage_meter(self.config, self.keys)
        secret = token_secret(env.token_secret)
        self.tokens = TokenSigner(secret, ttl_seconds=self.config.token_ttl_s)
        self.voices = VoiceStore(self.config.voice_store, VoiceLimits(max_bytes=self.config.max_upload_bytes))
        self.uploads = Uploads(
            self.voices,
            self.voice_io,
            self.config.max_upload_bytes,
            self.config.max_concurrent_uploads,
            self.config.upload_timeout_s,
        )
        self.services = StreamServices(
            client=RayConverterClient(converter),
            tokens=self.tokens,
            voices=self.voices,
            defaults=None,  # each converter's own: the README settings, or on a CPU its real-time profile
            resume_tokens=TokenSigner(purpose_secret(secret, "resume"), ttl_seconds=self.config.resume_token_ttl_s),
            max_backlog_blocks=self.config.max_backlog_blocks,
            retry_after_s=self.config.retry_after_s,
            capacity_outlook=ServeScaleUpOutlook(
                converter.app_name,
                converter.deployment_name,
                ScaleUpWatch(self.config.scale_up_estimate_s, self.config.retry_after_s, self.config.retry_after_max_s),
            ),
            opus_bitrate=self.config.opus_bitrate,
            metrics=RayServeMetrics(),
            limits=MessageLimits.from_config(self.config),
            quotas=SessionQuotas(self.usage),
        )
        self.rtc_services = RtcServices.from_config(self.services, self.config)
        self.rtp_services = RtpServices.from_config(self.services, self.config, get_node_ip_address())
        if self.config.allowed_origins:  # pages of the service's own origin need no CORS
            api.add_middleware(
                CORSMiddleware,
                allow_origins=self.config.allowed_origins,
                allow_methods=["*"],
                allow_headers=["Authorization", "Content-Type"],
            )
        if self.config.ice_host_addresses is not None:
            # This replica's process owns the peer connections, so this is where ICE must learn its addresses.
            restrict_ice_host_addresses(self.config.ice_host_addresses)
        if self.config.api_docs:
            enable_api_docs(api)
        client_dir = Path(self.config.static_dir) if self.config.static_dir else WEB_CLIENT
        if client_dir.is_dir():
            # Mounted last, so that every API route above takes precedence over a file of the same path.
            api.mount("/", StaticFiles(directory=client_dir, html=True), name="client")

    async def _caller(self, authorization: str | None) -> str:
        """The key id behind a session token in an Authorization header (401 otherwise)."""
        try:
            claims = self.tokens.verify(bearer(authorization))
            # A revoked key's tokens, and those of a rotated-away secret, stop here (within key_cache_ttl_s).
            await self.key_io.run(self.keys.check_token, claims)
        except TokenError as error:
            raise HTTPException(status_code=401, detail=f"invalid session token: {error}") from error
        return claims.key_id

    async def _refused_origin(self, websocket: WebSocket) -> bool:
        """Refuses a handshake from a page that may not connect (HTTP 403, before accept); returns whether it did."""
        origin = websocket.headers.get("origin")
        if origin_allowed(origin, websocket.headers.get("host"), self.config.allowed_origins):
            return False
        log.info("refused a WebSocket on %s from origin %.200r", websocket.url.path, origin)
        await websocket.close(code=CLOSE_POLICY_VIOLATION)
        return True

    @api.websocket("/v1/stream")
    async def stream(self, websocket: WebSocket) -> None:
        if await self._refused_origin(websocket):
            return
        await StreamConnection(websocket, self.services).run()

    @api.websocket("/v1/rtc")
    async def rtc(self, websocket: WebSocket) -> None:
        if await self._refused_origin(websocket):
            return
        await RtcCall(websocket, self.rtc_services).run()

    @api.websocket("/v1/rtp")
    async def rtp(self, websocket: WebSocket) -> None:
        if self.rtp_services is None:  # RTP is off: as if the route did not exist
            await websocket.close(code=CLOSE_POLICY_VIOLATION)
            return
        if await self._refused_origin(websocket):
            return
        await RtpCall(websocket, self.rtp_services).run()

    @api.get("/v1/ice")
    async def ice_servers(self, authorization: str | None = Header(None)) -> JSONResponse:
        """ICE servers for the browser's RTCPeerConnection, with TURN credentials for this caller that expire."""
        key_id = await self._caller(authorization)
        if not self.ice_rate.allow(key_id):
            retry_after = max(1, round(self.ice_rate.retry_after_s))
            detail = {"detail": "too many ICE server requests for this key", "reason": "rate_limited"}
            return JSONResponse(status_code=429, content=detail, headers={"Retry-After": str(retry_after)})
        return JSONResponse(content={"iceServers": self.rtc_services.browser_ice_servers(key_id, time.time())})

    @api.get("/v1/limits")
    async def limits(self) -> dict[str, Any]:
        """The ranges of the settings and controls, their neutral values and the retry policy for a refused start:
        public, like the page that takes its fields from them (so that they cannot drift from what the server takes)."""
        return published_limits()

    @api.post("/v1/tokens")
    async def issue_token(self, request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        try:
            caller = await self.key_io.run(self.keys.authenticate, bearer(authorization))
            if caller.key_id in self.development_keys and not from_loopback(request.client and request.client.host):
                raise TokenError("a development key (ingress.api_keys) works from this machine only")
        except TokenError as error:
            raise HTTPException(status_code=401, detail=f"invalid API key: {error}") from error
        issued = self.tokens.issue(caller.key_id, {GENERATION_CLAIM: str(caller.generation)})
        return {"token": issued.token, "expires_at": issued.expires_at}

    @api.post("/v1/voices", status_code=201)
    async def add_voice(
        self, request: Request, name: str | None = None, authorization: str | None = Header(None)
    ) -> JSONResponse:
        owner = await self._caller(authorization)
        try:
            record = await self.uploads.add(request.stream(), request.headers.get("content-length"), owner, name)
        except VoiceError as error:
            status = {"too_large": 413, "too_slow": 408}.get(error.reason, 422)
            return JSONResponse(status_code=status, content={"detail": str(error), "reason": error.reason})
        return JSONResponse(
            status_code=201, content={"voice_id": record.voice_id, "seconds": record.seconds, "name": record.name}
        )

    @api.get("/v1/voices")
    async def list_voices(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        owner = await self._caller(authorization)
        voices = await self.voice_io.run(self.voices.list, owner)
        return {"voices": [{"voice_id": v.voice_id, "name": v.name, "seconds": v.seconds} for v in voices]}

    @api.delete("/v1/voices/{voice_id}", status_code=204)
    async def delete_voice(self, voice_id: str, authorization: str | None = Header(None)) -> None:
        owner = await self._caller(authorization)
        try:
            record = await self.voice_io.run(self.voices.get, voice_id)
        except (VoiceNotFound, ValueError) as error:
            raise HTTPException(status_code=404, detail="no such voice") from error
        if record.owner != owner:
            raise HTTPException(status_code=404, detail="no such voice")
        await self.voice_io.run(self.voices.delete, voice_id)

    # -- API keys: the admin API (SEEDVC_ADMIN_KEY) and a key's own usage -----------------------------------------

    def _admin(self, authorization: str | None) -> None:
        """Lets the admin key through (401 otherwise); 404 while the admin API is off, as for any unknown path."""
        if self.admin is None:
            raise HTTPException(status_code=404, detail="Not Found")
        try:
            self.admin.check(bearer(authorization))
        except TokenError as error:
            raise HTTPException(status_code=401, detail=f"invalid admin key: {error}") from error

    @api.post("/v1/admin/keys", status_code=201)
    async def create_key(self, request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        """A new API key; the answer carries its secret, which is shown this once."""
        self._admin(authorization)
        try:
            body = NewKeyRequest.model_validate_json(await request.body() or b"{}")
            new = await self.key_io.run(self.keys.create, body.key_id, body.quotas(self.keys.default_quotas), body.name)
        except (ValueError, LookupError) as error:
            raise admin_error(error) from error
        log.info("admin: created API key %s", new.record.key_id)
        return new_secret_answer(new)

    @api.get("/v1/admin/keys")
    async def list_keys(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._admin(authorization)
        static = [static_key_answer(key_id, self.keys.default_quotas) for key_id in self.keys.static_ids]
        return {"keys": static + [record.public() for record in await self.key_io.run(self.keys.list)]}

    @api.post("/v1/admin/keys/{key_id}/rotate")
    async def rotate_key(
        self, key_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        """A new secret for the key; the old one keeps working for `grace_s` (default: key_rotation_grace_s)."""
        self._admin(authorization)
        try:
            body = RotateRequest.model_validate_json(await request.body() or b"{}")
            grace_s = self.config.key_rotation_grace_s if body.grace_s is None else body.grace_s
            new = await self.key_io.run(self.keys.rotate, key_id, grace_s)
        except (ValueError, LookupError) as error:
            raise admin_error(error) from error
        log.info("admin: rotated API key %s; the old secret works for %g s more", key_id, grace_s)
        return new_secret_answer(new)

    @api.delete("/v1/admin/keys/{key_id}")
    async def revoke_key(self, key_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Revokes the key for good: no new tokens, and its tokens fail at their next use (within key_cache_ttl_s)."""
        self._admin(authorization)
        try:
            record = await self.key_io.run(self.keys.revoke, key_id)
        except (ValueError, LookupError) as error:
            raise admin_error(error) from error
        log.info("admin: revoked API key %s", key_id)
        return record.public()

    @api.get("/v1/admin/keys/{key_id}/usage")
    async def key_usage(self, key_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._admin(authorization)
        try:
            return usage_answer(await self.usage.usage(key_id))
        except (ValueError, LookupError) as error:
            raise admin_error(error) from error

    @api.get("/v1/usage")
    async def own_usage(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        """The caller's key's usage today and its quotas (session token)."""
        return usage_answer(await self.usage.usage(await self._caller(authorization)))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Whether a converter answers, with its real-time factor and load: no session ids (anyone may ask)."""
        try:
            stats = await self.converter.stats.remote()
        except Exception as error:  # any failure to reach a converter means not ready
            return JSONResponse(status_code=503, content={"status": "no converter", "detail": type(error).__name__})
        public = {name: stats[name] for name in READY_FIELDS if name in stats}
        return JSONResponse(content={"status": "ready", "converter": public})
